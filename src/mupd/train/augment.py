"""Stain and geometry augmentation of the training tiles, baked into the latent cache.

A model trained on one patient's slides learns that lab's hematoxylin and eosin as much as the
tissue; HED jitter (each stain's optical density scaled and shifted, Tellez et al. 2018),
brightness / contrast and the eight flips / 90-degree rotations make the stain a nuisance
instead of a signal. The codec is frozen and its latents are cached once, so augmentation
happens there: the cache holds `views` versions of every sample, view 0 the tile itself. A
view's parameters come from (seed, sample name, view) alone, so the H&E source and the marker
map of one record get the same rotation (and the colour jitter goes to the H&E only), and a
rebuilt cache is identical.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import MuPDError


@dataclass
class AugmentSection:
    views: int = 1  # versions of every sample in the latent cache; 1: no augmentation
    hed: float = 0.0  # HED jitter: stain OD x U(1 - hed, 1 + hed) + U(-hed, hed) x HED_SHIFT
    brightness: float = 0.0  # + U(-b, b) x 255 on every channel
    contrast: float = 0.0  # about the tile mean, x U(1 - c, 1 + c)
    dihedral: bool = False  # one of the 8 flips / 90-degree rotations per view
    seed: int = 0

    def check(self) -> None:
        if self.views < 1:
            raise MuPDError(f"data.augment.views must be at least 1 (got {self.views})")
        for name in ("hed", "brightness", "contrast"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise MuPDError(f"data.augment.{name} must be in [0, 1) (got {value})")


#: Optical density the HED shift is scaled to (a typical hematoxylin OD in skimage's HED space).
HED_SHIFT = 0.05


@dataclass(frozen=True)
class View:
    """The parameters of one augmented view of one sample."""

    rotations: int = 0  # quarter turns
    flip: bool = False
    hed_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hed_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    brightness: float = 0.0
    contrast: float = 1.0

    def geometry(self, image: np.ndarray) -> np.ndarray:
        """Flip and rotate any (H, W[, C]) array: images, marker maps and their masks alike."""
        out = np.rot90(image, self.rotations, axes=(0, 1))
        return np.ascontiguousarray(out[:, ::-1] if self.flip else out)

    def colour(self, rgb: np.ndarray) -> np.ndarray:
        """HED jitter then brightness / contrast of an (H, W, 3) uint8 H&E tile."""
        from skimage.color import hed2rgb, rgb2hed

        x = rgb[..., :3]
        if self.hed_scale != (1.0, 1.0, 1.0) or self.hed_shift != (0.0, 0.0, 0.0):
            hed = rgb2hed(x) * np.asarray(self.hed_scale) + np.asarray(self.hed_shift)
            x = hed2rgb(np.clip(hed, 0, None)) * 255
        x = np.asarray(x, np.float32)
        if self.contrast != 1.0 or self.brightness:
            x = (x - x.mean()) * self.contrast + x.mean() + self.brightness * 255
        return np.clip(x, 0, 255).round().astype(np.uint8)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """An RGB tile gets colour and geometry, a marker map (2-D) geometry only."""
        return self.geometry(image if image.ndim == 2 else self.colour(image))


def view_of(section: Optional[AugmentSection], name: str, view: int) -> View:
    """The view `view` of the sample called `name`; view 0 (and no section) is the tile itself."""
    if section is None or view == 0:
        return View()
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([section.seed, key, view])
    d = rng.integers(8) if section.dihedral else 0
    h = section.hed
    return View(
        rotations=int(d % 4), flip=bool(d // 4),
        hed_scale=tuple(float(v) for v in rng.uniform(1 - h, 1 + h, 3)),
        hed_shift=tuple(float(v) for v in rng.uniform(-h, h, 3) * HED_SHIFT),
        brightness=float(rng.uniform(-section.brightness, section.brightness)),
        contrast=float(rng.uniform(1 - section.contrast, 1 + section.contrast)),
    )
