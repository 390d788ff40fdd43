"""The in-process engine: loads a model folder once and serves translate / generate / fine-tune.

The CLI, the HTTP server and the napari plugin (local mode) all go through this class, so a
feature behaves the same everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import ModelError
from ..paths import DEFAULT_MODEL, cache_dir
from ..progress import CancelToken, ProgressCallback
from ..requests import FinetuneRequest
from .api import (
    EngineInfo,
    GenerateRequest,
    GenerateResult,
    JobStatus,
    TranslateRequest,
    TranslateResult,
)
from .jobs import JobFunction, JobManager


def pick_device(preference: str = "auto") -> str:
    """CUDA, then Apple MPS, then CPU, unless the user names one."""
    import torch

    if preference != "auto":
        return preference
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class ModelRegistry:
    """Model folders the user has made or opened (fine-tuned outputs), remembered across runs."""

    def __init__(self, path: Optional[Path] = None) -> None:
        self.path = path or cache_dir() / "models.json"

    def list(self) -> list[str]:
        known = [str(DEFAULT_MODEL)]
        if self.path.exists():
            known += [p for p in json.loads(self.path.read_text()) if Path(p).is_dir()]
        return list(dict.fromkeys(known))

    def add(self, folder: str) -> None:
        models = [m for m in self.list() if m != str(DEFAULT_MODEL)]
        if folder not in models:
            models.append(folder)
        from ..io.atomic import atomic_write_text

        atomic_write_text(self.path, json.dumps(models, indent=1))


class LocalEngine:
    """Engine running the pipeline in this process on the best local device."""

    def __init__(self, model_path: Optional[str] = None, device: str = "auto",
                 registry: Optional[ModelRegistry] = None, model_roots: Sequence[str] = ()) -> None:
        """`model_roots`: besides its own folder, where a model's files may lie (a server's roots)."""
        self.device = pick_device(device)
        self.model_roots = list(model_roots)
        self.registry = registry or ModelRegistry()
        self.jobs = JobManager()
        self._lock = threading.Lock()  # one model call at a time on this device
        self._pipeline: Any = None
        self._model_path = ""
        self.load_model(model_path)

    # -- model -----------------------------------------------------------------------------
    def load_model(self, path: Optional[str]) -> EngineInfo:
        from ..pipeline import MuPDPipeline

        folder = Path(path) if path else DEFAULT_MODEL
        if not folder.is_dir():
            raise ModelError(f"model folder {folder} does not exist")
        pipeline = MuPDPipeline.from_pretrained(folder, roots=self.model_roots).to(self.device)
        with self._lock:
            self._pipeline, self._model_path = pipeline, str(folder)
        return self.info()

    @property
    def pipeline(self) -> Any:
        return self._pipeline

    def info(self) -> EngineInfo:
        p = self._pipeline
        card = Path(self._model_path) / "MODEL_CARD.md"
        return EngineInfo(
            device=self.device,
            model_name=Path(self._model_path).name,
            model_path=self._model_path,
            targets=p.catalogue.to_list(),
            tile_size=int(p.tile_size),
            mpp=float(p.mpp),
            model_card=card.read_text() if card.exists() else "",
            rna_genes=list(p.rna_tokenizer.genes),
            guidance=p.default_guidance,
        )

    def list_models(self) -> Sequence[str]:
        return self.registry.list()

    # -- inference -------------------------------------------------------------------------
    def translate(self, request: TranslateRequest, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> TranslateResult:
        from ..io import open_slide

        with open_slide(request.slide_path, mpp=request.slide_mpp) as slide:
            return self.translate_slide(slide, request, progress, cancel)

    def translate_slide(self, slide: Any, request: TranslateRequest,
                        progress: Optional[ProgressCallback] = None,
                        cancel: Optional[CancelToken] = None) -> TranslateResult:
        """`translate` on an opened slide, or an in-memory region (regions.source.ArraySlide)."""
        from ..regions.outputs import check_output_folder, write_translation
        from ..regions.translate import RegionTranslator
        from ..render import IhcLook

        look = None if request.ihc_look is None else IhcLook.from_dict(request.ihc_look, "ihc_look")
        if request.output_path:
            check_output_folder(request.output_path)  # refuse before the work, not after
        with self._lock:
            result = RegionTranslator(self._pipeline)(
                slide, request.stains, box=request.box, polygon=request.polygon, holes=request.holes,
                steps=request.steps, guidance=request.guidance, seed=request.seed,
                render_brightfield=request.render_brightfield, progress=progress, cancel=cancel,
                stain_norm=request.stain_norm, strength=request.strength, prompt=request.prompt,
                ihc_look=look,
            )
        output = None
        try:  # large results stay lazy, read back from the written OME-Zarr
            if request.output_path:
                output = str(write_translation(result, request.output_path,
                                               source=request.slide_path, ome_tiff=request.ome_tiff))
            else:
                result.load()
        finally:
            result.close()
        layers = [dataclasses.replace(l, metadata={k: v for k, v in l.metadata.items()
                                                   if not k.startswith("_")})
                  for l in result.layers]
        return TranslateResult(layers=layers, output_path=output, n_tiles=result.n_tiles,
                               seconds=result.seconds, scores=result.scores, cells=result.cells)

    def generate(self, request: GenerateRequest, progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> GenerateResult:
        start = time.perf_counter()
        used: list[str] = []
        missing: list[str] = []
        if request.rna is not None:
            _, _, used, missing = self._pipeline.rna_tokenizer.align(  # the pipeline warns
                request.rna, normalized=request.rna_normalized, warn=False)
        guidance = request.guidance or self._pipeline.default_guidance or None  # none set: the model's
        with self._lock:
            images = self._pipeline.generate(
                text=request.text, rna=request.rna, rna_normalized=request.rna_normalized,
                reference=request.reference, stain=request.stain, num_images=request.num_images,
                steps=request.steps, guidance=guidance, seed=request.seed,
                progress=progress, cancel=cancel,
            )
        return GenerateResult(images=np.asarray(images), missing_genes=list(missing),
                              used_genes=list(used), seconds=time.perf_counter() - start)

    # -- fine-tuning jobs ------------------------------------------------------------------
    def finetune_job(self, request: FinetuneRequest) -> JobFunction:
        """The work of one fine-tune, for whichever scheduler runs it (this engine, the server)."""
        from ..train.finetune import run_finetune

        if request.base_model is None:
            request.base_model = self._model_path

        def job(progress, cancel) -> str:
            out = run_finetune(request, progress=progress, cancel=cancel)
            self.registry.add(str(out))
            return str(out)

        return job

    def start_finetune(self, request: FinetuneRequest) -> JobStatus:
        return self.jobs.submit(self.finetune_job(request))

    def job_status(self, job_id: str) -> JobStatus:
        return self.jobs.status(job_id)

    def cancel_job(self, job_id: str) -> JobStatus:
        return self.jobs.cancel(job_id)
