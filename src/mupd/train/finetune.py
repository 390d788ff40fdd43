"""Fine-tuning a model folder on a user's folder (LoRA or full), callable from CLI, server, napari.

The folder is read and checked completely before the model is touched (`folders.load_folder`),
new stain names are registered in the output model's catalogue, and the run goes through the
same `Trainer` as full training. LoRA adapters (peft) are merged into the weights before saving,
so the output is a plain model folder that `MuPDPipeline.from_pretrained` loads as is.
A cancelled run leaves its checkpoint under `<out>/training/`; starting the same request again
continues it.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import DataError, ModelError, OutputExistsError
from ..paths import DEFAULT_MODEL
from ..progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from ..requests import FinetuneRequest
from .card import write_model_card
from .config import CheckpointSection, OptimSection
from .folders import load_folder
from .loss import FlowMatchingObjective
from .trainer import Trainer

METHODS = ("lora", "full")
#: Linear layers LoRA adapts: attention projections and MLPs. Conditioning layers
#: (adaLN modulation, timestep/stain embedders) stay frozen or fully trained instead.
LORA_EXCLUDE = ("adaln", "modulation", "embed", "final", "norm")
#: Parameters trained in full even under LoRA: the stain tokens (new stains start untrained).
ALWAYS_TRAINED = ("stain",)
RUN_SUBDIR = "training"


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and not any(word in n.lower() for word in LORA_EXCLUDE)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no attention/MLP linear layer for LoRA")
    return names


def add_lora(model: torch.nn.Module, rank: int = 8) -> Any:
    """Inject LoRA adapters in place; returns the peft tuner (for `merge_and_unload`)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                        target_modules=lora_target_modules(model))
    tuner = LoraModel(model, config, "default")
    for name, param in model.named_parameters():
        if any(word in name.lower() for word in ALWAYS_TRAINED):
            param.requires_grad_(True)
    return tuner


def register_stains(pipeline: Any, stains: dict[str, str]) -> list[str]:
    """Add stains the base model does not know; returns the new names."""
    known = {t["name"].lower() for t in pipeline.catalogue.to_list()}
    new = [s for s in stains if s.lower() not in known]
    for name in new:
        pipeline.catalogue.register(name, kind=stains[name],
                                    description="learned by fine-tuning from user pairs")
    return new


def _check_request(request: FinetuneRequest) -> None:
    if request.method not in METHODS:
        raise DataError(f"fine-tuning method {request.method!r} unknown; use {' or '.join(METHODS)}")
    if request.steps < 1 or request.batch_size < 1 or request.learning_rate <= 0:
        raise DataError(f"steps ({request.steps}), batch size ({request.batch_size}) and learning "
                        f"rate ({request.learning_rate}) must all be positive")


def _prepare_output(out: Path) -> bool:
    """True when an unfinished run of this folder is continued."""
    if not out.exists() or not any(out.iterdir()):
        return False
    leftovers = {p.name for p in out.iterdir()}
    if leftovers == {RUN_SUBDIR}:
        return True
    raise OutputExistsError(f"output folder {out} is not empty; choose another folder")


def run_finetune(request: FinetuneRequest, progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None, command: str = "") -> Path:
    """Fine-tune `request.base_model` on `request.data_dir`; returns the output model folder."""
    from ..pipeline import MuPDPipeline

    progress = progress or no_progress
    _check_request(request)
    out = Path(request.output_dir)
    resume = _prepare_output(out)
    base = Path(request.base_model) if request.base_model else DEFAULT_MODEL
    if not base.is_dir():
        raise ModelError(f"base model folder {base} does not exist")
    progress(ProgressEvent("finetune", 0, request.steps, message=f"reading {request.data_dir}"))
    pipeline = MuPDPipeline.from_pretrained(base)
    data = load_folder(request.data_dir, int(pipeline.tile_size), pipeline.rna_tokenizer)
    new_stains = register_stains(pipeline, data.stains)
    tuner = None
    if request.method == "lora":
        tuner = add_lora(pipeline.transformer)
    optim = OptimSection(max_steps=request.steps, batch_size=min(request.batch_size, len(data.samples)),
                         learning_rate=request.learning_rate, seed=request.seed,
                         warmup_steps=min(20, request.steps // 10), ema_decay=0.999)
    checkpoint = CheckpointSection(every=max(1, request.steps // 4), keep=1)
    progress(ProgressEvent("finetune", 0, request.steps, message=
                           f"{data.summary}; {'continuing' if resume else 'starting'} "
                           f"{request.method} fine-tuning"))
    run_dir = out / RUN_SUBDIR  # checkpoints (step-*) and train_log.csv
    trainer = Trainer(FlowMatchingObjective(pipeline), data.samples, optim, checkpoint, run_dir,
                      checkpoint_dir=run_dir)
    result = trainer.fit(resume=resume, progress=progress, cancel=cancel)
    trainer.apply_ema()
    if trainer.accelerator.is_main_process:
        if tuner is not None:
            pipeline.transformer = tuner.merge_and_unload()
        pipeline.save_pretrained(out)
        write_model_card(
            out, how=f"{request.method} fine-tuned", base=str(base),
            data=f"User folder `{request.data_dir}` ({data.kind}): {data.summary}. New stains "
                 f"registered: {', '.join(new_stains) or 'none'}.",
            split="all tiles of the folder were used for training (no held-out part)",
            command=command or f"run_finetune({shlex.quote(str(request))})",
            config={"request": vars(request), "optim": vars(optim)}, result=result, optim=optim,
            n_samples=len(data.samples), tile_size=int(pipeline.tile_size), mpp=float(pipeline.mpp),
            targets=sorted(data.stains) or ["H&E"],
            weights="EMA of the trained weights" + (", LoRA merged" if tuner else ""))
        for old in trainer.checkpoints.checkpoints():  # the model folder is the result now
            shutil.rmtree(old)
    trainer.accelerator.wait_for_everyone()
    progress(ProgressEvent("finetune", request.steps, request.steps, message=f"saved {out}"))
    return out
