"""Slides tiffslide does not read, through OpenSlide (the `openslide-bin` wheel): 3DHistech MIRAX
(.mrxs), Ventana BIF, Hamamatsu VMS/VMU and Philips TIFF.

MRXS and VMS keep their pixels in companion files (a folder of Data*.dat, or JPEGs beside the
.vms); those are checked before OpenSlide is asked, so a slide copied without them says what is
missing. OpenSlide paints regions with alpha (no tile = transparent): they are composited onto the
slide's background colour, white unless the file says otherwise. A lower level whose downsample is
not an integer is painted by OpenSlide at a sub-pixel offset (up to 0.5/downsample px), so its
tiles are interpolated, not the stored pixels; level 0 and power-of-two levels are exact.
"""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import SlideError
from .slide import MppLike, Slide, check_level_size, lazy_level

#: Suffixes that always go to OpenSlide.
OPENSLIDE_SUFFIXES = {".mrxs", ".bif", ".vms", ".vmu"}
#: OpenSlide vendors of files with a TIFF suffix that tiffslide would misread (Philips' padded
#: levels and XML pixel size; Ventana's overlapping tiles), so they go to OpenSlide too.
OPENSLIDE_TIFF_VENDORS = {"philips", "ventana"}
#: Our format name for each OpenSlide vendor (the names the tiffslide path uses where they overlap);
#: Hamamatsu's is the file's suffix (vms, vmu; ndpi goes through tiffslide).
VENDOR_FORMATS = {"mirax": "mrxs", "ventana": "bif", "philips": "philips-tiff", "aperio": "svs",
                  "generic-tiff": "tiff", "leica": "scn"}
#: Chunk side when OpenSlide does not report a level's tile size (VMS JPEGs have none).
DEFAULT_CHUNK = 512


def openslide_vendor(path: Path) -> Optional[str]:
    """OpenSlide's vendor name for `path` ('philips', 'aperio', ...) or None if it cannot read it."""
    try:
        import openslide
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # no OpenSlide library, or a file it cannot even sniff: not ours to judge here
        return None


def open_openslide(path: Path, mpp: MppLike = None) -> Slide:
    try:
        import openslide
    except (ImportError, OSError) as exc:
        raise SlideError(f"cannot open {path}: OpenSlide is not available ({exc}); install the "
                         "openslide-bin and openslide-python wheels") from exc
    data_bytes = _check_companions(path)
    try:
        osr = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{path} is not a slide OpenSlide can read (no MIRAX, Ventana, Hamamatsu or "
                         "Philips structure found); is it truncated or renamed?") from None
    except openslide.OpenSlideError as exc:
        raise SlideError(f"cannot open {path}: {exc}; the file or its companion files may be "
                         "truncated or corrupt") from exc
    try:
        return _build(osr, path, mpp, data_bytes)
    except Exception:
        osr.close()
        raise


def _build(osr, path: Path, user_mpp: MppLike, data_bytes: int) -> Slide:
    props = osr.properties
    vendor = props.get("openslide.vendor", "")
    kind = path.suffix.lower().lstrip(".") if vendor == "hamamatsu" else VENDOR_FORMATS.get(vendor, vendor)
    background = _background(props.get("openslide.background-color"))
    levels, readers = [], []
    for i, ((w, h), ds) in enumerate(zip(osr.level_dimensions, osr.level_downsamples)):
        tile = (int(props.get(f"openslide.level[{i}].tile-height", DEFAULT_CHUNK)),
                int(props.get(f"openslide.level[{i}].tile-width", DEFAULT_CHUNK)))
        check_level_size(path, i, (h, w, 3), (*tile, 3), np.uint8, data_bytes)
        read = _reader(osr, i, float(ds), background)
        levels.append(lazy_level(read, (h, w, 3), tile, np.uint8))
        readers.append(read)
    mx, my = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
    file_mpp = (float(mx), float(my)) if mx and my and float(mx) > 0 and float(my) > 0 else None
    objective = props.get("openslide.objective-power")
    associated = {}
    for name in osr.associated_images:
        try:
            associated[name] = _composite(np.asarray(osr.associated_images[name]), background)
        except Exception:  # a broken label/macro must not stop the slide from opening
            continue
    return Slide(path, kind, levels, readers, ["R", "G", "B"], True, file_mpp=file_mpp, user_mpp=user_mpp,
                 objective_power=float(objective) if objective else None, associated_images=associated,
                 channel_colors=["FF0000", "00FF00", "0000FF"], close=osr.close)


def _reader(osr, level: int, downsample: float, background: np.ndarray):
    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        location = (int(round(x0 * downsample)), int(round(y0 * downsample)))  # OpenSlide takes level 0
        rgba = np.asarray(osr.read_region(location, level, (x1 - x0, y1 - y0)))
        return _composite(rgba, background)

    return read


def _composite(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """RGB of an (h, w, 4) non-premultiplied RGBA region over the background colour."""
    if rgba.shape[-1] == 3:
        return rgba
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if (alpha == 255).all():
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    mixed = (rgb.astype(np.uint32) * a + background.astype(np.uint32) * (255 - a) + 127) // 255
    return mixed.astype(np.uint8)


def _background(hex_color: Optional[str]) -> np.ndarray:
    try:
        return np.array([int(hex_color[i:i + 2], 16) for i in (0, 2, 4)], dtype=np.uint8)
    except (TypeError, ValueError, IndexError):
        return np.array([255, 255, 255], dtype=np.uint8)


def _check_companions(path: Path) -> int:
    """Bytes of the slide's pixel data (the file plus its companions); refuses a slide whose
    companions are missing, naming them."""
    suffix = path.suffix.lower()
    if suffix == ".mrxs":
        files = _mrxs_files(path)
    elif suffix in (".vms", ".vmu"):
        files = _vms_files(path)
    else:
        files = []
    return path.stat().st_size + sum(f.stat().st_size for f in files)


def _read_ini(path: Path, what: str) -> configparser.ConfigParser:
    ini = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        ini.read_string(path.read_text(encoding="utf-8-sig", errors="replace"))
    except configparser.Error as exc:
        raise SlideError(f"{what} {path} cannot be parsed ({type(exc).__name__}); it may be truncated") from None
    return ini


def _mrxs_files(path: Path) -> list[Path]:
    folder = path.with_suffix("")
    if not folder.is_dir():
        raise SlideError(f"{path}: its companion folder {folder.name}/ (Slidedat.ini, Index.dat, Data*.dat) "
                         f"is missing from {path.parent}; a MIRAX slide is the .mrxs file plus that folder, "
                         "copy both")
    slidedat = folder / "Slidedat.ini"
    if not slidedat.is_file():
        raise SlideError(f"{path}: {folder.name}/Slidedat.ini is missing; the companion folder is incomplete")
    ini = _read_ini(slidedat, f"MIRAX slide {path}:")
    try:
        names = [ini.get("HIERARCHICAL", "INDEXFILE")]
        names += [ini.get("DATAFILE", f"FILE_{i}") for i in range(ini.getint("DATAFILE", "FILE_COUNT"))]
    except (configparser.Error, ValueError) as exc:
        raise SlideError(f"{path}: {folder.name}/Slidedat.ini lacks its file list ({exc}); it may be truncated") from None
    files = [folder / n for n in names]
    _refuse_missing(path, files, folder.name + "/")
    return files


def _vms_files(path: Path) -> list[Path]:
    ini = _read_ini(path, "Hamamatsu slide")
    section = next(iter(ini.sections()), None)
    if section is None:
        raise SlideError(f"{path} is not a Hamamatsu VMS/VMU file (no [Virtual Microscope Specimen] section)")
    names = [v for k, v in ini.items(section) if k.startswith(("imagefile", "mapfile", "optimisationfile")) and v]
    files = [path.parent / n.strip() for n in names]
    _refuse_missing(path, files, "")
    return files


def _refuse_missing(path: Path, files: list[Path], where: str) -> None:
    """Refuse a slide whose listed companion files are absent or empty (a cut copy)."""
    bad = [f for f in files if not f.is_file() or f.stat().st_size == 0]
    if bad:
        shown = ", ".join(where + f.name + (" (empty)" if f.is_file() else " (absent)") for f in bad[:5])
        raise SlideError(f"{path}: {len(bad)} of its {len(files)} companion files are missing or empty "
                         f"({shown}{' ...' if len(bad) > 5 else ''}); copy the slide again with all of its files")
