"""One call that runs every evaluation task on the patient-level split and writes the report.

Any object with the pipeline contract works (`translate(tiles, stains, steps=, seed=,
batch_size=)`, `generate(text=, rna=, stain=, num_images=, steps=, seed=)`, `.tile_size`,
`.mpp`); with no model at all the baselines, floors and scorer ceilings are still measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import DataError, ModelError, OutputExistsError
from ..names import SOURCE
from ..paths import STAIN_CATALOGUE
from ..progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from .augment import evaluate_augmentation
from .baselines import RidgeBaseline
from .features import FEATURE_NAMES
from .generation import DEFAULT_PROMPT, FeatureSpace, evaluate_rna_to_he, evaluate_text_to_he
from ..data.sections import HELDOUT_SECTIONS, TRAIN_SECTIONS
from .markers import RIDGE_CNN, evaluate_markers, marker_targets
from .spots import build_spot_table

#: Text attributes (marker -> gene) scored for text->H&E.
TEXT_ATTRIBUTES = {"HER2": "ERBB2", "ER": "ESR1", "Ki67": "MKI67", "CD45": "PTPRC"}
AUGMENT_MARKER = ("HER2", "ERBB2")
#: Evaluation tasks, in the order they run (`mupd eval --tasks`).
TASKS = ("markers", "rna", "text", "augment")
#: Tile geometry for a baseline-only run (no model to take it from).
BASELINE_TILE_SIZE, BASELINE_MPP = 128, 1.0


@dataclass
class EvalSettings:
    data_root: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    quick: bool = False
    encoder: Optional[str] = None
    prompt: str = DEFAULT_PROMPT
    overwrite: bool = False
    markers: Optional[tuple[str, ...]] = None  # catalogue markers to score; None: all with a gene
    tasks: tuple[str, ...] = TASKS
    # The model's input tiles normalised per section onto the training stain (mupd.stain_norm);
    # the baselines keep the tiles as they are, so they stay the same bar.
    stain_norm: Optional[str] = None
    # Validation instead of the held-out test: score one patient-C section that the model did not
    # train on (resources/configs/mupd-tiny-val.yaml leaves out C6); baselines fit on the other
    # C sections. Settings (guidance, stain normalisation) are chosen here, never on B4 / A1.
    validate: Optional[str] = None
    # Guidance scales per modality ("source", "rna", "text"), passed to every translate/generate.
    guidance: Optional[dict[str, float]] = None
    # Sizes; `quick` replaces the None/defaults with small ones.
    train_spots: Optional[int] = None  # per section; None: all
    heldout_spots: Optional[int] = None
    n_tiles: int = 64  # generated tiles per prompt (text->H&E); quick: also per RNA->H&E set
    rna_tiles: Optional[int] = None  # tiles per RNA->H&E set (FD / FID / KID); None: half the
    # primary held-out section, i.e. every B4 tile in one of the two halves (141); quick: n_tiles
    steps: int = 20  # generation sampling steps
    translate_steps: int = 1
    calibration_spots: int = 200
    bootstrap: int = 1000  # block-bootstrap draws for the marker intervals
    shots: int = 8
    synthetic: int = 16

    def __post_init__(self) -> None:
        from ..stain_norm import check_method

        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise DataError(f"evaluation tasks {unknown or '(none)'} unknown; choose from {', '.join(TASKS)}")
        self.stain_norm = check_method(self.stain_norm)
        if self.validate is not None and self.validate not in TRAIN_SECTIONS:
            raise DataError(f"validation section {self.validate!r} is not a training-patient section; "
                            f"choose from {', '.join(TRAIN_SECTIONS)}")
        if self.quick:
            self.train_spots = self.train_spots or 40
            self.heldout_spots = self.heldout_spots or 24
            self.n_tiles, self.steps, self.calibration_spots = 8, 4, 24
            self.shots, self.synthetic, self.bootstrap = 4, 4, 200

    def split(self) -> tuple[tuple[str, ...], tuple[str, ...], str]:
        """(fitting sections, scored sections, the rule in words)."""
        if self.validate is None:
            return TRAIN_SECTIONS, HELDOUT_SECTIONS, "patient-level: patient C trains; patients B and A never seen"
        fit = tuple(s for s in TRAIN_SECTIONS if s != self.validate)
        return fit, (self.validate,), (f"validation, not a held-out test: section {self.validate} of the training "
                                       f"patient C, left out of the model's training (its recipe must not "
                                       f"read it); baselines fit on {', '.join(fit)}")


def run_evaluation(model: Any, out: Path | str, settings: EvalSettings,
                   progress: ProgressCallback = no_progress,
                   cancel: Optional[CancelToken] = None) -> dict[str, Any]:
    """`model`: a model folder, a pipeline object, or None (baselines only). Writes
    out/quality.md, out/results.json and out/fig-*.png; returns the results."""
    from .report import write_report

    out = Path(out)
    if (out / "quality.md").exists() and not settings.overwrite:
        raise OutputExistsError(f"{out / 'quality.md'} exists; pass --overwrite to replace it")
    start = time.perf_counter()
    pipeline, model_name = _load(model)
    if pipeline is not None and settings.guidance:
        pipeline = Guided(pipeline, settings.guidance)
    tile_size = int(pipeline.tile_size) if pipeline is not None else BASELINE_TILE_SIZE
    mpp = float(pipeline.mpp) if pipeline is not None else BASELINE_MPP
    markers = marker_targets(_catalogue(pipeline))
    if settings.markers:
        unknown = [m for m in settings.markers if m not in markers]
        if unknown:
            raise DataError(f"markers {unknown} are not catalogue markers with a gene; "
                            f"choose from {', '.join(markers)}")
        markers = {m: markers[m] for m in settings.markers}
    genes = list(markers.values())
    fit_sections, scored_sections, rule = settings.split()
    progress(ProgressEvent("data", 0, 2, f"training spots ({', '.join(fit_sections)})"))
    train = build_spot_table(settings.data_root, fit_sections, genes, tile_size, mpp, settings.train_spots)
    progress(ProgressEvent("data", 1, 2, f"scored spots ({', '.join(scored_sections)})"))
    heldout = build_spot_table(settings.data_root, scored_sections, genes, tile_size, mpp, settings.heldout_spots)
    primary = heldout.subset(heldout.section_index(scored_sections[0]))
    ridge = RidgeBaseline().fit(train.features, train.expression[genes].to_numpy(), list(train.section_of))
    from .pretrained import EfficientNetLite0Features, InceptionFeatures

    cnn = EfficientNetLite0Features()
    progress(ProgressEvent("features", 0, 2, f"EfficientNet-Lite0: {len(train)} training tiles"))
    cnn_train = cnn(train.tiles)
    progress(ProgressEvent("features", 1, 2, f"EfficientNet-Lite0: {len(heldout)} held-out tiles"))
    cnn_held = cnn(heldout.tiles)
    progress(ProgressEvent("features", 2, 2, "ridge on EfficientNet-Lite0 features"))
    ridge_cnn = RidgeBaseline().fit(cnn_train, train.expression[genes].to_numpy(), list(train.section_of))
    inception = InceptionFeatures()
    encoder = None
    if settings.encoder:
        from .encoder import ImageEncoder
        encoder = ImageEncoder(settings.encoder)
    seeds = settings.seeds
    results: dict[str, Any] = {
        "model": model_name, "quick": settings.quick, "seeds": list(seeds),
        "tile_size": tile_size, "mpp": mpp,
        "split": {"train": list(fit_sections), "heldout": list(scored_sections),
                  "primary_heldout": scored_sections[0], "validation": settings.validate is not None,
                  "rule": rule},
        "guidance": settings.guidance,
        "feature_extractor": {"handcrafted": list(FEATURE_NAMES), "inception": inception.name,
                              "efficientnet": cnn.name, "encoder": encoder.name if encoder else None},
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("data_root", "overwrite")},
    }
    tasks = settings.tasks
    results["tasks"], results["stain_norm"] = list(tasks), settings.stain_norm
    if "markers" in tasks:
        model_tiles = None
        if settings.stain_norm and pipeline is not None:
            model_tiles = (stain_normalised(train, settings.stain_norm),
                           stain_normalised(heldout, settings.stain_norm))
        results["markers"] = evaluate_markers(train, heldout, markers, ridge, pipeline, seeds,
                                              settings.translate_steps, settings.calibration_spots,
                                              settings.bootstrap, progress, cancel,
                                              feature_ridges={RIDGE_CNN: (ridge_cnn, cnn_train, cnn_held)},
                                              model_tiles=model_tiles)
    space = FeatureSpace(train, encoder, inception)
    rna_tiles = settings.rna_tiles or (settings.n_tiles if settings.quick else len(primary) // 2)
    if "rna" in tasks:
        results["rna_to_he"] = evaluate_rna_to_he(pipeline, train, primary, genes, ridge, space, seeds,
                                                  rna_tiles, settings.steps, progress, cancel)
    attributes = {m: g for m, g in TEXT_ATTRIBUTES.items() if g in genes}
    if "text" in tasks:
        results["text_to_he"] = evaluate_text_to_he(pipeline, train, primary, attributes, seeds,
                                                    settings.n_tiles, settings.steps, settings.prompt,
                                                    progress, cancel)
    if "augment" in tasks:
        results["augmentation"] = evaluate_augmentation(pipeline, train, primary, *AUGMENT_MARKER,
                                                        seeds, settings.shots, settings.synthetic,
                                                        settings.steps, progress, cancel)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_report(results, out)
    return results


def stain_normalised(table: Any, method: str) -> np.ndarray:
    """The table's tiles with each section's stain (estimated on all its spot tiles, as a
    region's is on its preview) mapped onto the training stain (mupd.stain_norm)."""
    from ..stain_norm import fit_normalization

    tiles = np.array(table.tiles)
    for name in dict.fromkeys(table.section_of):
        idx = table.section_index(name)
        tiles[idx] = fit_normalization(method, tiles[idx], what=f"section {name}")(tiles[idx])
    return tiles


class Guided:
    """The pipeline with fixed guidance scales on every call, so that each task scores the
    model as a user would run it with those settings (translate takes "source", generate the
    conditions it is given)."""

    def __init__(self, pipeline: Any, guidance: dict[str, float]) -> None:
        self._pipeline, self.guidance = pipeline, dict(guidance)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def translate(self, *args: Any, **kwargs: Any) -> Any:
        source = {k: w for k, w in self.guidance.items() if k == SOURCE}
        return self._pipeline.translate(*args, **({"guidance": source} if source else {}), **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        given = {k for k in ("text", "rna") if kwargs.get(k) is not None}
        scales = {k: w for k, w in self.guidance.items() if k in given}
        return self._pipeline.generate(*args, **({"guidance": scales} if scales else {}), **kwargs)


def _load(model: Any) -> tuple[Any, Optional[str]]:
    if model is None:
        return None, None
    if isinstance(model, (str, Path)):
        folder = Path(model)
        if not folder.is_dir():
            raise ModelError(f"model folder {folder} does not exist")
        from ..pipeline import MuPDPipeline
        return MuPDPipeline.from_pretrained(folder), str(folder)
    return model, getattr(model, "name", None) or type(model).__name__


def _catalogue(pipeline: Any) -> list[dict[str, Any]]:
    """The model's own targets when it has a catalogue, else the bundled stain catalogue."""
    catalogue = getattr(pipeline, "catalogue", None)
    if catalogue is not None and hasattr(catalogue, "to_list"):
        entries = catalogue.to_list()
    else:
        entries = json.loads(STAIN_CATALOGUE.read_text())["targets"]
    if not marker_targets(entries):
        raise DataError("the model's catalogue has no marker with a ground-truth gene to evaluate")
    return entries
