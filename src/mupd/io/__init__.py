"""Slide I/O: open any supported slide as a lazy (Y, X, C) dask pyramid with mpp; write
OME-Zarr / OME-TIFF pyramids; read and write QuPath-style GeoJSON annotations."""

from .geojson import GeoJSONError, Region, ellipse, read_geojson, rectangle, write_geojson
from .omezarr import write_ome_zarr
from .ometiff import write_ome_tiff
from .reader import FORMATS, open_slide
from .slide import Slide

__all__ = [
    "FORMATS",
    "GeoJSONError",
    "Region",
    "Slide",
    "ellipse",
    "open_slide",
    "read_geojson",
    "rectangle",
    "write_geojson",
    "write_ome_tiff",
    "write_ome_zarr",
]
