"""Regions: polygons, pyramid levels, disk-backed sums, cancellation and the errors a user sees."""

from __future__ import annotations

import os

import numpy as np
import pytest
from skimage.data import immunohistochemistry
from skimage.registration import phase_cross_correlation

import mupd.regions.blend as blend
from mupd.errors import CancelledError, ConditionError, OutputExistsError, RegionError, SlideError
from mupd.io import open_slide
from mupd.progress import CancelToken
from mupd.regions.outputs import write_translation
from mupd.regions.plan import SlideGeometry, pick_level
from mupd.regions.source import ArraySlide
from mupd.regions.translate import RegionTranslator
from support_slides import TileContextPipeline, cmu_slide_path


@pytest.fixture(scope="module")
def cmu(shared_data):
    return open_slide(cmu_slide_path(shared_data))


def test_polygon_runs_only_the_tiles_it_touches(cmu):
    pipe = TileContextPipeline(tile_size=128, mpp=1.0)
    triangle = [(300, 300), (1900, 300), (300, 1900)]  # level-0 px; lower-right half is outside
    result = RegionTranslator(pipe, batch_size=8, tissue_only=False)(cmu, ["Ki67"], polygon=triangle)
    assert result.region.box == (300, 300, 1600, 1600)
    assert 0 < pipe.tiles_seen < result.n_tiles and result.n_skipped == result.n_tiles - pipe.tiles_seen
    marker = np.asarray(result.layers[0].data)
    assert marker[-20:, -20:].max() == 0  # far corner: outside, no tile ran there
    assert marker[:100, :100].mean() > 0.05  # tissue inside the polygon has signal


def test_coarser_pyramid_level_gives_the_same_pixels(shared_data, cmu):
    """At 2 um/px the 3-level OME-TIFF is read from its 4x level; the SVS from level 0."""
    pyramid = open_slide(shared_data / "wsi/derived/CMU-1-Small-Region.pyramid.ome.tif")
    box = (517, 333, 1200, 1000)
    outs = []
    for slide in (cmu, pyramid):
        pipe = TileContextPipeline(tile_size=128, mpp=2.0)
        result = RegionTranslator(pipe, tissue_only=False)(slide, ["H&E"], box=box)
        outs.append(np.asarray(result.layers[0].data).astype(float))
    for slide, downsample in ((pyramid, pytest.approx(4.0, abs=0.01)), (cmu, 1.0)):
        geometry = SlideGeometry.of(slide)
        assert pick_level(geometry.dimensions, geometry.level_sizes, 2.0 / 0.499)[1] == downsample
    # the same place: pixel mean-reduced levels blur a little differently than a Gaussian, no shift
    shift, _, _ = phase_cross_correlation(outs[0].mean(axis=2), outs[1].mean(axis=2), upsample_factor=20)
    assert np.abs(shift).max() * 2.0 / 0.499 < 1.0, f"{shift} output px"
    assert np.corrcoef(outs[0].ravel(), outs[1].ravel())[0, 1] > 0.97


def test_disk_backed_sums_equal_memory_and_are_removed_after_writing(cmu, tmp_path, monkeypatch):
    box = (517, 333, 700, 600)
    memory = RegionTranslator(TileContextPipeline(), tissue_only=False)(cmu, ["HER2"], box=box)
    assert memory.workdir is None
    monkeypatch.setattr(blend, "IN_MEMORY_LIMIT_PX", 0)
    disk = RegionTranslator(TileContextPipeline(), tissue_only=False)(
        cmu, ["HER2"], box=box, workdir=tmp_path)
    assert disk.workdir is not None and disk.workdir.parent == tmp_path
    for a, b in zip(memory.layers, disk.layers):
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name
    write_translation(disk, tmp_path / "out", source=str(cmu.path))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # sums gone
    for a, b in zip(memory.layers, disk.layers):  # results now read from the written OME-Zarr
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


def test_cancel_from_progress_stops_within_one_batch_and_cleans_up(cmu, tmp_path, monkeypatch):
    monkeypatch.setattr(blend, "IN_MEMORY_LIMIT_PX", 0)  # sums on disk: there is something to clean
    pipe, token, batch = TileContextPipeline(), CancelToken(), 4

    def progress(event):
        if event.step >= 2 * batch:
            token.cancel()

    with pytest.raises(CancelledError):
        RegionTranslator(pipe, batch_size=batch, tissue_only=False)(
            cmu, ["Ki67"], box=(0, 0, 2000, 2000), progress=progress, cancel=token, workdir=tmp_path)
    assert pipe.tiles_seen == 2 * batch
    assert list(tmp_path.iterdir()) == []


KILLED_RUN = r"""
import os, signal, sys
from skimage.data import immunohistochemistry
from mupd.regions.source import ArraySlide
from mupd.regions.translate import RegionTranslator
from support_slides import TileContextPipeline

def die(event):
    os.kill(os.getpid(), signal.SIGKILL)

RegionTranslator(TileContextPipeline(), tissue_only=False)(
    ArraySlide(immunohistochemistry()[:256, :256], mpp=1.0), ["HER2"], workdir=sys.argv[1], progress=die)
"""


def test_sums_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path)], env=env, timeout=120)
    assert proc.returncode == -9
    assert [p.name.startswith("mupd-acc-") for p in tmp_path.iterdir()] == [True]  # what a kill leaves
    slide = ArraySlide(immunohistochemistry()[:256, :256], mpp=1.0)
    RegionTranslator(TileContextPipeline(), tissue_only=False)(slide, ["HER2"], workdir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_before_anything_is_written(cmu, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("user data")
    result = RegionTranslator(TileContextPipeline(), tissue_only=False)(cmu, ["HER2"], box=(0, 0, 300, 300))
    with pytest.raises(OutputExistsError, match="already exists"):
        write_translation(result, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("call, error, words", [
    (lambda t, s: t(s, ["Ki67"], box=(2000, 2900, 400, 400)), RegionError, ["outside", "2220x2967"]),
    (lambda t, s: t(s, ["Ki67"], box=(10, 10, 0, 50)), RegionError, ["empty"]),
    (lambda t, s: t(s, ["PD-L1"]), ConditionError, ["PD-L1"]),
    (lambda t, s: t(s, []), RegionError, ["no target stain"]),
    (lambda t, s: t(s, ["Ki67"], polygon=[(0, 0), (5, 5)]), RegionError, ["3"]),
])
def test_bad_requests_name_what_is_wrong(cmu, call, error, words):
    with pytest.raises(error) as info:
        call(RegionTranslator(TileContextPipeline()), cmu)
    for word in words:
        assert word in str(info.value)


def test_slide_without_mpp_asks_for_one(shared_data):
    with pytest.warns(UserWarning), open_slide(shared_data / "wsi/TCGA-CR-7395-01A-01-TS1.svs") as slide:
        with pytest.raises(SlideError, match="--mpp"):
            RegionTranslator(TileContextPipeline())(slide, ["Ki67"], box=(0, 0, 256, 256))


def test_fluorescence_slide_is_refused(shared_data):
    with open_slide(shared_data / "mif/small_vectra.qptiff") as slide:
        with pytest.raises(SlideError, match="RGB brightfield"):
            RegionTranslator(TileContextPipeline())(slide, ["Ki67"])


def test_array_slide_whole_region_runs_with_tissue_detection():
    image = immunohistochemistry()
    pipe = TileContextPipeline(tile_size=128, mpp=0.5)
    result = RegionTranslator(pipe)(ArraySlide(image, mpp=0.5), ["Ki67"])
    assert result.region.box == (0, 0, 512, 512) and result.layers[0].data.shape == (512, 512)
    assert pipe.tiles_seen == result.n_tiles - result.n_skipped > 0


def test_engine_cancel_leaves_no_output_and_no_temporary_files(cmu, tmp_path, monkeypatch):
    import tempfile

    from mupd.engine.api import TranslateRequest
    from mupd.engine.local import LocalEngine
    from support_slides import model_folder

    engine = LocalEngine(str(model_folder(tmp_path / "model")), device="cpu")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(blend, "IN_MEMORY_LIMIT_PX", 0)
    token, seen = CancelToken(), []

    def progress(event):
        seen.append(event.step)
        if event.step > 0:
            token.cancel()

    out = tmp_path / "results" / "roi"
    request = TranslateRequest(slide_path=str(cmu.path), stains=["Ki67"], box=(0, 0, 1500, 1500),
                               output_path=str(out))
    with pytest.raises(CancelledError):
        engine.translate(request, progress=progress, cancel=token)
    assert seen == [0, 8]  # one batch of 8 tiles ran, the next never started
    assert not out.parent.exists()  # nothing written, not even a partial sibling
    assert list(scratch.iterdir()) == []
