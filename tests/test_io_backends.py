"""The OpenSlide and DICOM backends of open_slide: same pixels, mpp, levels, channels and
associated images as the tiffslide path, on files written here from the CMU sample slide.

No real MRXS, BIF, VMS or Philips slide is in ../shared/data (see its README): the DICOM WSI is
written with wsidicom, the Philips TIFF with tifffile to the layout OpenSlide documents, and
OpenSlide itself is checked on SVS files against tiffslide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import tiffslide
from PIL import Image

from dicom_wsi import write_dicom_wsi
from mupd.errors import SlideError
from mupd.io import open_slide
from mupd.io.openslide_backend import open_openslide
from support_io import sample_svs  # noqa: F401  (fixture)

MPP = 0.499  # the CMU sample's


@pytest.fixture(scope="module")
def cmu(sample_svs) -> dict:
    """The sample's level-0 pixels and associated images, read once through tiffslide."""
    with tiffslide.TiffSlide(str(sample_svs)) as ts:
        return {"pixels": ts.read_region((0, 0), 0, ts.dimensions, as_array=True),
                "label": np.asarray(ts.associated_images["label"])}


@pytest.fixture(scope="module")
def cmu_dicom(tmp_path_factory, cmu) -> Path:
    folder = tmp_path_factory.mktemp("dicom") / "CMU-1-Small-Region"
    write_dicom_wsi(folder, cmu["pixels"], MPP, label=cmu["label"])
    return folder


@pytest.fixture(scope="module")
def pyramid_svs(tmp_path_factory, cmu) -> Path:
    """An Aperio SVS of 3 levels at exact 2x steps (2048x2944, 1024x1472, 512x736) from the sample."""
    levels = _halvings(cmu["pixels"][:2944, :2048], 3)
    path = tmp_path_factory.mktemp("svs") / "pyramid.svs"
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(levels):
            h, w = level.shape[:2]
            desc = f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90"
            tw.write(level, tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None,
                     description=desc + ("|AppMag = 20|MPP = 0.499" if i == 0 else ""))
            if i == 0:  # page 1 of an SVS is its (stripped) thumbnail
                tw.write(levels[-1], compression="jpeg", photometric="rgb", metadata=None,
                         description=f"Aperio Image Library v12.0.0\r\n{w}x{h} -> 512x736 - ")
    return path


def _halvings(pixels: np.ndarray, n: int) -> list[np.ndarray]:
    levels = [pixels]
    while len(levels) < n:
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
    return levels


# -- DICOM WSI (wsidicom) ------------------------------------------------------------------------
def test_dicom_from_cmu_has_the_svs_pixels_and_mpp(cmu_dicom, cmu, sample_svs):
    with open_slide(cmu_dicom) as s, open_slide(sample_svs) as svs:
        assert s.format == "dicom" and s.is_rgb and s.channel_names == ["R", "G", "B"]
        assert s.mpp == svs.mpp == (MPP, MPP) and s.mpp_known
        assert s.dimensions == svs.dimensions == (2220, 2967)
        assert s.level_dimensions[:3] == [(2220, 2967), (1110, 1484), (555, 742)]
        assert all(lv.chunksize[:2] == (256, 256) for lv in s.levels[:-1]) and s.dtype == np.uint8
        np.testing.assert_array_equal(s.levels[0].compute(), cmu["pixels"])
        np.testing.assert_array_equal(s.read_region((300, 1700), (517, 389)), svs.read_region((300, 1700), (517, 389)))
        # a read at 2 um/px comes from wsidicom's level 2 here and from resampled level 0 there
        coarse, ref = s.read_region((0, 0), (2000, 2000), mpp=2.0), svs.read_region((0, 0), (2000, 2000), mpp=2.0)
        assert coarse.shape == ref.shape == (499, 499, 3)
        assert np.abs(coarse.astype(int) - ref).mean() < 4
        assert set(s.associated_images) == {"label"}
        assert s.associated_images["label"].shape == cmu["label"].shape  # stored as JPEG by wsidicom
        assert np.abs(s.associated_images["label"].astype(int) - cmu["label"]).mean() < 8


def test_any_dicom_instance_opens_its_folder_and_openslide_agrees(cmu_dicom, cmu):
    """One .dcm (any level's) opens the slide; OpenSlide's own DICOM reader sees the same pixels,
    so the folder is standard DICOM WSI, not only something wsidicom reads back."""
    import openslide

    instance = sorted(cmu_dicom.glob("*.dcm"))[-1]
    with open_slide(instance) as s:
        assert s.path == cmu_dicom and s.format == "dicom" and s.dimensions == (2220, 2967)
    with openslide.OpenSlide(str(instance)) as osr:
        assert osr.properties["openslide.vendor"] == "dicom"
        region = np.asarray(osr.read_region((0, 0), 0, osr.dimensions))[..., :3]
    np.testing.assert_array_equal(region, cmu["pixels"])


def test_dicom_fluorescence_is_one_named_channel_per_optical_path(tmp_path, cmu):
    planes = cmu["pixels"][:900, :1100]
    write_dicom_wsi(tmp_path / "mif", planes, 0.5, channel_names=["DAPI", "CD8", "PanCK"])
    with open_slide(tmp_path / "mif") as s:
        assert s.channel_names == ["DAPI", "CD8", "PanCK"] and not s.is_rgb
        assert s.mpp == (0.5, 0.5) and s.level_dimensions[:2] == [(1100, 900), (550, 450)]
        np.testing.assert_array_equal(s.levels[0].compute(), planes)


def test_folder_of_two_dicom_slides_is_refused_naming_it(tmp_path, cmu):
    for name in ("a", "b"):
        write_dicom_wsi(tmp_path / name, cmu["pixels"][:300, :300], MPP)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in [*(tmp_path / "a").glob("*.dcm"), *(tmp_path / "b").glob("*.dcm")]:
        f.rename(mixed / f"{f.parent.name}-{f.name}")
    with pytest.raises(SlideError, match=r"mixed holds the DICOM images of 2 slides"):
        open_slide(mixed)


# -- OpenSlide -----------------------------------------------------------------------------------
def test_svs_through_openslide_equals_tiffslide(sample_svs):
    with open_openslide(sample_svs) as o, open_slide(sample_svs) as t:
        assert (o.format, o.mpp, o.objective_power, o.level_dimensions) == (t.format, t.mpp, t.objective_power,
                                                                           t.level_dimensions)
        assert o.channel_names == t.channel_names and o.is_rgb
        np.testing.assert_array_equal(o.levels[0].compute(), t.levels[0].compute())
        rng = np.random.default_rng(3)
        for _ in range(3):
            w, h = (int(v) for v in rng.integers(64, 700, 2))
            x, y = int(rng.integers(0, 2220 - w)), int(rng.integers(0, 2967 - h))
            np.testing.assert_array_equal(o.read_region((x, y), (w, h)), t.read_region((x, y), (w, h)))
        assert set(o.associated_images) == set(t.associated_images) == {"thumbnail", "label", "macro"}
        for name, image in t.associated_images.items():
            np.testing.assert_array_equal(o.associated_images[name], image)


def test_lower_levels_through_openslide_equal_tiffslide(pyramid_svs):
    with open_openslide(pyramid_svs) as o, open_slide(pyramid_svs) as t:
        assert o.level_dimensions == t.level_dimensions == [(2048, 2944), (1024, 1472), (512, 736)]
        assert o.level_downsamples == [1.0, 2.0, 4.0] and o.mpp == t.mpp == (MPP, MPP)
        assert [lv.chunksize for lv in o.levels] == [lv.chunksize for lv in t.levels]
        for level in (1, 2):
            np.testing.assert_array_equal(o.levels[level].compute(), t.levels[level].compute())
        np.testing.assert_array_equal(o.read_region((700, 900), (640, 480), mpp=1.996),
                                      t.read_region((700, 900), (640, 480), mpp=1.996))


def test_openslide_lower_level_at_a_fractional_downsample_is_close_not_exact(shared_data):
    """The TCGA SVS's level 1 is 2.0005x down: OpenSlide paints it at sub-pixel offsets, so only
    the tile at the level's origin is the stored pixels (the limitation the module states)."""
    path = shared_data / "wsi/TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.warns(UserWarning, match="no pixel size"):
        o, t = open_openslide(path), open_slide(path)
    with o, t:
        a, b = o.levels[1].compute().astype(int), t.levels[1].compute().astype(int)
        np.testing.assert_array_equal(a[:256, :256], b[:256, :256])
        assert 0 < np.abs(a - b).mean() < 4


def _philips_xml(mpp_um: float, n_levels: int) -> str:
    def spacing(mm: float) -> str:
        return f'<Attribute Name="DICOM_PIXEL_SPACING">"{mm:.9g}" "{mm:.9g}"</Attribute>'

    reps = "".join(f'<DataObject ObjectType="PixelDataRepresentation">{spacing(mpp_um * 2**i / 1000)}</DataObject>'
                   for i in range(n_levels))
    return ('<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport">'
            '<Attribute Name="DICOM_MANUFACTURER">PHILIPS</Attribute>'
            '<Attribute Name="PIM_DP_SCANNED_IMAGES"><Array><DataObject ObjectType="DPScannedImage">'
            f'{spacing(mpp_um / 1000)}<Attribute Name="PIM_DP_IMAGE_TYPE">WSI</Attribute>'
            '<Attribute Name="DICOM_DERIVATION_DESCRIPTION">tiff-useBigTIFF=1-levels=20,10002-q80</Attribute>'
            f'<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE"><Array>{reps}</Array></Attribute>'
            '</DataObject></Array></Attribute></DataObject>')


def _tiles(pixels: np.ndarray, missing: tuple[int, int]):
    """The 256 px tiles of `pixels` in TIFF order, `missing` (row, col) left out (a sparse TIFF)."""
    for r in range(0, pixels.shape[0], 256):
        for c in range(0, pixels.shape[1], 256):
            tile = np.full((256, 256, 3), 255, np.uint8)
            block = pixels[r:r + 256, c:c + 256]
            tile[:block.shape[0], :block.shape[1]] = block
            yield None if (r // 256, c // 256) == missing else tile


def test_philips_tiff_goes_to_openslide_with_its_xml_levels_and_glass_where_tiles_are_missing(tmp_path, cmu):
    """Philips pads its lower levels to whole tiles (true sizes in its XML) and leaves out the tiles
    between scanned regions: OpenSlide paints those as background, tifffile would give black."""
    levels = _halvings(cmu["pixels"][:2944, :2048], 3)
    path = tmp_path / "philips.tiff"
    with tifffile.TiffWriter(path) as tw:
        tw.write(_tiles(levels[0], missing=(0, 1)), shape=levels[0].shape, dtype=np.uint8, tile=(256, 256),
                 compression="jpeg", photometric="rgb", metadata=None, software="Philips DP v1.0",
                 description=_philips_xml(MPP, 3))
        for level in levels[1:]:
            padded = np.full((-(-level.shape[0] // 256) * 256, level.shape[1], 3), 255, np.uint8)
            padded[:level.shape[0]] = level
            tw.write(padded, tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None,
                     software="Philips DP v1.0", subfiletype=1)
        tw.write(cmu["label"], compression="jpeg", photometric="rgb", metadata=None, description="Label")
    with open_slide(path) as s, tifffile.TiffFile(path) as tf:
        assert s.format == "philips-tiff" and s.mpp == pytest.approx((MPP, MPP)) and s.objective_power == 20
        assert [p.shape[:2] for p in tf.pages[1:3]] == [(1536, 1024), (768, 512)]  # stored with padding
        assert s.level_dimensions == [(2048, 2944), (1024, 1472), (512, 736)]
        stored = tf.pages[0].asarray()
        assert (stored[:256, 256:512] == 0).all()  # what a plain TIFF reader makes of the missing tile
        level0 = s.levels[0].compute()
        assert (level0[:256, 256:512] == 255).all()
        level0[:256, 256:512] = 0
        np.testing.assert_array_equal(level0, stored)
        for i, (w, h) in enumerate(s.level_dimensions[1:], start=1):
            np.testing.assert_array_equal(s.levels[i].compute(), tf.pages[i].asarray()[:h, :w])
        assert s.associated_images["label"].shape == cmu["label"].shape


def test_new_backends_refuse_absurd_levels_by_the_shared_rule(monkeypatch, sample_svs, cmu_dicom):
    import mupd.io.slide as slide_module

    monkeypatch.setattr(slide_module, "MAX_LEVEL_CHUNKS", 20)  # the sample has 130 tiles of 240 px
    with pytest.raises(SlideError, match=r"CMU-1-Small-Region\.svs: level 0 declares 2967 x 2220 x 3"):
        open_openslide(sample_svs)
    with pytest.raises(SlideError, match=r"CMU-1-Small-Region: level 0 declares 2967 x 2220 x 3"):
        open_slide(cmu_dicom)


# -- companion files and errors ------------------------------------------------------------------
_SLIDEDAT = """[GENERAL]
SLIDE_ID=0123456789abcdef
IMAGENUMBER_X=1
IMAGENUMBER_Y=1
[HIERARCHICAL]
HIER_COUNT=0
NONHIER_COUNT=0
INDEXFILE=Index.dat
[DATAFILE]
FILE_COUNT=2
FILE_0=Data0000.dat
FILE_1=Data0001.dat
"""


def test_mrxs_without_its_folder_names_the_file_and_the_folder(tmp_path):
    mrxs = tmp_path / "biopsy.mrxs"
    mrxs.write_bytes(b"")
    with pytest.raises(SlideError, match=r"biopsy\.mrxs: its companion folder biopsy/ .* is missing"):
        open_slide(mrxs)
    (tmp_path / "biopsy").mkdir()
    with pytest.raises(SlideError, match=r"biopsy\.mrxs: biopsy/Slidedat\.ini is missing"):
        open_slide(mrxs)


@pytest.mark.parametrize("present, message", [
    ({"Index.dat": b"VERSION01.02"}, r"2 of its 3 companion files .*biopsy/Data0000\.dat \(absent\)"),
    ({"Index.dat": b"VERSION01.02", "Data0000.dat": b"x", "Data0001.dat": b""},
     r"1 of its 3 companion files .*biopsy/Data0001\.dat \(empty\)"),
])
def test_truncated_mrxs_folder_lists_what_is_missing(tmp_path, present, message):
    mrxs = tmp_path / "biopsy.mrxs"
    mrxs.write_bytes(b"")
    folder = tmp_path / "biopsy"
    folder.mkdir()
    (folder / "Slidedat.ini").write_text(_SLIDEDAT)
    for name, data in present.items():
        (folder / name).write_bytes(data)
    with pytest.raises(SlideError, match=r"biopsy\.mrxs: " + message):
        open_slide(mrxs)


def test_mrxs_with_corrupt_companions_gives_openslides_reason_naming_the_file(tmp_path):
    mrxs = tmp_path / "biopsy.mrxs"
    mrxs.write_bytes(b"")
    folder = tmp_path / "biopsy"
    folder.mkdir()
    (folder / "Slidedat.ini").write_text(_SLIDEDAT)
    for name in ("Index.dat", "Data0000.dat", "Data0001.dat"):
        (folder / name).write_bytes(b"cut short")
    with pytest.raises(SlideError, match=r"(cannot open|is not a slide).*biopsy\.mrxs"):
        open_slide(mrxs)


def test_vms_without_its_jpeg_names_it(tmp_path):
    vms = tmp_path / "scan.vms"
    vms.write_text("[Virtual Microscope Specimen]\nNoLayers=1\nImageFile=scan.jpg\nMapFile=scan_map.jpg\n")
    (tmp_path / "scan_map.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(SlideError, match=r"scan\.vms: 1 of its 2 companion files .*scan\.jpg \(absent\)"):
        open_slide(vms)
