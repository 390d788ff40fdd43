"""open_slide on every real slide we have: levels, chunking, mpp, channels, pixels vs tiffslide."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tiffslide

from mupd.io import open_slide
from support_io import sample_svs  # noqa: F401  (fixture)

CMU = "wsi/CMU-1-Small-Region.svs"
TCGA = "wsi/TCGA-CR-7395-01A-01-TS1.svs"
DERIVED = ["wsi/derived/CMU-1-Small-Region.pyramid.ome.tif", "wsi/derived/CMU-1-Small-Region.pyramid.generic.tif"]


def _assert_lazy_tiled(slide, tile_limit: int = 1024) -> None:
    for level in slide.levels:
        assert level.ndim == 3 and level.shape[2] == len(slide.channel_names)
        assert level.numblocks[0] * level.numblocks[1] > 1 or max(level.shape[:2]) <= tile_limit
        assert max(level.chunksize[:2]) <= max(tile_limit, level.chunksize[1] if slide.format == "qptiff" else 0)


def _compare_with_tiffslide(path, slide, rng) -> None:
    ts = tiffslide.TiffSlide(str(path))
    W, H = slide.dimensions
    for _ in range(3):
        w, h = rng.integers(64, 700, 2)
        x, y = rng.integers(0, W - w), rng.integers(0, H - h)
        ours = slide.read_region((x, y), (w, h))
        ref = ts.read_region((x, y), 0, (w, h), as_array=True)
        assert ours.shape == (h, w, 3)
        np.testing.assert_array_equal(ours, ref)
    ts.close()


def test_cmu_svs(shared_data):
    with open_slide(shared_data / CMU) as s:
        assert s.format == "svs" and s.is_rgb and s.channel_names == ["R", "G", "B"]
        assert s.dimensions == (2220, 2967) and len(s.levels) == 1
        assert s.levels[0].shape == (2967, 2220, 3) and s.dtype == np.uint8
        file_chunks = tiffslide.TiffSlide(str(shared_data / CMU)).zarr_group["0"].chunks
        assert s.levels[0].chunksize == tuple(file_chunks) and s.levels[0].npartitions > 20
        assert s.mpp == (0.499, 0.499) and s.mpp_known and s.objective_power == 20
        assert {"thumbnail", "label", "macro"} <= set(s.associated_images)
        assert s.associated_images["macro"].ndim == 3
        _compare_with_tiffslide(shared_data / CMU, s, np.random.default_rng(0))


def test_tcga_jpeg2000_svs_without_mpp(shared_data):
    with pytest.warns(UserWarning, match="TCGA-CR-7395.*no pixel size"):
        s = open_slide(shared_data / TCGA)
    with s:
        assert s.mpp is None and not s.mpp_known and s.objective_power is None
        assert s.level_dimensions == [(4443, 3567), (2221, 1783)]
        assert s.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)
        assert all(lv.chunksize == (256, 256, 3) for lv in s.levels)
        _compare_with_tiffslide(shared_data / TCGA, s, np.random.default_rng(1))
    with open_slide(shared_data / TCGA, mpp=0.5) as s:  # the user's value is accepted, no warning
        assert s.mpp == (0.5, 0.5) and s.mpp_known


def test_user_mpp_overrides_file(shared_data):
    with open_slide(shared_data / CMU, mpp=(0.25, 0.26)) as s:
        assert s.mpp == (0.25, 0.26)


@pytest.mark.parametrize("name", DERIVED)
def test_derived_pyramids(shared_data, name):
    with open_slide(shared_data / name) as s:
        assert s.format == ("ome-tiff" if ".ome." in name else "tiff")
        assert s.level_dimensions == [(2220, 2967), (1110, 1483), (555, 741)]
        assert s.mpp == pytest.approx((0.499, 0.499)) and s.is_rgb
        assert all(lv.chunksize == (256, 256, 3) for lv in s.levels)
        _compare_with_tiffslide(shared_data / name, s, np.random.default_rng(2))
        # the derived pyramid holds the SVS pixels (re-encoded as JPEG): close, not equal
        with open_slide(shared_data / CMU) as svs:
            a = s.read_region((500, 700), (256, 256)).astype(int)
            b = svs.read_region((500, 700), (256, 256)).astype(int)
        assert np.abs(a - b).mean() < 6


def test_qptiff_fluorescence(shared_data):
    with open_slide(shared_data / "mif/small_vectra.qptiff") as s:
        assert s.format == "qptiff" and not s.is_rgb
        assert s.channel_names == ["DAPI", "FITC", "Cy3"]
        assert s.channel_colors[0] == "0000FF"
        assert s.levels[0].shape == (1440, 1920, 3) and s.dtype == np.uint8
        assert s.mpp == (0.5, 0.5)
        lv = s.levels[0]
        assert lv.numblocks[0] > 1 and lv.chunksize[2] == 1  # strips grouped, one channel per chunk
        import tifffile

        planes = tifffile.imread(shared_data / "mif/small_vectra.qptiff", series=0)
        np.testing.assert_array_equal(s.read_region((100, 50), (400, 300)),
                                      np.moveaxis(planes[:, 50:350, 100:500], 0, -1))


def test_her2st_jpeg_is_lazy_and_chunked(shared_data, monkeypatch):
    from mupd.io import plain_image

    decodes = []
    real = plain_image._DecodedImage._pil
    monkeypatch.setattr(plain_image._DecodedImage, "_pil", lambda self: decodes.append(1) or real(self))
    path = shared_data / "st/her2st/images/C2_HE.jpg"
    with pytest.warns(UserWarning, match="C2_HE.jpg"):
        s = open_slide(path)
    assert s.format == "image" and s.is_rgb and s.mpp is None
    assert s.levels[0].shape[:2] == (9911, 9274)  # ~92 Mpx: beyond PIL's default bomb limit
    assert s.levels[0].chunksize == (512, 512, 3)
    assert s.levels[-1].shape[0] <= 1024 and len(s.levels) >= 4
    assert decodes == []  # opening and building the pyramid decoded nothing
    tile = s.levels[0][4096:4608, 4096:4608].compute()
    s.levels[2][:512, :512].compute()
    assert len(decodes) == 1  # decoded once, then reused by every chunk and level
    from PIL import Image

    with warnings.catch_warnings(), Image.open(path) as im:  # reference: PIL directly
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # limit may be lifted
        ref = np.asarray(im.convert("RGB").crop((4096, 4096, 4608, 4608)))
    np.testing.assert_array_equal(tile, ref)


def test_a1_png_with_user_mpp(shared_data):
    with open_slide(shared_data / "st/her2st/images/A1_HE_lowres_masked.png", mpp=3.2) as s:
        assert s.dimensions == (2000, 2138) and s.mpp == (3.2, 3.2)
        out = s.read_region((0, 0), (2000, 2000), mpp=6.4)
        assert out.shape == (1000, 1000, 3)
        full = s.read_region((0, 0), (2000, 2000))
        assert abs(float(out.mean()) - float(full.mean())) < 1.0


def test_sample_slide_region_and_mpp_resampling(sample_svs):
    with open_slide(sample_svs) as s:
        assert s.dimensions == (2220, 2967) and s.mpp == (0.499, 0.499)
        out = s.read_region((200, 300), (1000, 600), mpp=1.0)
        assert out.shape == (round(600 * 0.499), round(1000 * 0.499), 3)
        full = s.read_region((200, 300), (1000, 600))
        assert abs(float(out.astype(float).mean()) - float(full.astype(float).mean())) < 1.5
        thumb = s.thumbnail(300)
        assert max(thumb.shape[:2]) == 300 and thumb.shape[2] == 3
        ts = tiffslide.TiffSlide(str(sample_svs))
        np.testing.assert_array_equal(s.read_region((1000, 1000), (512, 512)),
                                      ts.read_region((1000, 1000), 0, (512, 512), as_array=True))


def test_mpp_read_uses_coarser_level(shared_data):
    with open_slide(shared_data / DERIVED[0]) as s:
        assert s.best_level_for_downsample(4.1) == 2 and s.best_level_for_downsample(1.9) == 0
        out = s.read_region((0, 0), (2000, 2000), mpp=0.499 * 4)
        assert out.shape == (500, 500, 3)
        ref = s.levels[2][:500, :500].compute()
        assert np.abs(out.astype(int) - ref.astype(int)).mean() < 3


def test_screen_dpi_is_not_taken_as_mpp(tmp_path, sample_svs):
    """A TIFF saved with 72 dpi (an editor default) has no calibration: mpp unknown, not 352.8 um."""
    import tifffile

    with open_slide(sample_svs) as s:
        crop = s.read_region((0, 0), (600, 500))
    path = tmp_path / "export.tif"
    tifffile.imwrite(path, crop, photometric="rgb", tile=(256, 256), resolution=(72, 72), resolutionunit="INCH")
    with pytest.warns(UserWarning, match="export.tif"):
        s = open_slide(path)
    with s:
        assert s.format == "tiff" and s.mpp is None and not s.mpp_known
        np.testing.assert_array_equal(s.read_region((10, 20), (100, 50)), crop[20:70, 10:110])


# -- vendor formats without a real file in shared data: minimal files in the vendors' layouts ---
# There is no NDPI or SCN slide in ../shared/data. These writers make the smallest files that
# carry what tifffile and tiffslide detect the formats by (NDPI: tags 65420 + Make and 64-bit IFD
# offsets; SCN: the Leica XML in ImageDescription). Real files differ in ways not covered here
# (NDPI: one huge JPEG per level read through McuStarts; SCN: several regions, Z stacks).

def _gradient(h: int = 512, w: int = 768) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 255, h), np.linspace(0, 255, w), indexing="ij")
    return np.dstack([xx, yy, np.full_like(xx, 128)]).astype(np.uint8)


def write_ndpi(path, image: np.ndarray, mpp: float = 0.4, lens: float = 20.0) -> None:
    """A 2-level Hamamatsu NDPI: tiled JPEG pages with NDPI tags, resolution in pixels/cm, and the
    NDPI layout (8-byte first-IFD offset, every IFD followed by an 8-byte next offset and the
    4-byte high halves of its entries)."""
    import struct

    import tifffile

    classic = path.with_suffix(".classic.tif")
    with tifffile.TiffWriter(classic) as tw:
        for i in range(2):
            tags = [(271, "s", 0, "Hamamatsu", True), (65420, "I", 1, 1, True),
                    (65421, "f", 1, lens / 2**i, True)]
            tw.write(image[:: 2**i, :: 2**i], tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / mpp / 2**i,) * 2, resolutionunit="CENTIMETER",
                     extratags=tags, metadata=None)
    with tifffile.TiffFile(classic) as tf:
        offsets = [p.offset for p in tf.pages]
    data = bytearray(classic.read_bytes())
    classic.unlink()
    ifds = [bytes(data[o : o + 2 + 12 * struct.unpack_from("<H", data, o)[0]]) for o in offsets]
    starts, pos = [], len(data) + (-len(data)) % 8
    for ifd in ifds:
        starts.append(pos)
        pos += len(ifd) + 8 + 4 * struct.unpack_from("<H", ifd)[0]
    data += bytes(pos - len(data))
    for i, (ifd, start) in enumerate(zip(ifds, starts)):
        data[start : start + len(ifd)] = ifd
        struct.pack_into("<Q", data, start + len(ifd), starts[i + 1] if i + 1 < len(starts) else 0)
    struct.pack_into("<Q", data, 4, starts[0])
    path.write_bytes(bytes(data))


def write_scn(path, image: np.ndarray, mpp: float = 0.5, offset_um=(50.0, 25.0),
              canvas_um=(600.0, 400.0)) -> None:
    """A Leica SCN: a 2-level main region at `offset_um` (x, y) on a `canvas_um` collection plus a
    macro image of the whole collection; sizes in nm, as Leica writes them."""
    import tifffile

    nm = lambda um: int(round(um * 1000))  # noqa: E731
    h, w = image.shape[:2]
    macro = np.full((40, 60, 3), 200, np.uint8)

    def entry(name, sizes, ifds, view, offset, objective):
        dims = "".join(f'<dimension sizeX="{x}" sizeY="{y}" r="{r}" ifd="{i}"/>'
                       for r, ((y, x), i) in enumerate(zip(sizes, ifds)))
        return (f'<image name="{name}"><creationDate>2026-01-01T00:00:00Z</creationDate>'
                f'<device model="Leica SCN400" version="1.5"/>'
                f'<pixels sizeX="{sizes[0][1]}" sizeY="{sizes[0][0]}">{dims}</pixels>'
                f'<view sizeX="{view[0]}" sizeY="{view[1]}" offsetX="{offset[0]}" offsetY="{offset[1]}"'
                f' spacingZ="0"/><scanSettings><objectiveSettings><objective>{objective}</objective>'
                f'</objectiveSettings><illuminationSettings><numericalAperture>0.8</numericalAperture>'
                f'<illuminationSource>brightfield</illuminationSource></illuminationSettings>'
                f'</scanSettings></image>')

    cw, ch = nm(canvas_um[0]), nm(canvas_um[1])
    xml = ('<?xml version="1.0" encoding="utf-8"?>'
           '<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">'
           f'<collection name="mini" sizeX="{cw}" sizeY="{ch}">'
           + entry("main", [(h, w), (h // 2, w // 2)], [0, 1], (nm(w * mpp), nm(h * mpp)),
                   (nm(offset_um[0]), nm(offset_um[1])), 20)
           + entry("macro", [macro.shape[:2]], [2], (cw, ch), (0, 0), 0.5)
           + "</collection></scn>")
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(256, 256), photometric="rgb", compression="jpeg", description=xml,
                 metadata=None)
        tw.write(image[::2, ::2], tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None)
        tw.write(macro, photometric="rgb", metadata=None)


def test_ndpi_opens_through_tiffslide_with_mpp_and_levels(tmp_path):
    image = _gradient()
    write_ndpi(tmp_path / "mini.ndpi", image, mpp=0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unknown pixel size", no tiffslide NDPI chatter
        slide = open_slide(tmp_path / "mini.ndpi")
    with slide:
        assert slide.format == "ndpi" and slide.is_rgb
        assert slide.mpp == pytest.approx((0.4, 0.4)) and slide.objective_power == 20
        assert slide.level_dimensions == [(768, 512), (384, 256)]
        assert slide.levels[0].chunksize == (256, 256, 3)
        pixels = slide.read_region((100, 50), (300, 200)).astype(int)
        assert np.abs(pixels - image[50:250, 100:400]).mean() < 2  # JPEG of a smooth gradient
        assert np.array_equal(np.asarray(slide.levels[1][10:20, 10:20]),
                              slide._read_level(1, 10, 10, 20, 20))


def test_scn_canvas_places_the_region_and_reads_glass_white(tmp_path):
    image = _gradient()
    write_scn(tmp_path / "mini.scn", image, mpp=0.5, offset_um=(50.0, 25.0), canvas_um=(600.0, 400.0))
    with open_slide(tmp_path / "mini.scn") as slide:
        assert slide.format == "scn" and slide.is_rgb and slide.channel_names == ["R", "G", "B"]
        assert slide.mpp == pytest.approx((0.5, 0.5)) and slide.objective_power == 20
        # the canvas is the collection: 600 x 400 um at 0.5 um/px; the region starts at (100, 50) px
        assert slide.level_dimensions == [(1200, 800), (600, 400)]
        assert slide.levels[0].chunksize == (256, 256, 3)
        full = np.asarray(slide.levels[0])
        assert (full[:50] == 255).all() and (full[:, :100] == 255).all() and (full[:, 100 + 768:] == 255).all()
        assert np.abs(full[50 : 50 + 512, 100 : 100 + 768].astype(int) - image).mean() < 2
        np.testing.assert_array_equal(slide.read_region((90, 40), (40, 30)), full[40:70, 90:130])
        assert np.abs(np.asarray(slide.levels[1][25:281, 50:434]).astype(int) - image[::2, ::2]).mean() < 3
