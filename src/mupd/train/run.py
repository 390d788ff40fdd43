"""`train(config)`: a full training run from a config, ending in a complete model folder.

Run folder layout: `config.json` (as resolved), `checkpoints/step-*`, `train_log.csv`,
`latents/<key>/` (with a VAE codec: the training tiles' latents, see latents.py), and
`model/` (EMA weights via `save_pretrained`, plus MODEL_CARD.md) once training is done.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ModelError, OutputExistsError
from ..progress import CancelToken, ProgressCallback, ProgressEvent
from .batches import Sample
from .card import write_model_card
from .checkpoint import CheckpointManager
from .config import DataSection, ModelSection, TrainConfig, TrainConfigError, dump_config
from .loss import FlowMatchingObjective
from .trainer import Trainer, TrainResult, make_accelerator


def load_pipeline(model: ModelSection, data: Optional[DataSection] = None) -> Any:
    """The model to train; a fresh one's `gene_readout` override ({} or {weight: w}) is
    completed from the training rows of `data.store` (`store.fit_gene_readout`)."""
    from ..pipeline import MuPDPipeline

    if model.base:
        if not Path(model.base).is_dir():
            raise ModelError(f"model.base {model.base} is not a model folder")
        return add_transformer_options(MuPDPipeline.from_pretrained(model.base), model.overrides)
    overrides = dict(model.overrides)
    readout = overrides.get("gene_readout")
    if isinstance(readout, dict) and "genes" not in readout and data is not None:
        from .store import fit_gene_readout

        overrides["gene_readout"] = fit_gene_readout(data, readout.get("weight"))
    return MuPDPipeline.from_config_name(model.name, **overrides)


def add_transformer_options(pipeline: Any, options: dict[str, Any]) -> Any:
    """A trained pipeline with new transformer options switched on (`configs.TRANSFORMER_OPTIONS`),
    the rest of its weights kept: a warm start. The added modules end in zero layers, so before
    the first step the model computes what the base did. Any other override of a trained model
    is refused rather than ignored."""
    from ..models.configs import TRANSFORMER_OPTIONS

    other = sorted(set(options) - set(TRANSFORMER_OPTIONS))
    if other:
        raise ModelError(f"model.overrides {', '.join(other)} cannot change a trained model "
                         f"(model.base); only new transformer options can be added: "
                         f"{', '.join(TRANSFORMER_OPTIONS)}")
    changed = {k: v for k, v in options.items() if pipeline.transformer.config.get(k) != v}
    if not changed:
        return pipeline
    if any(not v for v in changed.values()):
        raise ModelError(f"model.overrides cannot switch off {', '.join(changed)} of a trained model")
    pipeline.transformer = pipeline.transformer.with_pooled_conditioning()  # the one option
    pipeline.config["transformer"] = {**pipeline.config.get("transformer", {}), **changed}
    return pipeline


def training_samples(config: TrainConfig, pipeline: Any) -> tuple[Sequence[Sample], str, str]:
    """(samples, data description, split description) for the config's data section."""
    from .folders import HE_FOLDERS, load_folder

    store = Path(config.data.store)
    folder_like = any((store / n).is_dir() for n in HE_FOLDERS) or (store / "captions.csv").is_file() \
        or any(store.glob("*.h5ad"))
    if folder_like:
        data = load_folder(store, int(pipeline.tile_size), pipeline.rna_tokenizer)
        return data.samples, f"Folder `{store}` ({data.kind}): {data.summary}.", "all of the folder"
    from .store import store_samples

    return store_samples(config, pipeline)


def cached_latents(config: TrainConfig, pipeline: Any, objective: Any, samples: Sequence[Sample],
                   accelerator: Any, progress: Optional[ProgressCallback] = None,
                   ) -> tuple[Sequence[Sample], str]:
    """With a VAE codec and an objective that takes cached latents (`LATENT_BATCHES`), the
    samples read from a latent cache in the run folder (every tile encoded once, by the main
    process, before training); else the samples as they are.
    Also returns what the codec does in this run, for the progress stream."""
    from ..models.codec import VAECodec
    from .latents import LatentSamples, build_latent_cache

    codec = getattr(pipeline, "codec", None)
    latent_batches = getattr(objective, "LATENT_BATCHES", False)
    if config.data.augment.views > 1 and not (isinstance(codec, VAECodec) and latent_batches):
        raise TrainConfigError("data.augment is baked into the latent cache, which needs a VAE "
                               "codec (model.overrides.codec); this model has none")
    if not isinstance(codec, VAECodec):
        return samples, "pixel codec (weight-free space-to-depth): no codec to train"
    if not latent_batches:
        return samples, ("VAE codec, frozen, encoding every batch (this objective's training_loss "
                         "does not take cached latents)")
    selection = {**dataclasses.asdict(config.data), "tile_size": int(pipeline.tile_size)}
    selection.pop("num_workers")
    codec.to(accelerator.device)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()  # the main process builds the cache
    folder = build_latent_cache(samples, codec, Path(config.output) / "latents",
                                [Path(config.data.store), *map(Path, config.data.generate_stores)],
                                selection, device=accelerator.device,
                                progress=progress if accelerator.is_main_process else None,
                                markers=getattr(pipeline, "marker_codec", None),
                                augment=config.data.augment)
    if accelerator.is_main_process:
        accelerator.wait_for_everyone()
    return LatentSamples(samples, folder), f"VAE codec, frozen; latents cached once in {folder}"


def _check_output(run_dir: Path, resume: bool, max_steps: int, product: str = "model") -> None:
    """A run folder is only continued with --resume, and never to fewer steps than it has; to as
    many as its newest checkpoint, it writes that checkpoint's model (a run stopped early is
    finished so). `product`: the folder a finished run leaves in it."""
    latest = CheckpointManager(run_dir / "checkpoints").latest()
    if not resume and (latest is not None or (run_dir / product).exists()):
        raise OutputExistsError(f"{run_dir} holds an earlier run; pass --resume to continue it "
                                f"(with more steps to extend it) or choose another output folder")
    done = int(latest.name.split("-")[1]) if resume and latest is not None else 0
    if done > max_steps or (done == max_steps and (run_dir / product).exists()):
        raise OutputExistsError(f"{run_dir} is already trained to {done} steps; raise "
                                f"optim.max_steps to train further")


def train(config: TrainConfig, resume: bool = False, progress: Optional[ProgressCallback] = None,
          cancel: Optional[CancelToken] = None, command: str = "", pipeline: Any = None,
          objective: Any = None) -> TrainResult:
    """Train per `config`; with `resume`, continue from the newest checkpoint if there is one.

    `pipeline`: an already-built pipeline to train instead of `config.model` (callers that hold
    one, e.g. an engine); it must match `config.model` when resuming. `objective`: what the
    Trainer runs (default: the pipeline's `FlowMatchingObjective`).
    """
    run_dir = Path(config.output)
    _check_output(run_dir, resume, config.optim.max_steps)
    pipeline = pipeline if pipeline is not None else load_pipeline(config.model, config.data)
    objective = objective if objective is not None else FlowMatchingObjective(pipeline)
    samples, data_text, split_text = training_samples(config, pipeline)
    accelerator = make_accelerator(config.optim.mixed_precision, config.optim.compile)
    samples, note = cached_latents(config, pipeline, objective, samples, accelerator, progress)
    if progress is not None:
        progress(ProgressEvent("train", 0, config.optim.max_steps, message=note))
    trainer = Trainer(objective, samples, config.optim, config.checkpoint, run_dir,
                      accelerator=accelerator, num_workers=config.data.num_workers,
                      log_every=config.log_every)
    if trainer.accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.json")
    result = trainer.fit(resume=resume, progress=progress, cancel=cancel)
    trainer.apply_ema()
    if trainer.accelerator.is_main_process:
        model_dir = run_dir / "model"
        pipeline.save_pretrained(model_dir, overwrite=True)  # a resumed, extended run
        write_model_card(
            model_dir, how="trained", data=data_text, split=split_text,
            command=command or " ".join(sys.argv), base=config.model.base or f"config {config.model.name!r} (fresh weights)",
            config=config.to_dict(), result=result, optim=config.optim, n_samples=len(samples),
            tile_size=int(pipeline.tile_size), mpp=float(pipeline.mpp),
            targets=config.data.targets,
            weights="EMA of the trained weights" if config.optim.ema_decay > 0 else "last step")
    trainer.accelerator.wait_for_everyone()
    return result
