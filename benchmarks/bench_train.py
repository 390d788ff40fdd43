"""Training throughput of the real MuPD pipeline, per model config, through the real Trainer.

CPU: samples/s for `tiny` and `base` at a small batch, and `tiny` on cached latents of the
project VAE (`src/mupd/resources/models/vae-tiny`, the latent cache `mupd train` builds), each as a ratio
to `tiny` on pixels measured in the same run (and, to show what the cache saves, with the VAE
encoding every batch). GPU (when CUDA is present): bf16 with
torch.compile off/on, and model FLOP utilisation (FLOPs of one training step, counted by
torch's FlopCounterMode, over the GPU's dense bf16 peak). Tiles are real (scikit-image's IHC
image). Prints one table.

    .venv/bin/python benchmarks/bench_train.py [--steps 6] [--configs tiny base] [--batch 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mupd.paths import RESOURCES
from mupd.train.batches import Sample, collate, to_device
from mupd.train.config import CheckpointSection, OptimSection
from mupd.train.latents import LatentSamples, build_latent_cache
from mupd.train.loss import FlowMatchingObjective
from mupd.train.trainer import Trainer, step_generator

VAE_TINY = RESOURCES / "models" / "vae-tiny"
#: Dense bf16 peak (no sparsity) of GPUs we expect, for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def real_samples(tile: int, n: int) -> list[Sample]:
    from skimage.data import immunohistochemistry
    from skimage.transform import resize

    image = immunohistochemistry()
    if tile > 256:
        image = (resize(image, (2 * tile, 2 * tile)) * 255).astype(np.uint8)
    tiles = [image[y:y + tile, x:x + tile] for y in range(0, image.shape[0] - tile + 1, tile)
             for x in range(0, image.shape[1] - tile + 1, tile)]
    return [Sample(target=tiles[i % len(tiles)], stain="H&E", text="colon, DAB-positive glands",
                   name=f"ihc#{i % len(tiles)}")
            for i in range(n)]


def step_flops(objective: FlowMatchingObjective, samples: list[Sample], device: str) -> float:
    """FLOPs of one forward + backward of the training loss (counted, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = to_device(collate(samples, objective.rna_tokenizer), device)
    with FlopCounterMode(display=False) as counter:
        loss = objective.training_loss(batch, generator=step_generator(0, 0, 0, device))
        loss.backward()
    objective.transformer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(config: str, batch: int, steps: int, precision: str, compile: bool,
            vae: str = "") -> dict:
    """vae: "" (the config's codec), "cached" or "per step" (the project VAE, its latents from the
    cache or encoded in every step)."""
    from mupd.pipeline import MuPDPipeline

    overrides = {"codec": {"type": "vae", "path": str(VAE_TINY)}} if vae else {}
    pipeline = MuPDPipeline.from_config_name(config, **overrides)
    samples = real_samples(int(pipeline.tile_size), max(4 * batch, 8))
    cache = tempfile.TemporaryDirectory() if vae == "cached" else None
    if cache is not None:  # what `mupd train` does before the loop: encode every tile once
        folder = build_latent_cache(samples, pipeline.codec, Path(cache.name), [VAE_TINY],
                                    {"bench": config})
        samples = LatentSamples(samples, folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = sum(p.numel() for p in pipeline.transformer.parameters())
    objective = FlowMatchingObjective(pipeline).to(device)
    flops = step_flops(objective, samples[:batch], device) if device == "cuda" else None
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as run_dir:
        optim = OptimSection(max_steps=steps, batch_size=batch, mixed_precision=precision,
                             compile=compile, ema_decay=0.999)
        trainer = Trainer(objective, samples, optim, CheckpointSection(every=10**9), Path(run_dir))
        trainer.fit(progress=lambda e: stamps.append(time.perf_counter()))
    warm = 2 if compile else 1  # the first steps pay for compilation / allocation
    rate = (len(stamps) - warm) * batch / (stamps[-1] - stamps[warm - 1])
    if cache is not None:
        cache.cleanup()
    row = {"config": config + (f" + vae-tiny, latents {vae}" if vae else ""), "device": device,
           "precision": precision, "compile": compile,
           "tile": int(pipeline.tile_size), "batch": batch, "params_M": params / 1e6,
           "samples_s": rate, "mfu": None}
    if flops is not None:
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            row["mfu"] = flops / batch * rate / (peak * 1e12)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "base"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(c, args.batch, args.steps, "no", False) for c in args.configs]
    if "tiny" in args.configs:
        rows += [measure("tiny", args.batch, args.steps, "no", False, vae=v)
                 for v in ("cached", "per step")]
    gpu_note = "no GPU here"
    if torch.cuda.is_available():
        gpu_note = torch.cuda.get_device_name(0)
        for config in args.configs:
            for compile in (False, True):
                rows.append(measure(config, args.batch * 8, args.steps + 4, "bf16", compile))
    print(f"\nTraining throughput (Trainer incl. data, EMA, clipping; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; GPU: {gpu_note})\n")
    base = rows[0]
    print(f"| config | device | precision | compile | tile | batch | params (M) | samples/s | "
          f"vs {base['config']} ({base['device']}) | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['config']} | {r['device']} | {r['precision']} | {'on' if r['compile'] else 'off'} "
              f"| {r['tile']} | {r['batch']} | {r['params_M']:.1f} | {r['samples_s']:.2f} "
              f"| {r['samples_s'] / base['samples_s']:.2f}x | {mfu} |")
    if not torch.cuda.is_available():
        print("\nGPU section: no GPU here (bf16, torch.compile on/off and MFU run when CUDA is present).")


if __name__ == "__main__":
    main()
