"""MuPD model speed per config: parameters, forward time, sampling and translation throughput.

CPU: tiny (and tiny at 256 px) and base, fp32; xl: parameter count only (built on the meta
device). GPU (when CUDA is present): every config in bf16 autocast with SDPA attention, tiles/s
and model FLOP utilisation (forward FLOPs counted by torch's FlopCounterMode, over the GPU's
dense bf16 peak). Untrained weights: speed does not depend on them. Prints one table.

    .venv/bin/python benchmarks/bench_model.py [--steps 20] [--configs tiny base xl]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional

import numpy as np
import torch

from mupd.models.configs import model_config
from mupd.models.transformer import MuPDTransformer
from mupd.pipeline import MuPDPipeline

#: Dense bf16 peak (no sparsity) of GPUs we expect, for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds of `fn()` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def real_tiles(tile: int, n: int) -> np.ndarray:
    from skimage.data import immunohistochemistry
    from skimage.transform import resize

    image = immunohistochemistry()  # real brightfield tissue, 512 x 512
    if tile > 256:
        image = (resize(image, (2 * tile, 2 * tile)) * 255).astype(np.uint8)
    tiles = [image[y:y + tile, x:x + tile] for y in range(0, image.shape[0] - tile + 1, tile)
             for x in range(0, image.shape[1] - tile + 1, tile)]
    return np.stack([tiles[i % len(tiles)] for i in range(n)])


def forward_inputs(pipe: MuPDPipeline, batch: int) -> tuple[Any, ...]:
    lat = pipe.tile_size // pipe.codec.downsample
    device = pipe.device
    x = torch.randn(batch, pipe.codec.latent_channels, lat, lat, device=device)
    return x, torch.rand(batch, device=device), torch.zeros(batch, dtype=torch.long, device=device)


def forward_seconds(pipe: MuPDPipeline, batch: int, device: str) -> float:
    x, t, stain = forward_inputs(pipe, batch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def run() -> None:
        with torch.no_grad(), autocast:
            pipe.transformer(x, t, stain, source=x)

    return timed(run, device)


def forward_flops(pipe: MuPDPipeline, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x, t, stain = forward_inputs(pipe, batch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        pipe.transformer(x, t, stain, source=x)
    return float(counter.get_total_flops())


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def measure(config: str, device: str, steps: int, batch: int, **overrides: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    pipe = MuPDPipeline.from_config_name(config, **overrides).to(device)
    pipe.transformer.eval()
    tiles = real_tiles(pipe.tile_size, batch)
    row: dict[str, Any] = {
        "config": config + (f" @{pipe.tile_size}px" if overrides else ""), "device": device,
        "precision": "bf16" if device == "cuda" else "fp32",
        "tile": f"{pipe.tile_size} px @ {pipe.mpp} um/px",
        "params": params_m(pipe.transformer), "codec": params_m(pipe.codec),
        "fwd1_ms": 1e3 * forward_seconds(pipe, 1, device),
        "fwdB_ms": 1e3 * forward_seconds(pipe, batch, device), "batch": batch,
    }
    gen_s = timed(lambda: pipe.generate(num_images=batch, steps=steps, batch_size=batch), device,
                  repeats=1)
    row["gen_tiles_s"] = batch / gen_s
    row["s_per_step_tile"] = gen_s / steps / batch
    row["translate_tiles_s"] = batch / timed(
        lambda: pipe.translate(tiles, ["HER2"], steps=1, batch_size=batch), device, repeats=2)
    row["mfu"] = None
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            row["mfu"] = forward_flops(pipe, batch) / (row["fwdB_ms"] / 1e3) / (peak * 1e12)
    return row


def meta_params(config: str) -> dict[str, Any]:
    spec = model_config(config)
    channels = 3 * spec["codec"]["factor"] ** 2 if spec["codec"]["type"] == "pixel" else 4
    with torch.device("meta"):
        model = MuPDTransformer(latent_channels=channels, text_dim=384, num_genes=785,
                                rna_group_size=spec["rna_group_size"], **spec["transformer"])
    return {"config": config, "device": "meta", "precision": "-",
            "tile": f"{spec['tile_size']} px @ {spec['mpp']} um/px", "params": params_m(model),
            "codec": None, "fwd1_ms": None, "fwdB_ms": None, "batch": None, "gen_tiles_s": None,
            "s_per_step_tile": None, "translate_tiles_s": None, "mfu": None}


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "base", "xl"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        if config == "xl":
            rows.append(meta_params(config))
            continue
        rows.append(measure(config, "cpu", args.steps, args.batch if config == "tiny" else 2))
        if config == "tiny":
            rows.append(measure(config, "cpu", args.steps, 2, tile_size=256))
    gpu_note = "no GPU here"
    if torch.cuda.is_available():
        gpu_note = torch.cuda.get_device_name(0)
        for config in args.configs:
            rows.append(measure(config, "cuda", args.steps, 64 if config == "tiny" else 16))
    print(f"\nMuPD model speed (untrained weights; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; GPU: {gpu_note}; sampling = Euler, "
          f"{args.steps} steps, no guidance; translate = one-step readout, 1 stain)\n")
    print("| config | device | precision | tile | transformer params (M) | codec params (M) "
          "| forward b=1 (ms) | forward b=B (ms) | B | s/step/tile | generate tiles/s "
          "| translate tiles/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['device']} | {r['precision']} | {r['tile']} | {r['params']:.1f} "
              f"| {fmt(r['codec'], '.1f')} | {fmt(r['fwd1_ms'], '.1f')} | {fmt(r['fwdB_ms'], '.1f')} "
              f"| {fmt(r['batch'], 'd')} | {fmt(r['s_per_step_tile'], '.3f')} "
              f"| {fmt(r['gen_tiles_s'], '.2f')} | {fmt(r['translate_tiles_s'], '.2f')} "
              f"| {fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} |")
    if not torch.cuda.is_available():
        print("\nGPU section: no GPU here (bf16 + SDPA tiles/s and MFU run when CUDA is present).")


if __name__ == "__main__":
    main()
