"""Issue 7: a region translated through `mupd serve` (uploaded from the client) equals LocalEngine's.

The client uploads the pyramid-level window a local run reads, with where it sits in the slide,
and the polygon; the server's tiles are then the local tiles, so the results agree to float
rounding (marker maps to 1e-5; their uint8 renderings to one grey level in rare pixels), for a
box and a non-rectangular polygon, on a one-level slide and on a pyramid whose lower level the
model's mpp selects.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from mupd.engine import wire
from mupd.engine.api import TranslateRequest
from mupd.engine.remote import RemoteEngine
from mupd.io import open_slide
from mupd.regions.plan import SlideGeometry, TileSpec, box_from_polygon, plan_region
from mupd.regions.source import ArraySlide, read_tile
from mupd.regions.translate import RegionTranslator
from support_server import ServerProcess, save_tiny_model

pytestmark = pytest.mark.timeout(600)

SLIDES = ["CMU-1-Small-Region.svs", "derived/CMU-1-Small-Region.pyramid.ome.tif"]
BOX = (900, 1200, 600, 520)
#: a triangle over tissue: several tiles of its bounding box miss it and are not run
TRIANGLE = [(800.0, 1000.0), (1700.0, 1100.0), (1000.0, 1900.0)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "mupd-tiny-test")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    proc = ServerProcess(tmp_path_factory.mktemp("server"), tiny_model).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def local(tiny_model):
    from mupd.engine.local import LocalEngine

    return LocalEngine(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def remote(server):
    with RemoteEngine(server.url, server.token, timeout=300) as engine:
        yield engine


@pytest.mark.parametrize("name", SLIDES)
@pytest.mark.parametrize("roi", ["box", "polygon"])
def test_remote_translate_equals_local(shared_data, local, remote, name, roi):
    path = str(shared_data / "wsi" / name)
    region = {"box": BOX} if roi == "box" else {"polygon": TRIANGLE}
    req = TranslateRequest(slide_path=path, stains=["HER2"], seed=4, **region)
    got, want = remote.translate(req), local.translate(req)
    assert got.n_tiles == want.n_tiles
    assert [l.name for l in got.layers] == [l.name for l in want.layers] == ["HER2", "IHC-HER2"]
    for g, w in zip(got.layers, want.layers):
        assert g.data.shape == w.data.shape and g.data.dtype == w.data.dtype, g.name
        if g.kind == "marker":
            assert np.allclose(g.data, w.data, atol=1e-5), (g.name, np.abs(g.data - w.data).max())
        else:  # uint8 renderings of those maps: float noise (thread counts) may flip a rounding
            diff = np.abs(g.data.astype(int) - w.data.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (g.name, diff.max(), (diff > 0).mean())
        assert g.placement.translate_um == w.placement.translate_um
        assert g.placement.scale_um == w.placement.scale_um
    # The predicted scores and cells the Translate panel tables come through the wire unchanged.
    assert want.scores and [s.marker for s in got.scores] == [s.marker for s in want.scores]
    for g, w in zip(got.scores, want.scores):
        assert g.n_cells == w.n_cells > 0 and g.mean_level == pytest.approx(w.mean_level, abs=1e-5)
        assert g.percent_positive == pytest.approx(w.percent_positive, abs=0.5)
    assert np.allclose(got.cells.centroids, want.cells.centroids)
    marker = want.layers[0].data
    assert marker.max() > 0.05, "the region must hold tissue, or the comparison proves little"
    if roi == "polygon":  # the bottom-right tile misses the triangle: not run (it is tissue)
        assert np.all(marker[-32:, -32:] == 0)
        whole = local.translate(TranslateRequest(slide_path=path, stains=["HER2"], seed=4,
                                                 box=box_from_polygon(TRIANGLE)))
        assert whole.layers[0].data[-32:, -32:].max() > 0.05

def test_the_upload_is_the_pyramid_level_the_local_run_reads(shared_data, local):
    """The pyramid's 2x level is uploaded (about a quarter of level 0's bytes), and translating the
    uploaded window reads exactly the tiles the slide file gives."""
    info = local.info()
    sizes = {}
    for name in SLIDES:
        with open_slide(shared_data / "wsi" / name) as slide:
            source = ArraySlide.from_slide(slide, plan_region(
                SlideGeometry.of(slide), TileSpec(info.tile_size, info.mpp), box=BOX))
            sizes[name] = source.image.nbytes
            rebuilt = ArraySlide(source.image.copy(), source.mpp, **source.frame())
            translator = RegionTranslator(local._pipeline)
            plan = translator.plan(slide, ["HER2"], box=BOX)
            for batch in plan.batches:
                for oy, ox in batch:
                    f = plan.region.factor
                    args = (BOX[0] + ox * f, BOX[1] + oy * f, info.tile_size, f)
                    assert np.array_equal(read_tile(rebuilt, *args), read_tile(slide, *args))
            if len(slide.levels) > 1:
                assert source.level_size == (slide.levels[1].shape[1], slide.levels[1].shape[0])
    single, pyramid = sizes[SLIDES[0]], sizes[SLIDES[1]]
    assert 0.2 < pyramid / single < 0.3, (pyramid, single)


def test_an_upload_is_limited_by_its_region_not_its_bytes(server):
    """A tiny body naming a huge region of a huge slide still gets 413; reads outside the uploaded
    window are refused (400), never filled in."""
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    headers = {**server.headers, "Content-Type": wire.NPZ_MEDIA_TYPE}
    frame = {"origin": (0, 0), "level_size": (100_000, 100_000), "dimensions": (100_000, 100_000)}
    huge = TranslateRequest("big.svs", ["HER2"], box=(0, 0, 100_000, 100_000))
    r = httpx.post(f"{server.url}/translate", headers=headers, timeout=60,
                   content=wire.encode_region_upload(huge, image, 1.0, frame))
    assert r.status_code == 413 and "output pixels" in r.json()["detail"], r.text
    outside = TranslateRequest("big.svs", ["HER2"], box=(32, 32, 128, 128), render_brightfield=False)
    r = httpx.post(f"{server.url}/translate", headers=headers, timeout=60,
                   content=wire.encode_region_upload(outside, image, 1.0, frame))
    assert r.status_code == 400 and "outside the 64x64 px window" in r.json()["detail"], r.text
    assert server.alive()
