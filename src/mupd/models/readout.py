"""The multi-gene readout: spot RNA over a whole gene panel, read from the H&E by one head.

Why: trained one marker at a time through the diffusion output, the readout of the bundled
model collapsed to one cellularity-like map for every marker (patient-C validation: C6 mean
marker r 0.074 against hematoxylin density's 0.073 and ridge's 0.210). A linear head on the
transformer's tokens that predicts every gene of the panel at once cannot collapse that way:
each gene has its own weights, and every translation sample teaches all of them.

Training: the head's token predictions are averaged over the tile's central spot footprint
and compared with that spot's standardised log1p CPM (genes a spot did not measure are
masked). Inference: a marker's map is its gene's token predictions, put back into log1p CPM,
divided by the marker's scale (the store's, as for the training maps) and clipped to [0, 1].
The spec (genes, training mean and std, marker scales, loss weight) is fitted on the training
rows of the store and saved in the model config, so a model folder carries it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError

#: Loss weight of the gene readout beside the flow-matching loss (standardised units).
WEIGHT = 1.0


@dataclass(frozen=True)
class GeneReadout:
    genes: tuple[str, ...]
    mean: tuple[float, ...]  # training mean of each gene's log1p CPM
    std: tuple[float, ...]  # training std (genes that never vary: 0, masked out of the loss)
    scales: Mapping[str, float]  # marker name -> log1p CPM that maps to 1 (the store's scale)
    marker_genes: Mapping[str, str]  # marker name -> its gene in `genes`
    weight: float = WEIGHT

    @classmethod
    def fit(cls, genes: Sequence[str], values: np.ndarray, scales: Mapping[str, float],
            marker_genes: Mapping[str, str], weight: float = WEIGHT) -> "GeneReadout":
        """From training spots' log1p CPM `values` (spots, genes), NaN where not measured."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != len(genes):
            raise ModelError(f"gene readout: values of shape {values.shape} for {len(genes)} genes")
        measured = np.isfinite(values)
        count = measured.sum(axis=0)
        if not count.any():
            raise ModelError("gene readout: no training spot measured any gene of the panel")
        filled = np.where(measured, values, 0.0)
        mean = filled.sum(axis=0) / np.maximum(count, 1)
        var = (np.where(measured, values - mean, 0.0) ** 2).sum(axis=0) / np.maximum(count, 1)
        known = {m: g for m, g in marker_genes.items() if g in genes and m in scales}
        return cls(tuple(map(str, genes)), tuple(mean.tolist()), tuple(np.sqrt(var).tolist()),
                   {m: float(scales[m]) for m in known}, known, float(weight))

    @classmethod
    def from_config(cls, spec: Optional[Mapping[str, Any]]) -> Optional["GeneReadout"]:
        if not spec:
            return None
        try:
            readout = cls(tuple(spec["genes"]), tuple(spec["mean"]), tuple(spec["std"]),
                          dict(spec["scales"]), dict(spec["marker_genes"]),
                          float(spec.get("weight", WEIGHT)))
        except (KeyError, TypeError) as exc:
            raise ModelError(f"model config gene_readout is incomplete ({exc}); it needs genes, "
                             f"mean, std, scales and marker_genes") from None
        if not len(readout.genes) == len(readout.mean) == len(readout.std):
            raise ModelError(f"model config gene_readout: {len(readout.genes)} genes but "
                             f"{len(readout.mean)} means and {len(readout.std)} stds")
        return readout

    def to_config(self) -> dict[str, Any]:
        spec = asdict(self)
        return {**spec, "genes": list(self.genes), "mean": list(self.mean), "std": list(self.std),
                "scales": dict(self.scales), "marker_genes": dict(self.marker_genes)}

    def reads(self, marker: str) -> bool:
        return marker in self.marker_genes

    def standardize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, G) log1p CPM, NaN unmeasured -> (standardised values, mask of usable entries)."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=values.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=values.device)
        mask = torch.isfinite(values) & (std > 0)
        z = torch.where(mask, (values.float() - mean) / std.clamp_min(1e-6), torch.zeros_like(mean))
        return z, mask

    def marker_maps(self, tokens: torch.Tensor, marker: str, tile_size: int) -> torch.Tensor:
        """One marker's map from the head's standardised token predictions `tokens` (B, N, G):
        (B, T, T) in [0, 1] on the tile's pixels (bilinear between token centres)."""
        g = self.genes.index(self.marker_genes[marker])
        level = tokens[..., g].float() * self.std[g] + self.mean[g]
        b, n = level.shape
        side = int(round(n ** 0.5))
        grid = (level / self.scales[marker]).clamp(0, 1).reshape(b, 1, side, side)
        return F.interpolate(grid, size=(tile_size, tile_size), mode="bilinear",
                             align_corners=False)[:, 0].clamp(0, 1)


def spot_weights(footprint: np.ndarray, token_px: int) -> torch.Tensor:
    """(N,) weights of the tokens over a tile's central spot `footprint` (T, T) bool, summing
    to 1: how the head's token predictions are pooled into the spot's prediction."""
    mask = torch.from_numpy(np.asarray(footprint, dtype=np.float32))[None, None]
    share = F.avg_pool2d(mask, token_px).flatten()
    return share / share.sum().clamp_min(1e-8)


def gene_loss(tokens: torch.Tensor, values: torch.Tensor, weights: torch.Tensor,
              readout: GeneReadout, rows: torch.Tensor) -> torch.Tensor:
    """Masked MSE between the footprint-pooled head output and the standardised spot RNA, over
    the samples `rows` (B,) bool (the translation samples read at t = 1); 0 when none."""
    z, mask = readout.standardize(values)
    mask = mask & rows[:, None]
    pooled = (tokens.float() * weights.to(tokens.device)[None, :, None]).sum(dim=1)
    n = mask.sum()
    if not n:
        return tokens.sum() * 0.0
    return (((pooled - z) ** 2) * mask).sum() / n
