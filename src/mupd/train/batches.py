"""Training samples and the collate that turns them into the pipeline's batch.

Every data source (a patch store, a folder of stain pairs, captioned tiles, ST spots) is
reduced to a list of `Sample`s; `collate` is the single place that knows the model's batch
layout. Modality dropout is the pipeline's job, so conditions are passed through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import DataError


@dataclass
class Sample:
    target: Optional[np.ndarray]  # (H, W, 3) uint8 RGB stain image, or (H, W) float marker map
    # in [0, 1]; None when `latents` carries it
    stain: str
    source: Optional[np.ndarray] = None  # (H, W, 3) uint8 H&E for translation
    text: Optional[str] = None
    rna: Optional[dict[str, float]] = None  # gene symbol -> value
    rna_normalized: bool = False  # False: raw counts (the tokenizer applies CPM + log1p)
    name: str = ""  # where it came from, for error messages (and the latent cache's image key)
    latents: Optional[dict[str, np.ndarray]] = None  # cached codec latents (C, h, w) of
    # "target" and, for translation, "source", in place of the pixels (see train/latents.py)
    target_valid: Optional[np.ndarray] = None  # (H, W) bool: where the target was measured
    # (a marker map from spot RNA is measured inside spot footprints only); None: everywhere
    genes: Optional[np.ndarray] = None  # (G,) the tile's spot RNA (log1p CPM, NaN unmeasured) over
    # the model's gene readout panel: the target of `models.readout` (translation samples)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 or (H, W) [0, 1] float -> (3, H, W) float in [-1, 1]."""
    if image.ndim == 2:  # a marker map: same intensity on the three channels
        x = torch.from_numpy(np.array(image, dtype=np.float32)).clamp(0, 1)
        return (x * 2 - 1).expand(3, *x.shape).contiguous()
    x = torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


def _stack(images: Sequence[np.ndarray], what: str, names: Sequence[str]) -> torch.Tensor:
    shapes = {im.shape[:2] for im in images}
    if len(shapes) > 1:
        raise DataError(f"{what} tiles of different sizes {sorted(shapes)} in one batch "
                        f"({', '.join(names)})")
    return torch.stack([image_to_tensor(im) for im in images])


def _images(samples: Sequence[Sample], names: Sequence[str]) -> dict[str, Any]:
    """Pixels: "target" and, when any sample has one, "source" (zero where absent)."""
    out: dict[str, Any] = {"target": _stack([s.target for s in samples], "target", names)}
    with_source = [s.source is not None for s in samples]
    if any(with_source):
        blank = next(s.source for s in samples if s.source is not None) * 0
        out["source"] = _stack([s.source if s.source is not None else blank for s in samples],
                               "source", names)
    return out


def _latents(samples: Sequence[Sample], names: Sequence[str]) -> dict[str, Any]:
    """Cached latents: "target_latents" and, when any sample has one, "source_latents"."""
    out: dict[str, Any] = {}
    for role in ("target", "source"):
        found = [s.latents.get(role) for s in samples]  # type: ignore[union-attr]
        if all(z is None for z in found):
            continue
        shapes = {z.shape for z in found if z is not None}
        if len(shapes) > 1:
            raise DataError(f"{role} latents of different shapes {sorted(shapes)} in one batch "
                            f"({', '.join(names)})")
        blank = np.zeros(shapes.pop(), dtype=np.float32)
        out[f"{role}_latents"] = torch.stack([torch.from_numpy(np.array(
            z if z is not None else blank, dtype=np.float32)) for z in found])
    return out


def _validity(samples: Sequence[Sample], names: Sequence[str]) -> torch.Tensor:
    """(B, 1, H, W) float: 1 where the target counts in the loss (all of a sample without a mask)."""
    shapes = {s.target_valid.shape for s in samples if s.target_valid is not None}
    if len(shapes) > 1:
        raise DataError(f"target masks of different sizes {sorted(shapes)} in one batch "
                        f"({', '.join(names)})")
    shape = shapes.pop()
    return torch.stack([torch.from_numpy(np.array(
        s.target_valid if s.target_valid is not None else np.ones(shape, bool), dtype=np.float32))
        for s in samples])[:, None]


def collate(samples: Sequence[Sample], rna_tokenizer: Any = None) -> dict[str, Any]:
    """The pipeline's training batch: pixels ("target", "source") or, for samples from the latent
    cache, latents ("target_latents", "source_latents"); samples without a source get a zero one,
    flagged absent."""
    names = [s.name for s in samples]
    cached = [s.latents is not None for s in samples]
    if any(cached) and not all(cached):
        raise DataError(f"a batch mixes cached latents and pixels ({', '.join(names)})")
    batch: dict[str, Any] = _latents(samples, names) if all(cached) else _images(samples, names)
    batch["stain"] = [s.stain for s in samples]
    if any(s.target_valid is not None for s in samples):
        batch["target_valid"] = _validity(samples, names)
    with_source = [s.source is not None or bool(s.latents and "source" in s.latents)
                   for s in samples]
    if any(with_source) and not all(with_source):  # multi-task batch: which samples have one
        batch["source_present"] = torch.tensor(with_source)
    if any(s.genes is not None for s in samples):
        width = {len(s.genes) for s in samples if s.genes is not None}
        if len(width) > 1:
            raise DataError(f"gene readout targets of different lengths {sorted(width)} in one batch "
                            f"({', '.join(names)})")
        blank = np.full(width.pop(), np.nan, dtype=np.float32)
        batch["genes"] = torch.stack([torch.from_numpy(np.asarray(
            s.genes if s.genes is not None else blank, dtype=np.float32)) for s in samples])
    if any(s.text for s in samples):
        batch["text"] = [s.text or None for s in samples]
    if any(s.rna is not None for s in samples):
        if rna_tokenizer is None:
            raise DataError("samples carry RNA but the model has no RNA tokenizer")
        aligned = {i: rna_tokenizer.align(s.rna, normalized=s.rna_normalized)[:2]
                   for i, s in enumerate(samples) if s.rna is not None}
        v0, m0 = next(iter(aligned.values()))
        absent = (np.zeros_like(np.asarray(v0)), np.zeros(np.asarray(m0).shape, dtype=bool))
        pairs = [aligned.get(i, absent) for i in range(len(samples))]
        values = [torch.as_tensor(np.asarray(v), dtype=torch.float32) for v, _ in pairs]
        masks = [torch.as_tensor(np.asarray(m), dtype=torch.bool) for _, m in pairs]
        batch["rna_values"] = torch.stack(values)
        batch["rna_mask"] = torch.stack(masks)
    return batch


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}
