"""Spot tables: for one split, every spot's tile (at the model's tile size and mpp), its
handcrafted features, its measured marker expression and its raw RNA profile, built once and
shared by all evaluation tasks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .features import features
from ..data.sections import SpotSection, load_section, sample_spots


@dataclass
class SpotTable:
    sections: list[SpotSection]
    section_of: np.ndarray  # (N,) section name of each spot
    spot_ids: list[str]
    tiles: np.ndarray  # (N, T, T, 3) uint8 at `mpp`
    features: np.ndarray  # (N, F)
    expression: pd.DataFrame  # (N, genes) log1p CPM, index "section:spot"
    mpp: float
    absent_genes: dict[str, list[str]]  # section -> genes without a counts column (set to 0)

    def __len__(self) -> int:
        return len(self.spot_ids)

    def subset(self, index: Sequence[int]) -> "SpotTable":
        index = np.asarray(index, dtype=int)
        names = set(self.section_of[index])
        return SpotTable(
            sections=[s for s in self.sections if s.name in names],
            section_of=self.section_of[index], spot_ids=[self.spot_ids[i] for i in index],
            tiles=self.tiles[index], features=self.features[index],
            expression=self.expression.iloc[index], mpp=self.mpp,
            absent_genes={k: v for k, v in self.absent_genes.items() if k in names})

    def profiles(self, index: Sequence[int]) -> list[dict[str, float]]:
        """Raw-count RNA profiles (gene -> UMI) of the given spots, the generator's input."""
        by_name = {s.name: s for s in self.sections}
        return [by_name[self.section_of[i]].profile(self.spot_ids[i]) for i in index]

    def section_index(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.section_of == name)


def build_spot_table(data_root: Path, sections: Sequence[str], genes: Sequence[str],
                     tile_size: int, mpp: float, max_spots: Optional[int] = None,
                     seed: int = 0) -> SpotTable:
    """Tiles resampled to `mpp` (a slide at another magnification is resampled, not fed as is);
    `max_spots` per section draws a seeded sample for quick runs."""
    loaded, names, ids, tiles, feats, expr, absent = [], [], [], [], [], [], {}
    for name in sections:
        section = load_section(data_root, name)
        chosen = sample_spots(section, max_spots, seed)
        t = section.tiles(chosen, tile_size, mpp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # absent genes are recorded below instead
            e = section.log_cpm(genes).loc[chosen]
        e.index = [f"{name}:{s}" for s in chosen]
        loaded.append(section)
        names += [name] * len(chosen)
        ids += chosen
        tiles.append(t)
        feats.append(features(t, mpp))
        expr.append(e)
        if section.absent_genes(genes):
            absent[name] = section.absent_genes(genes)
    return SpotTable(sections=loaded, section_of=np.asarray(names), spot_ids=ids,
                     tiles=np.concatenate(tiles), features=np.concatenate(feats),
                     expression=pd.concat(expr), mpp=mpp, absent_genes=absent)
