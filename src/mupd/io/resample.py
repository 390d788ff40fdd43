"""The one resampler: every tile the model sees, in training or at inference, is cut by it.

A model trained on tiles cut with one kernel and applied to tiles cut with another sees a
different image at the same place (sharper or softer, shifted by a fraction of a pixel). So
slide tiles (`mupd.regions.source`), `Slide.read_region` / `thumbnail`, spot crops of plain images
(`mupd.data.crops`) and the fine-tune panel's layer crops all come through `resample_window`.

Geometry: output pixel (r, c) is the area sample centred on source edge point
(x + (c + 0.5) * fx, y + (r + 0.5) * fy), where (x, y) is the source edge point of the output's
top-left corner and fx, fy are source pixels per output pixel. Kernel: a Gaussian pre-filter of
sigma (f - 1) / 2 (scikit-image's anti-aliasing rule) when shrinking, then linear interpolation;
an exact copy when the grid is the source's own. Outside the source: `fill`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

#: reads source pixels [y0:y1, x0:x1] (any box, also past the edges: the reader fills them)
WindowReader = Callable[[int, int, int, int], np.ndarray]


def source_window(x: float, y: float, out_w: int, out_h: int, fx: float, fy: float
                  ) -> tuple[int, int, int, int]:
    """The padded source box (x0, y0, x1, y1) that `resample_window` reads for this grid."""
    u0, v0 = x + 0.5 * fx - 0.5, y + 0.5 * fy - 0.5
    pad_x, pad_y = 2 + math.ceil(4 * _sigma(fx)), 2 + math.ceil(4 * _sigma(fy))
    return (math.floor(u0) - pad_x, math.floor(v0) - pad_y,
            math.ceil(u0 + (out_w - 1) * fx) + pad_x + 1, math.ceil(v0 + (out_h - 1) * fy) + pad_y + 1)


def _sigma(f: float) -> float:
    return max(0.0, (f - 1) / 2)


def resample_window(read: WindowReader, x: float, y: float, out_w: int, out_h: int,
                    fx: float, fy: float) -> np.ndarray:
    """(out_h, out_w, C) pixels of the grid described in the module docstring, in the source's
    dtype (integers rounded and clipped)."""
    u0, v0 = x + 0.5 * fx - 0.5, y + 0.5 * fy - 0.5
    if abs(fx - 1) < 1e-9 and abs(fy - 1) < 1e-9 and float(u0).is_integer() and float(v0).is_integer():
        return read(int(u0), int(v0), int(u0) + out_w, int(v0) + out_h)
    ua, va, ub, vb = source_window(x, y, out_w, out_h, fx, fy)
    window = read(ua, va, ub, vb)
    canvas = window.astype(np.float32)
    squeeze = canvas.ndim == 2
    if squeeze:
        canvas = canvas[..., None]
    sx, sy = _sigma(fx), _sigma(fy)
    if sx > 0 or sy > 0:
        canvas = ndimage.gaussian_filter(canvas, sigma=(sy, sx, 0), mode="nearest", truncate=4.0)
    out = ndimage.affine_transform(canvas, (fy, fx, 1.0), offset=(v0 - va, u0 - ua, 0.0),
                                   output_shape=(out_h, out_w, canvas.shape[2]), order=1,
                                   mode="nearest")
    if squeeze:
        out = out[..., 0]
    if np.issubdtype(window.dtype, np.integer):
        info = np.iinfo(window.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(window.dtype)


def array_reader(array: np.ndarray, fill: float | Sequence[float] | None = None) -> WindowReader:
    """A WindowReader over an (H, W[, C]) array (in memory, or lazy and sliceable): `fill` past
    its edges, or with None the edge pixels repeated (for a source with nothing beyond it)."""
    H, W = array.shape[:2]

    def read(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        ys, xs = np.arange(y0, y1), np.arange(x0, x1)
        cy, cx = np.clip(ys, 0, H - 1), np.clip(xs, 0, W - 1)
        block = np.asarray(array[cy[0]:cy[-1] + 1, cx[0]:cx[-1] + 1])
        out = block[np.ix_(cy - cy[0], cx - cx[0])]  # a copy, edge rows / columns repeated
        if fill is not None:
            out[(ys < 0) | (ys >= H)] = fill
            out[:, (xs < 0) | (xs >= W)] = fill
        return out
    return read


def resize_array(pixels: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """The whole array resampled onto an (out_h, out_w) grid covering it exactly."""
    if pixels.shape[:2] == (out_h, out_w):
        return pixels
    H, W = pixels.shape[:2]
    return resample_window(array_reader(pixels), 0.0, 0.0, out_w, out_h, W / out_w, H / out_h)
