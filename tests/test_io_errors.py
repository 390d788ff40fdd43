"""Bad input gives one clear MuPDError naming the file and the problem, never a deep traceback."""

from __future__ import annotations

import shutil
import struct
import time
import tracemalloc

import numpy as np
import pytest
import tifffile

from mupd.errors import RegionError, SlideError
from mupd.io import open_slide
from support_io import sample_svs  # noqa: F401  (fixture)


def test_missing_path(tmp_path):
    with pytest.raises(SlideError, match=r"nowhere\.svs does not exist"):
        open_slide(tmp_path / "nowhere.svs")


def test_truncated_slide(tmp_path, sample_svs):
    cut = tmp_path / "cut.svs"
    data = sample_svs.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match=r"cut\.svs.*truncated"):
        open_slide(cut)


def test_truncated_header(tmp_path, sample_svs):
    cut = tmp_path / "stub.svs"
    cut.write_bytes(sample_svs.read_bytes()[:200])
    with pytest.raises(SlideError, match=r"stub\.svs"):
        open_slide(cut)


def test_text_file_renamed_svs(tmp_path):
    fake = tmp_path / "notes.svs"
    fake.write_text("patient 12, H&E, see slide box 4\n")
    with pytest.raises(SlideError, match=r"notes\.svs is not a TIFF/SVS file"):
        open_slide(fake)


def test_unsupported_format(tmp_path):
    other = tmp_path / "scan.czi"
    other.write_bytes(b"ZISRAWFILE" + bytes(100))
    with pytest.raises(SlideError, match=r"unsupported slide format '\.czi' for .*scan\.czi") as caught:
        open_slide(other)
    listed = str(caught.value).split("supported: ", 1)[1]
    for name in (".svs", ".ndpi", ".vms", ".scn", ".mrxs", ".bif", "Philips TIFF", "DICOM", "OME-Zarr", ".qptiff"):
        assert name in listed, name


def test_folder_that_is_not_zarr(tmp_path):
    with pytest.raises(SlideError, match="not an OME-Zarr"):
        open_slide(tmp_path)


def test_corrupt_jpeg(tmp_path, shared_data):
    bad = tmp_path / "half.jpg"
    bad.write_bytes((shared_data / "st/visium/squidpy_mouse_brain/test_img.jpg").read_bytes()[:5000])
    with pytest.warns(UserWarning):
        s = open_slide(bad)
    with pytest.raises(SlideError, match=r"half\.jpg"):
        s.read_region((0, 0), (100, 100))


@pytest.fixture
def slide(sample_svs):
    with open_slide(sample_svs) as s:
        yield s


@pytest.mark.parametrize("location,size", [((2200, 0), (100, 100)), ((0, 2900), (100, 100)),
                                           ((-1, 0), (10, 10)), ((5000, 5000), (10, 10))])
def test_region_outside_slide(slide, location, size):
    with pytest.raises(RegionError, match=r"outside slide .*CMU-1-Small-Region\.svs of size 2220x2967"):
        slide.read_region(location, size)


@pytest.mark.parametrize("size", [(0, 10), (10, -5)])
def test_region_zero_or_negative_size(slide, size):
    with pytest.raises(RegionError, match=r"size .* for .*CMU-1-Small-Region\.svs must be positive"):
        slide.read_region((0, 0), size)


def test_bad_mpp(sample_svs, tmp_path):
    with pytest.raises(SlideError, match="positive"):
        open_slide(sample_svs, mpp=0)
    with open_slide(sample_svs) as s, pytest.raises(SlideError, match="positive"):
        s.read_region((0, 0), (10, 10), mpp=-2)


def test_mpp_read_without_known_mpp(shared_data):
    with pytest.warns(UserWarning):
        s = open_slide(shared_data / "wsi/TCGA-CR-7395-01A-01-TS1.svs")
    with s, pytest.raises(RegionError, match="TCGA-CR-7395.*no known mpp"):
        s.read_region((0, 0), (100, 100), mpp=1.0)


def test_cli_style_message_has_no_traceback(tmp_path, sample_svs):
    copy = tmp_path / "copy.svs"
    shutil.copy(sample_svs, copy)
    with open(copy, "r+b") as fh:  # corrupt the tile data, keep the header intact
        fh.seek(50_000)
        fh.write(b"\x00" * 400_000)
    with open_slide(copy) as s, pytest.raises(SlideError, match=r"could not read pixels from .*copy\.svs"):
        s.read_region((0, 0), (2220, 2967))


@pytest.mark.parametrize("cut_bytes", [20, 30000])  # inside the last IFD; the IFDs and half the tiles
def test_truncated_ndpi_names_the_file(tmp_path, cut_bytes):
    from test_io_readers import _gradient, write_ndpi

    whole = tmp_path / "whole.ndpi"
    write_ndpi(whole, _gradient())
    cut = tmp_path / "cut.ndpi"
    data = whole.read_bytes()
    cut.write_bytes(data[:-cut_bytes])
    with pytest.raises(SlideError, match=r"cut\.ndpi.*(truncated|corrupt)"):
        open_slide(cut)


def test_text_file_named_scn(tmp_path):
    fake = tmp_path / "notes.scn"
    fake.write_text("not a slide\n")
    with pytest.raises(SlideError, match=r"notes\.scn is not a TIFF"):
        open_slide(fake)


def _forged_tiff(path, tile: int) -> None:
    """A few hundred bytes: one real (tile x tile) RGB tile, a header claiming 200000 x 200000 px."""
    tifffile.imwrite(path, np.zeros((tile, tile, 3), np.uint8), tile=(tile, tile), photometric="rgb",
                     compression="zlib", metadata=None)
    with tifffile.TiffFile(path) as tf:
        offsets = [tf.pages[0].tags[code].valueoffset for code in (256, 257)]  # ImageWidth, ImageLength
    with open(path, "r+b") as fh:
        for offset in offsets:
            fh.seek(offset)
            fh.write(struct.pack("<I", 200_000))
    with tifffile.TiffFile(path) as tf:
        assert tf.pages[0].shape == (200_000, 200_000, 3) and path.stat().st_size < 2000


@pytest.mark.parametrize("tile, rule", [(16, r"156250000 chunks"),  # the dask graph alone: ~22 GB
                                        (256, r"times the file's \d+ bytes")])  # 0.6 M chunks, 120 GB
def test_forged_huge_tiff_is_refused_before_anything_is_built(tmp_path, tile, rule):
    path = tmp_path / "forged.tif"
    _forged_tiff(path, tile)
    start = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(SlideError, match=rf"forged\.tif: level 0 declares 200000 x 200000 x 3 .*{rule}"):
            open_slide(path, mpp=0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 50 * 2**20


def test_ome_zarr_declaring_absurd_chunks_is_refused(tmp_path):
    import zarr

    from mupd.io import write_ome_zarr

    path = write_ome_zarr(tmp_path / "small.ome.zarr", np.zeros((64, 64, 3), np.uint8), mpp=0.5)
    level0 = next(zarr.open_group(str(path), mode="r").array_keys())
    zarr.create_array(str(path), name=level0, shape=(3, 200_000, 200_000), chunks=(1, 16, 16),
                      dtype="uint8", overwrite=True)  # metadata only: no chunk is written
    with pytest.raises(SlideError, match=r"small\.ome\.zarr: level 0 declares 3 x 200000 x 200000 .*chunks"):
        open_slide(path)
