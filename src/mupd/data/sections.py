"""HER2ST sections: spots, raw counts, mpp, spot-centred tiles (training stores and evaluation share it).

Patient-level split (data README): patient C (C2..C6, the sections with H&E) trains, patient B
(B4) and patient A (A1, a 2000-px downscale at ~3.2 um/px) are held out entirely.

The legacy ST array has 100 um spots on a 200 um pitch, so each section's mpp is measured from
its own spot grid (200 um / fitted pixels per array step) rather than trusted from a header:
this gives ~0.687 um/px for B and C and ~3.17 um/px for the A1 downscale.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import DataError
from .crops import crop_spots

TRAIN_SECTIONS = ("C2", "C3", "C4", "C5", "C6")
HELDOUT_SECTIONS = ("B4", "A1")
SPOT_PITCH_UM = 200.0
SPOT_DIAMETER_UM = 100.0
#: A1 is a uniform downscale of the 6954-px original; its spot pixels are in the original frame.
_A1_SCALE = 2000 / 6954
#: A pasted annotation thumbnail in the A1 image: x >= 1500, y < 535 of the 2000-px image
#: (measured: the non-black component at the top-right corner; larger than the data README says).
_A1_THUMBNAIL = (1500, 535)


@dataclass
class SpotSection:
    """One section: `spots` (index "XxY": image_x, image_y in this image's pixels) and `counts`
    (same index, raw UMI per gene)."""

    name: str
    image_path: Path
    mpp: float
    spots: pd.DataFrame
    counts: pd.DataFrame

    @property
    def patient(self) -> str:
        return self.name[0]

    def absent_genes(self, genes: Sequence[str]) -> list[str]:
        """Genes with no column in this section's table: no UMI of them was detected here."""
        return [g for g in genes if g not in self.counts.columns]

    def log_cpm(self, genes: Sequence[str]) -> pd.DataFrame:
        """log1p(counts per million) of `genes`; an undetected gene is 0 and a warning names it."""
        depth = self.counts.sum(axis=1).to_numpy(dtype=float)
        table = self._gene_counts(genes)
        cpm = table.to_numpy(dtype=float) / np.maximum(depth, 1)[:, None] * 1e6
        return pd.DataFrame(np.log1p(cpm), index=self.counts.index, columns=list(genes))

    def pseudobulk_log_cpm(self, genes: Sequence[str]) -> pd.Series:
        """Section-level log1p(CPM) of the summed counts: robust to per-spot depth (B4 is shallow)."""
        total = self.counts.to_numpy(dtype=float).sum()
        cpm = self._gene_counts(genes).to_numpy(dtype=float).sum(axis=0) / max(total, 1) * 1e6
        return pd.Series(np.log1p(cpm), index=list(genes))

    def _gene_counts(self, genes: Sequence[str]) -> pd.DataFrame:
        absent = self.absent_genes(genes)
        if absent:
            warnings.warn(f"section {self.name}: genes {absent} have no counts column "
                          "(not detected in this section); counted as 0", stacklevel=3)
        return self.counts.reindex(columns=list(genes), fill_value=0)

    def profile(self, spot: str) -> dict[str, float]:
        """A spot's raw counts as gene -> value, the pipeline's RNA input. Zeros are kept: an
        undetected gene was measured as 0, it is not missing (the tokenizer masks missing ones)."""
        row = self.counts.loc[spot]
        return {str(g): float(v) for g, v in row.items()}

    def tiles(self, spot_ids: Sequence[str], tile_size: int, mpp: float) -> np.ndarray:
        """(N, T, T, 3) uint8 tiles centred on spots, resampled from the section's mpp to `mpp`."""
        centres = self.spots.loc[list(spot_ids), ["image_x", "image_y"]].to_numpy(float)
        box = masked_box(self.name)
        return crop_spots(self.image_path, centres, tile_size, self.mpp, mpp,
                          masked=[box] if box else ())


def her2st_root(data_root: Path) -> Path:
    root = Path(data_root) / "st" / "her2st"
    if not (root / "counts").is_dir():
        raise DataError(f"{root} is not a HER2ST folder (no counts/ inside)")
    return root


def load_section(data_root: Path, name: str) -> SpotSection:
    """Spots with both an image position and counts, in the image's own pixel frame."""
    root = her2st_root(data_root)
    images = sorted((root / "images").glob(f"{name}_HE*"))
    if not images:
        raise DataError(f"section {name}: no H&E image in {root / 'images'}")
    sel = pd.read_csv(root / "spots" / f"{name}_selection.tsv", sep="\t")
    sel = sel[sel["selected"] == 1]
    sel.index = [f"{x}x{y}" for x, y in zip(sel["x"], sel["y"])]
    scale = _A1_SCALE if name == "A1" else 1.0
    spots = pd.DataFrame({"image_x": sel["pixel_x"] * scale, "image_y": sel["pixel_y"] * scale,
                          "array_x": sel["x"], "array_y": sel["y"]}, index=sel.index)
    if name == "A1":
        tx, ty = _A1_THUMBNAIL
        spots = spots[~((spots.image_x > tx) & (spots.image_y < ty))]
    counts = pd.read_csv(root / "counts" / f"{name}.tsv.gz", sep="\t", index_col=0)
    counts = counts.T.groupby(level=0).sum().T if counts.columns.duplicated().any() else counts
    shared = spots.index.intersection(counts.index)
    if len(shared) < 10:
        raise DataError(f"section {name}: only {len(shared)} spots have both a position and counts")
    spots = spots.loc[shared]
    step = np.linalg.lstsq(np.c_[spots.array_x, np.ones(len(spots))], spots.image_x, rcond=None)[0][0]
    return SpotSection(name=name, image_path=images[0], mpp=SPOT_PITCH_UM / abs(step),
                       spots=spots, counts=counts.loc[shared])


def masked_box(name: str) -> Optional[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) image area that is not tissue of the section and must be hidden, if any."""
    if name == "A1":
        tx, ty = _A1_THUMBNAIL
        return (tx, 0, 2000, ty)
    return None


def footprint_mask(tile_size: int, mpp: float, diameter_um: float = SPOT_DIAMETER_UM) -> np.ndarray:
    """Boolean disk of the spot's footprint centred in a tile (the whole tile if the spot is larger)."""
    yy, xx = np.mgrid[:tile_size, :tile_size] + 0.5 - tile_size / 2
    mask = np.hypot(yy, xx) * mpp <= diameter_um / 2
    return mask if mask.any() else np.ones_like(mask)


def sample_spots(section: SpotSection, n: Optional[int], seed: int = 0) -> list[str]:
    """All spots, or a seeded sample of `n` of them (for quick runs)."""
    ids = list(section.spots.index)
    if n is None or n >= len(ids):
        return ids
    rng = np.random.default_rng(seed)
    return [ids[i] for i in sorted(rng.choice(len(ids), size=n, replace=False))]
