"""`open_slide`: pick the reader from the path (folder, extension, then the file's own header)."""

from __future__ import annotations

from pathlib import Path

from ..errors import SlideError
from .omezarr import is_ome_zarr, open_ome_zarr
from .plain_image import PLAIN_IMAGE_SUFFIXES, open_plain_image
from .slide import MppLike, Slide, as_mpp_pair
from .tiff import open_tiff

TIFF_SUFFIXES = {".svs", ".tif", ".tiff", ".qptiff", ".btf", ".tf8", ".tf2", ".ndpi", ".scn"}
FORMATS = ("svs", "tiff", "ome-tiff", "qptiff", "ndpi", "scn", "image", "ome-zarr")


def open_slide(path: str | Path, mpp: MppLike = None) -> Slide:
    """Open a slide lazily; `mpp` (um/px, number or (x, y)) overrides what the file says."""
    p = Path(path).expanduser()
    as_mpp_pair(mpp, str(p))  # refuse a bad override before touching the file
    if not p.exists():
        raise SlideError(f"slide file {p} does not exist")
    if p.is_dir():
        if is_ome_zarr(p):
            return open_ome_zarr(p, mpp)
        raise SlideError(f"{p} is a folder but not an OME-Zarr image (no zarr.json/.zattrs inside)")
    suffix = p.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return open_tiff(p, mpp)
    if suffix in PLAIN_IMAGE_SUFFIXES:
        return open_plain_image(p, mpp)
    raise SlideError(
        f"unsupported slide format {suffix or '(no extension)'!r} for {p}; supported: Aperio .svs, "
        "pyramidal/OME .tif/.tiff, PerkinElmer .qptiff, Hamamatsu .ndpi, Leica .scn, .jpg/.png images and OME-Zarr folders"
    )
