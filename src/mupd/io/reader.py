"""`open_slide`: pick the reader from the path (folder, extension, then the file's own header).

tiffslide reads the TIFF family; OpenSlide what tiffslide cannot (MIRAX, Ventana, Hamamatsu VMS,
Philips TIFF); wsidicom DICOM folders; PIL plain images; zarr OME-Zarr folders.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SlideError
from .dicom import DICOM_SUFFIXES, is_dicom_file, is_dicom_folder, open_dicom
from .omezarr import is_ome_zarr, open_ome_zarr
from .openslide_backend import OPENSLIDE_SUFFIXES, OPENSLIDE_TIFF_VENDORS, open_openslide, openslide_vendor
from .plain_image import PLAIN_IMAGE_SUFFIXES, open_plain_image
from .slide import MppLike, Slide, as_mpp_pair
from .tiff import open_tiff

TIFF_SUFFIXES = {".svs", ".tif", ".tiff", ".qptiff", ".btf", ".tf8", ".tf2", ".ndpi", ".scn"}
#: TIFF suffixes a Philips or Ventana file may carry (checked with OpenSlide before tiffslide).
_VENDOR_TIFF_SUFFIXES = {".tif", ".tiff"}
FORMATS = ("svs", "tiff", "ome-tiff", "qptiff", "ndpi", "scn", "image", "ome-zarr",
           "mrxs", "bif", "vms", "vmu", "philips-tiff", "dicom")
#: What an unsupported file is told (the README's format table says the same, with the backends).
SUPPORTED = ("Aperio .svs, pyramidal/OME .tif/.tiff, PerkinElmer .qptiff, Hamamatsu .ndpi/.vms/.vmu, "
             "Leica .scn, 3DHistech .mrxs (with its folder), Ventana .bif, Philips TIFF, DICOM WSI folders "
             "(or a .dcm in one), .jpg/.png images and OME-Zarr folders")


def open_slide(path: str | Path, mpp: MppLike = None) -> Slide:
    """Open a slide lazily; `mpp` (um/px, number or (x, y)) overrides what the file says."""
    p = Path(path).expanduser()
    as_mpp_pair(mpp, str(p))  # refuse a bad override before touching the file
    if not p.exists():
        raise SlideError(f"slide file {p} does not exist")
    if p.is_dir():
        if is_ome_zarr(p):
            return open_ome_zarr(p, mpp)
        if is_dicom_folder(p):
            return open_dicom(p, mpp)
        raise SlideError(f"{p} is a folder but not an OME-Zarr image (no zarr.json/.zattrs inside) nor a "
                         "DICOM whole-slide image (no DICOM files inside)")
    suffix = p.suffix.lower()
    if suffix in OPENSLIDE_SUFFIXES:
        return open_openslide(p, mpp)
    if suffix in TIFF_SUFFIXES:
        if suffix in _VENDOR_TIFF_SUFFIXES and openslide_vendor(p) in OPENSLIDE_TIFF_VENDORS:
            return open_openslide(p, mpp)
        return open_tiff(p, mpp)
    if suffix in PLAIN_IMAGE_SUFFIXES:
        return open_plain_image(p, mpp)
    if suffix in DICOM_SUFFIXES or is_dicom_file(p):
        return open_dicom(p, mpp)
    raise SlideError(f"unsupported slide format {suffix or '(no extension)'!r} for {p}; supported: {SUPPORTED}")
