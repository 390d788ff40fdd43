"""How well each latent codec keeps held-out H&E: encode -> decode of tiles of a patient that no
codec was trained on (default: HER2ST B4, `stores/her2st-B4`), against simple baselines measured
in the same run.

Rows: the pixel codec (space-to-depth, exact by construction: a check of the harness), each VAE
folder given (default: the bundled `vae-tiny`, 4x down, and the pretrained `taef2`, 8x down),
bicubic 4x and 8x down / up (3 numbers per 4x4 or 8x8 px block, the block of one latent cell of
each VAE) and the tile's mean colour (the floor). Per tile: MAE in 0-255 grey levels, PSNR (dB) and SSIM
(scikit-image, RGB); mean +/- std over tiles, and time per tile.

    .venv/bin/python benchmarks/bench_codec.py [--vae DIR ...] [--store stores/her2st-B4]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mupd.data.store import PatchStore
from mupd.models.codec import PixelCodec, build_codec
from mupd.paths import RESOURCES
from mupd.train.batches import image_to_tensor

Reconstruct = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) in [-1, 1] -> same


def codec_round_trip(codec) -> Reconstruct:
    return lambda x: codec.decode(codec.encode(x))


def bicubic(factor: int) -> Reconstruct:
    def run(x: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True)
        return F.interpolate(small, size=x.shape[-2:], mode="bicubic")
    return run


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3), keepdim=True).expand_as(x)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def measure(name: str, numbers: str, fn: Reconstruct, tiles: np.ndarray, batch: int = 16) -> dict:
    mae, psnr, ssim, seconds = [], [], [], 0.0
    for start in range(0, len(tiles), batch):
        chunk = tiles[start:start + batch]
        x = torch.stack([image_to_tensor(t) for t in chunk])
        t0 = time.perf_counter()
        y = to_uint8(fn(x))
        seconds += time.perf_counter() - t0
        for ref, out in zip(chunk, y):
            mae.append(np.abs(ref.astype(np.float32) - out.astype(np.float32)).mean())
            psnr.append(peak_signal_noise_ratio(ref, out, data_range=255) if (ref != out).any() else np.inf)
            ssim.append(structural_similarity(ref, out, channel_axis=-1, data_range=255))
    return {"name": name, "numbers": numbers, "mae": np.array(mae), "psnr": np.array(psnr),
            "ssim": np.array(ssim), "ms": 1000 * seconds / len(tiles)}


def fmt(values: np.ndarray, spec: str) -> str:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return "exact"
    return f"{finite.mean():{spec}} ± {finite.std():{spec}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="stores/her2st-B4", help="held-out patch store")
    parser.add_argument("--vae", action="append", default=None,
                        help="local diffusers VAE folder (default: the bundled vae-tiny and taef2)")
    parser.add_argument("--tiles", type=int, default=200, help="tiles, evenly spread over the store")
    args = parser.parse_args()
    store = PatchStore(args.store)
    rows = np.unique(np.linspace(0, len(store) - 1, min(args.tiles, len(store))).astype(int))
    tiles = np.stack([np.asarray(store.tiles[int(r)]) for r in rows])
    patients = sorted({str(p) for p in np.asarray(store.manifest["patient"])[rows]})
    folders = args.vae or [str(RESOURCES / "models" / name) for name in ("vae-tiny", "taef2")]
    runs = [measure("pixel codec (space-to-depth 4)", "48 / 16 px", codec_round_trip(PixelCodec(4)), tiles)]
    for folder in folders:
        codec = build_codec({"type": "vae", "path": folder})
        numbers = f"{codec.latent_channels} / {codec.downsample ** 2} px"
        runs.append(measure(f"VAE {folder}", numbers, codec_round_trip(codec), tiles))
    runs += [measure("bicubic 4x down / up (baseline)", "3 / 16 px", bicubic(4), tiles),
             measure("bicubic 8x down / up (baseline)", "3 / 64 px", bicubic(8), tiles),
             measure("tile mean colour (floor)", f"3 / {tiles.shape[1] ** 2} px", mean_colour, tiles)]
    print(f"\nHeld-out reconstruction: {len(tiles)} tiles of {args.store} "
          f"({tiles.shape[1]} px, patients {', '.join(patients)}); mean ± std over tiles\n")
    print("| codec | numbers kept | MAE (grey levels) | PSNR (dB) | SSIM | ms / tile |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['name']} | {r['numbers']} | {fmt(r['mae'], '.2f')} | {fmt(r['psnr'], '.2f')} "
              f"| {fmt(r['ssim'], '.3f')} | {r['ms']:.2f} |")
    base = {r["name"].split()[1]: r for r in runs if r["name"].startswith("bicubic")}
    for r in runs:
        if r["name"].startswith("VAE"):
            factor = r["numbers"].split("/ ")[1]
            same = base["8x" if factor == "64 px" else "4x"]
            print(f"\n{r['name']}: MAE ratio to bicubic at the same block size "
                  f"({same['name'].split()[1]}) {r['mae'].mean() / same['mae'].mean():.2f} (< 1: better)")


if __name__ == "__main__":
    main()
