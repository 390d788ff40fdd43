"""Large plain images (JPEG/PNG/...): decoded once on first use, exposed as chunked dask levels.

A baseline JPEG cannot be decoded piecewise, so the first chunk anyone asks for decodes the
whole image (cached); nothing is decoded at open time. Lower levels are PIL box reductions.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Optional

import dask.array as da
import numpy as np
from PIL import Image

from ..errors import SlideError
from .slide import MppLike, Slide

PLAIN_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
#: Largest plain image accepted (pixels); PIL's own bomb limit is lifted only up to this.
MAX_PLAIN_IMAGE_PIXELS = 2**31 // 2
CHUNK = 512
#: Smallest level's longer side; levels halve until they fit.
MIN_LEVEL_SIZE = 1024
_PIL_LIMIT_LOCK = threading.Lock()


def _open_pil(path: Path) -> Image.Image:
    """Image.open with the decompression-bomb limit raised to our bound, for this call only."""
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_PLAIN_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(path)
        except Image.DecompressionBombError:
            raise SlideError(f"{path} has more than {MAX_PLAIN_IMAGE_PIXELS} pixels; convert it to a "
                             "pyramidal OME-TIFF first") from None
        except Exception as exc:
            raise SlideError(f"cannot open {path} as an image ({type(exc).__name__}: {exc})") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _mode_layout(path: Path, mode: str) -> tuple[str, list[str], bool]:
    """(PIL mode to decode to, channel names, is_rgb)."""
    if mode in ("RGB", "RGBA", "P", "PA", "LA", "CMYK", "YCbCr", "1"):
        return "RGB", ["R", "G", "B"], True
    if mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
        return mode, ["gray"], False
    raise SlideError(f"{path} uses image mode {mode!r}, which is not supported (use RGB or grayscale)")


class _DecodedImage:
    """Array-like (H, W, C) whose pixels are decoded on the first access, then kept."""

    def __init__(self, path: Path, mode: str, shape: tuple[int, int, int], dtype: np.dtype,
                 factor: int = 1, base: Optional["_DecodedImage"] = None) -> None:
        self.path, self.mode, self.shape, self.dtype = path, mode, shape, np.dtype(dtype)
        self.ndim = 3
        self.factor, self.base = factor, base
        self._pixels: Optional[np.ndarray] = None
        self._lock = threading.Lock()

    def _pil(self) -> Image.Image:
        im = _open_pil(self.path)
        try:
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")  # transparent background is slide background: white
                flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(flat, rgba).convert("RGB")
            return im.convert(self.mode) if im.mode != self.mode else im.copy()
        except OSError as exc:
            raise SlideError(f"cannot decode {self.path}: {exc} (truncated or corrupt image?)") from exc
        finally:
            im.close()

    def pixels(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                if self.base is None:
                    img = self._pil()
                else:
                    img = Image.fromarray(self.base.pixels().squeeze(-1) if self.shape[2] == 1
                                          else self.base.pixels()).reduce(self.factor // self.base.factor)
                arr = np.asarray(img)
                self._pixels = arr.reshape(arr.shape[0], arr.shape[1], -1)
            return self._pixels

    def __getitem__(self, key) -> np.ndarray:
        return self.pixels()[key]


def open_plain_image(path: Path, mpp: MppLike = None) -> Slide:
    im = _open_pil(path)
    try:
        width, height, mode = im.width, im.height, im.mode
    finally:
        im.close()
    decode_mode, names, is_rgb = _mode_layout(path, mode)
    dtype = {"I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16, "I": np.int32,
             "F": np.float32}.get(decode_mode, np.uint8)
    n_channels = len(names)
    base = _DecodedImage(path, decode_mode, (height, width, n_channels), dtype)
    arrays = [base]
    factor = 2
    while max(arrays[-1].shape[:2]) > MIN_LEVEL_SIZE:
        h, w = -(-height // factor), -(-width // factor)  # PIL's reduce rounds up
        arrays.append(_DecodedImage(path, decode_mode, (h, w, n_channels), dtype, factor=factor, base=base))
        factor *= 2
    stamp = path.stat().st_mtime_ns
    levels = [da.from_array(a, chunks=(CHUNK, CHUNK, n_channels), asarray=False, fancy=False,
                            meta=np.empty((0, 0, n_channels), dtype), name=f"mupd-image-{path}-{a.factor}-{stamp}")
              for a in arrays]
    readers = [(lambda a: (lambda y0, y1, x0, x1: a.pixels()[y0:y1, x0:x1]))(a) for a in arrays]
    return Slide(path, "image", levels, readers, names, is_rgb, file_mpp=None, user_mpp=mpp)
