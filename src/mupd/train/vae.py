"""`train_vae`: the project's own latent codec, a diffusers `AutoencoderKL` trained on H&E tiles.

It runs the one training loop (`Trainer`: accelerate, checkpoints, exact resume, EMA, CSV log)
with `VAEObjective` as its objective. Objective per tile x in [-1, 1]:
    mean |x - decode(z)| + kl_weight * KL(q(z|x) || N(0, I)) / (3 H W),  z ~ q(z|x)
i.e. L1 reconstruction per pixel value plus the KL summed over the latent and divided by the
number of pixel values (kl_weight 1e-6 is the Stable Diffusion VAE's weighting: sum-L1 + 1e-6
sum-KL, divided through by 3 H W).

After training, the EMA weights get `shift_factor` = mean and `scaling_factor` = 1 / std of the
posterior-mode latents of (up to `stat_tiles` of) the training tiles, written into the VAE's
config, which is where `VAECodec` reads them: the codec's latents are then zero-mean,
unit-variance on the training data, as the flow-matching noise assumes.

Run folder: `checkpoints/`, `train_log.csv`, `vae_train.json` (what was trained on, numbers)
and `vae/` (config.json + diffusion_pytorch_model.safetensors, a local diffusers VAE folder:
use it as `codec: {type: vae, path: RUN/vae}`), written aside and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..io.atomic import atomic_output
from ..models.codec import VAECodec, vae_config
from ..progress import CancelToken, ProgressCallback, ProgressEvent
from .batches import Sample, image_to_tensor
from .config import CheckpointSection, OptimSection
from .run import _check_output
from .store import MixedSamples, check_tile_sizes, he_tiles
from .trainer import Trainer

VAE_FOLDER = "vae"
INFO_FILE = "vae_train.json"


class VAEWithPosterior(torch.nn.Module):
    """The trained module: one forward gives the reconstruction and the per-tile KL, so DDP
    sees the whole graph through its wrapper."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample(generator=generator)
        return self.vae.decode(z).sample, posterior.kl()


class VAEObjective:
    """The VAE's objective in `Trainer`: `to`, `training_loss`, no RNA tokenizer."""

    rna_tokenizer = None

    def __init__(self, vae: Any, kl_weight: float = 1e-6, crop: int = 0) -> None:
        self.module = VAEWithPosterior(vae)
        self.kl_weight = float(kl_weight)
        self.crop = int(crop)  # > 0: train on random crops of this size (convolutional, so the
        # VAE still codes whole tiles; a 64 px crop costs a quarter of a 128 px tile on a CPU)

    def _crops(self, images: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        size, (height, width) = self.crop, images.shape[-2:]
        if not 0 < size < min(height, width):
            return images
        device = generator.device if generator is not None else "cpu"
        ys = torch.randint(0, height - size + 1, (len(images),), generator=generator, device=device)
        xs = torch.randint(0, width - size + 1, (len(images),), generator=generator, device=device)
        return torch.stack([im[:, y:y + size, x:x + size]
                            for im, y, x in zip(images, ys.tolist(), xs.tolist())])

    def to(self, device: Any) -> "VAEObjective":
        self.module.to(device)
        return self

    def training_loss(self, batch: dict[str, Any], model: Optional[torch.nn.Module] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        model = model if model is not None else self.module
        images = self._crops(batch["target"], generator).to(next(self.module.parameters()).device)
        recon, kl = model(images, generator=generator)
        pixels = images[0].numel()
        return F.l1_loss(recon.float(), images.float()) + self.kl_weight * kl.float().mean() / pixels


def tile_samples(stores: Sequence[str], patients: Sequence[str] = (),
                 exclude_patients: Sequence[str] = ()) -> tuple[Sequence[Sample], list[str]]:
    """The H&E tiles of the allowed patients of every store (one Sample each), and a line per
    store saying how many."""
    parts = [he_tiles(path, exclude_patients, patients) for path in stores]
    check_tile_sizes({part.data.store: part.store for part in parts})
    lines = [f"{part.data.store}: {len(part.rows)} tiles of {len(part.store)}" for part in parts]
    return (parts[0] if len(parts) == 1 else MixedSamples(parts)), lines


@torch.no_grad()
def latent_statistics(vae: Any, samples: Sequence[Sample], max_tiles: int = 512,
                      batch_size: int = 16) -> tuple[float, float]:
    """(mean, std) of the posterior-mode latents of up to `max_tiles` tiles, evenly spread."""
    picked = np.unique(np.linspace(0, len(samples) - 1, min(max_tiles, len(samples))).astype(int))
    device = next(vae.parameters()).device
    total = total_sq = count = 0.0
    vae.eval()
    for start in range(0, len(picked), batch_size):
        x = torch.stack([image_to_tensor(samples[int(i)].target)
                         for i in picked[start:start + batch_size]]).to(device)
        z = vae.encode(x).latent_dist.mode().double()
        total, total_sq = total + float(z.sum()), total_sq + float((z * z).sum())
        count += z.numel()
    mean = total / count
    return mean, float(np.sqrt(max(total_sq / count - mean * mean, 1e-12)))


def save_vae(vae: Any, folder: Path) -> Path:
    """`save_pretrained` (safetensors) into a hidden folder beside `folder`, fsync, then rename
    into place: `folder` is always either the previous complete VAE or the new one."""
    folder = Path(folder)
    with atomic_output(folder, overwrite=True, fsync=True) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return folder


@dataclasses.dataclass
class VAEResult:
    vae_dir: Path
    steps: int
    first_loss: float
    final_loss: float
    scaling_factor: float
    shift_factor: float
    parameters: int
    seconds_per_step: float
    train_tile_mae: float  # reconstruction_error on up to 64 training tiles (0-255 levels)


def train_vae(stores: Sequence[str], output: str | Path, config: str = "tiny",
              optim: Optional[OptimSection] = None, checkpoint: Optional[CheckpointSection] = None,
              kl_weight: float = 1e-6, crop: int = 0, patients: Sequence[str] = (),
              exclude_patients: Sequence[str] = (), stat_tiles: int = 512, resume: bool = False,
              log_every: int = 10, num_workers: int = 0, progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelToken] = None, command: str = "") -> VAEResult:
    """Train the VAE config `config` (see `mupd.models.codec.VAE_CONFIGS`) on the H&E tiles of
    `stores`; the run folder `output` ends with `vae/`, a local diffusers VAE folder."""
    from diffusers import AutoencoderKL

    optim = optim or OptimSection(max_steps=2000, batch_size=16, learning_rate=1e-4,
                                  ema_decay=0.999)
    checkpoint = checkpoint or CheckpointSection()
    run_dir = Path(output)
    _check_output(run_dir, resume, optim.max_steps, product=VAE_FOLDER)
    samples, lines = tile_samples(stores, patients, exclude_patients)
    settings = vae_config(config)
    down = 2 ** (len(settings["block_out_channels"]) - 1)
    tile = np.shape(samples[0].target)[0]
    if tile % down:
        raise DataError(f"tiles of {tile} px in {', '.join(stores)} are not a multiple of the "
                        f"VAE config {config!r}'s {down}x downsampling")
    if crop and crop % down:
        raise DataError(f"--crop {crop} is not a multiple of the VAE config {config!r}'s {down}x "
                        f"downsampling")
    torch.manual_seed(optim.seed)
    vae = AutoencoderKL.from_config(settings)
    objective = VAEObjective(vae, kl_weight, crop)
    trainer = Trainer(objective, samples, optim, checkpoint, run_dir, num_workers=num_workers,
                      log_every=log_every, module=objective.module)
    if progress is not None:
        progress(ProgressEvent("train", 0, optim.max_steps,
                               message=f"VAE {config!r}: {'; '.join(lines)}"))
    result = trainer.fit(resume=resume, progress=progress, cancel=cancel)
    per_step = optim.batch_size * result.num_processes * optim.grad_accum_steps \
        / max(result.samples_per_second, 1e-9)  # of this run (a resume: of its steps)
    trainer.apply_ema()
    trained = trainer.accelerator.unwrap_model(trainer.model).vae
    mean, std = latent_statistics(trained, samples, stat_tiles)
    trained.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
    params = sum(p.numel() for p in trained.parameters())
    checked = [samples[int(i)].target
               for i in np.linspace(0, len(samples) - 1, min(64, len(samples)))]
    mae = reconstruction_error(VAECodec(trained), checked)
    out = VAEResult(run_dir / VAE_FOLDER, result.steps, result.first_loss, result.final_loss,
                    1.0 / std, mean, params, per_step, mae)
    if trainer.accelerator.is_main_process:
        save_vae(trained, out.vae_dir)
        info = {"command": command or " ".join(sys.argv), "config": config, "stores": lines,
                "patients": list(patients), "exclude_patients": list(exclude_patients),
                "kl_weight": kl_weight, "crop": crop or tile, "optim": dataclasses.asdict(optim),
                "steps": result.steps,
                "first_loss": result.first_loss, "final_loss": result.final_loss,
                "scaling_factor": out.scaling_factor, "shift_factor": out.shift_factor,
                "parameters": params, "seconds_per_step_last_run": per_step,
                "train_tile_mae": mae,
                "device": result.device, "downsample": down,
                "weights": "EMA of the trained weights" if optim.ema_decay > 0 else "last step"}
        (run_dir / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    trainer.accelerator.wait_for_everyone()
    return out


def reconstruction_error(codec: VAECodec, tiles: Sequence[np.ndarray], batch_size: int = 16) -> float:
    """Mean absolute error, in 0-255 grey levels, of encode -> decode on (H, W, 3) uint8 tiles:
    how well a codec keeps H&E, comparable across codecs and tile sets."""
    total, count = 0.0, 0
    device = next(codec.vae.parameters()).device
    with torch.no_grad():
        for start in range(0, len(tiles), batch_size):
            x = torch.stack([image_to_tensor(t) for t in tiles[start:start + batch_size]]).to(device)
            y = codec.decode(codec.encode(x)).clamp(-1, 1)
            total, count = total + float((y - x).abs().sum()), count + x.numel()
    return total / count * 127.5
