"""Optional stain normalisation at inference: a slide's H&E colours mapped onto the training data's.

A model trained on one lab's staining reads another lab's darker hematoxylin or paler eosin as
different tissue. Macenko (stain vectors and concentration scale in optical density) or Reinhard
(mean and spread in Lab) estimate the slide's stain once and map it onto a reference. The
estimates come from torchstain (`NumpyMacenkoNormalizer` / `NumpyReinhardNormalizer.fit`); the
map itself is applied here with fixed parameters because torchstain re-estimates the source on
every call: fitted per tile, two overlapping tiles would get different colours and the blend
would show seams. So: fit once on a preview of the whole region, then the same map on every tile.

The default reference (`src/mupd/resources/stain_reference.json`) is the training sections' own stain
(HER2ST patient C, written by `python -m mupd.stain_norm`); any H&E image can serve instead.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import ConditionError, MuPDError
from .paths import RESOURCES

METHODS = ("macenko", "reinhard")
STAIN_REFERENCE = RESOURCES / "stain_reference.json"
#: Transmitted light intensity and the optical density below which a pixel is glass (Macenko's).
IO, BETA = 240.0, 0.15
#: Stained pixels a Macenko estimate needs; fewer give stain vectors of noise.
MIN_STAINED_PIXELS = 500


def check_method(method: Optional[str]) -> Optional[str]:
    """The method name lower-cased, None / "" / "none" for no normalisation; else a clear error."""
    if method is None or str(method).lower() in ("", "none"):
        return None
    name = str(method).lower()
    if name not in METHODS:
        raise ConditionError(f"stain normalisation {method!r} unknown; use {', '.join(METHODS)} or none")
    return name


def _pixels(image: np.ndarray, what: str) -> np.ndarray:
    pixels = np.asarray(image)
    if pixels.ndim < 2 or pixels.shape[-1] < 3:
        raise ConditionError(f"stain normalisation: {what} must be RGB pixels (got shape {pixels.shape})")
    return np.ascontiguousarray(pixels[..., :3].reshape(-1, 3)).astype(np.uint8)


def stain_stats(method: str, image: np.ndarray, what: str = "the image") -> dict[str, list]:
    """The stain of `image` as `method` describes it (torchstain's estimate)."""
    method = check_method(method)
    pixels = _pixels(image, what)
    od = -np.log((pixels.astype(np.float64) + 1) / IO)
    tissue = pixels[~np.any(od < BETA, axis=1)]  # glass says nothing about the stain
    if len(tissue) < MIN_STAINED_PIXELS:
        raise ConditionError(
            f"stain normalisation ({method}): {what} has {len(tissue)} stained pixels, too few "
            f"(< {MIN_STAINED_PIXELS}) to estimate its stain; choose a region with tissue")
    if method == "macenko":
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

        estimator = NumpyMacenkoNormalizer()
        estimator.fit(tissue[None], Io=IO, beta=BETA)
        return {"stain_matrix": estimator.HERef.tolist(), "max_concentrations": estimator.maxCRef.tolist()}
    from torchstain.numpy.normalizers import NumpyReinhardNormalizer

    estimator = NumpyReinhardNormalizer()
    estimator.fit(tissue[None])
    return {"lab_mean": np.asarray(estimator.target_means).tolist(),
            "lab_std": np.asarray(estimator.target_stds).tolist()}


def load_reference(method: str, path: Optional[str | Path] = None) -> dict[str, list]:
    """Reference stain: from an H&E image file, or the bundled training-data reference."""
    method = check_method(method)
    path = Path(path) if path is not None else STAIN_REFERENCE
    if path.suffix.lower() == ".json":
        try:
            return json.loads(path.read_text())[method]
        except (OSError, ValueError, KeyError) as exc:
            raise MuPDError(f"stain reference {path}: cannot read its {method} entry ({exc})") from None
    from PIL import Image

    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise MuPDError(f"stain reference {path}: not a readable image ({exc})") from None
    return stain_stats(method, image, f"reference image {path}")


@dataclass(frozen=True)
class StainNormalization:
    """A fitted map from one region's stain onto a reference; applied to any of its tiles."""

    method: str
    source: dict[str, list]
    target: dict[str, list]
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """(..., 3) uint8 -> the same shape, normalised."""
        tiles = np.asarray(tiles)
        shape = tiles.shape
        pixels = _pixels(tiles, "the tiles")
        out = self._macenko(pixels) if self.method == "macenko" else self._reinhard(pixels)
        return out.reshape(shape[:-1] + (3,))

    def _macenko(self, pixels: np.ndarray) -> np.ndarray:
        if "unmix" not in self._cache:
            he = np.asarray(self.source["stain_matrix"], np.float64)
            scale = np.asarray(self.source["max_concentrations"]) / np.asarray(self.target["max_concentrations"])
            # OD -> source concentrations -> rescaled -> reference OD, as one 3x3 matrix
            self._cache["unmix"] = (np.asarray(self.target["stain_matrix"]) @ np.diag(1 / scale)
                                    @ np.linalg.pinv(he)).T
        od = -np.log((pixels.astype(np.float64) + 1) / IO)
        return np.clip(IO * np.exp(-(od @ self._cache["unmix"])), 0, 255).round().astype(np.uint8)

    def _reinhard(self, pixels: np.ndarray) -> np.ndarray:
        from torchstain.numpy.utils.lab2rgb import lab2rgb
        from torchstain.numpy.utils.rgb2lab import rgb2lab
        from torchstain.numpy.utils.split import lab_merge, lab_split

        # torchstain's statistics live in its lab_split scaling; so does the map
        channels = lab_split(rgb2lab(pixels[None].astype(np.float32) / 255))
        mapped = [(c - mu) / (sd if sd > 0 else 1.0) * sd_t + mu_t for c, mu, sd, mu_t, sd_t in zip(
            channels, self.source["lab_mean"], self.source["lab_std"],
            self.target["lab_mean"], self.target["lab_std"])]
        return np.clip(lab2rgb(lab_merge(*mapped))[0] * 255, 0, 255).round().astype(np.uint8)

    def to_dict(self) -> dict[str, Any]:
        """For layer metadata: what was done to the source before the model saw it."""
        return {"method": self.method, "source": self.source, "target": self.target}


def fit_normalization(method: Optional[str], preview: np.ndarray,
                      reference: Optional[str | Path] = None,
                      what: str = "the region") -> Optional[StainNormalization]:
    """The map of `preview`'s stain (a low-resolution view of the whole region) onto the
    reference; None when `method` is none."""
    method = check_method(method)
    if method is None:
        return None
    return StainNormalization(method, stain_stats(method, preview, what), load_reference(method, reference))


def write_reference(images: Sequence[str | Path], out: str | Path, max_side: int = 2048) -> dict[str, Any]:
    """Both methods' reference stats from the tissue of `images` (each shrunk to `max_side`)."""
    from PIL import Image

    pixels = []
    for path in images:
        with Image.open(path) as im:
            im.thumbnail((max_side, max_side))
            rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
        pixels.append(rgb)
    every = np.concatenate(pixels)
    reference = {m: stain_stats(m, every, "the reference images") for m in METHODS}
    reference["_doc"] = (f"Stain of {', '.join(Path(p).name for p in images)} (tissue pixels, "
                         f"images shrunk to {max_side} px) by mupd.stain_norm.write_reference")
    Path(out).write_text(json.dumps(reference, indent=1) + "\n")
    return reference


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mupd.stain_norm",
                                     description="write a stain reference from H&E images")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--out", default=str(STAIN_REFERENCE))
    args = parser.parse_args(argv)
    print(json.dumps(write_reference(args.images, args.out), indent=1))


if __name__ == "__main__":
    main()
