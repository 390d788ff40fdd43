"""Translate panel: virtual IHC / mIF over the selected region(s) of an open slide.

The panel only gathers choices and turns results into layers; the work is `Engine.translate`
(the same call `mupd stain` and the server make), run off the Qt thread with a progress bar.
Regions are the selected shapes, the field of view, or every annotation of one class (from a
QuPath GeoJSON opened with this plugin's reader; holes go with their region). The engine's
per-region predicted scores (`mupd.scores`) are shown in a table and exported with
`mupd.scores.write_score_files` (CSV + QuPath GeoJSON), the same files `mupd stain` writes.
"""

from __future__ import annotations

from typing import Any, Optional

from pathlib import Path

from magicgui.widgets import (CheckBox, ComboBox, Container, FileEdit, FloatSlider, FloatSpinBox,
                              Label, PushButton, RadioButtons, Select, SpinBox)
from napari.layers import Layer
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from mupd.engine.api import EngineInfo, TranslateRequest, TranslateResult
from mupd.errors import ConditionError, MuPDError, RegionError
from mupd.io import Region
from mupd.names import SOURCE
from mupd.render import IhcLook, read_ihc_look
from mupd.scores import CSV_COLUMNS, ScoredRegion, score_row, write_score_files
from mupd.stain_norm import METHODS as STAIN_NORM_METHODS

from . import _settings
from ._regions import (Polygon, area_mm2, check_inside, class_names, class_regions, is_slide_layer,
                       roi_shapes, selected_regions, slide_mpp, view_polygon)
from ._results import IHC_OPACITY, arrange, result_layers, set_rgb_opacity, stain_layer_data
from ._session import session
from ._tasks import EngineTask, RunCancel, ensure_engine, notify_error

#: Seconds per mm² of tissue before this engine has measured its own rate (whole HER2ST section
#: C2 on the 2-core CPU dev machine: 232 s for ~44 mm², rounded up; see docs/slides.md).
DEFAULT_SECONDS_PER_MM2 = {"cpu": 8.0, "mps": 2.0, "cuda": 0.5}
FIELD_OF_VIEW = "field of view"
SELECTED = "selected shapes"
CLASS = "all of class"
#: Table columns: the CSV's, whose headers say "predicted" (mupd.scores.CSV_COLUMNS).
TABLE_HEADERS = [header for header, _ in CSV_COLUMNS]


def translation_requests(slide_layer: Any, polygons: list[Polygon], stains: list[str], steps: int,
                         seed: int, render_brightfield: bool, source_guidance: float = 1.0,
                         holes: Optional[list[list[Polygon]]] = None, stain_norm: str = "none",
                         strength: float = 0.0, ihc_look: Optional[IhcLook] = None
                         ) -> list[TranslateRequest]:
    """One engine request per region of an open slide layer (level-0 polygons, each with its
    holes when given). `strength` > 0: image-to-image for RGB stains (0 here means off).
    `ihc_look`: the lab's IHC the DAB renderings match."""
    if not stains:
        raise ConditionError("pick at least one target stain or marker")
    for polygon in polygons:
        check_inside(polygon, slide_layer)
    holes = holes or [[] for _ in polygons]
    user_mpp = slide_layer.metadata["mpp"][0] if slide_layer.metadata.get("mpp_source") == "user" else None
    return [TranslateRequest(slide_path=slide_layer.metadata["slide_path"], stains=list(stains),
                             polygon=polygon, holes=[list(h) for h in cut], steps=steps, seed=seed,
                             slide_mpp=user_mpp,
                             guidance={} if source_guidance == 1.0 else {SOURCE: source_guidance},
                             render_brightfield=render_brightfield,
                             stain_norm=None if stain_norm == "none" else stain_norm,
                             strength=strength if strength > 0 else None,
                             ihc_look=None if ihc_look is None else ihc_look.to_dict())
            for polygon, cut in zip(polygons, holes)]


def fill_scores_table(table: QTableWidget, scored: list[ScoredRegion]) -> None:
    """One row per region and marker: the CSV's row (`mupd.scores.score_row`), numbers rounded."""
    rows = [score_row(item.name, s) for item in scored for s in item.scores]
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            text = ("n/a" if value is None else f"{value:.3g}" if c == 3 and isinstance(value, float)
                    else f"{value:.1f}" if isinstance(value, float) else str(value))
            item = QTableWidgetItem(text)
            item.setToolTip(TABLE_HEADERS[c])
            table.setItem(r, c, item)
    table.resizeColumnsToContents()


def add_results(viewer: Any, results: list[tuple[str, TranslateResult]],
                side_by_side: bool = False) -> list[Any]:
    """Result layers added over (or beside) their regions; returns the new layers."""
    added = []
    for region, result in results:
        for data, kwargs, kind in stain_layer_data(result.layers, region):
            added.append(viewer.add_layer(Layer.create(data, kwargs, kind)))
    arrange(added, side_by_side)
    return added


class TranslatePanel(QWidget):
    """Dock widget: stains from the engine's catalogue, region, steps, seed, Run / Cancel."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.task: Optional[EngineTask] = None
        self.source = ComboBox(label="slide", choices=self._slide_choices)
        self.stains = Select(label="stains / markers", choices=[])
        self.region = RadioButtons(label="region", choices=[SELECTED, FIELD_OF_VIEW, CLASS], value=SELECTED)
        self.klass = ComboBox(label="class", choices=self._class_choices,
                              tooltip="with 'all of class': every annotation of this class in the "
                              "Shapes layer (e.g. a QuPath GeoJSON opened with File > Open)")
        self.steps = SpinBox(label="steps", min=1, max=100, value=1,
                             tooltip="sampling steps; 1 is the one-step readout (fastest)")
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.guidance = FloatSlider(label="source guidance", min=0.0, max=5.0, value=1.0,
                                    tooltip="image guidance on the H&E: 1 = the model as trained, "
                                    ">1 pushes further from the model with the H&E hidden")
        self.stain_norm = ComboBox(label="stain normalisation", choices=["none", *STAIN_NORM_METHODS],
                                   value="none", tooltip="map this slide's H&E onto the training "
                                   "stain before the model reads it (fitted once per region)")
        self.strength = FloatSlider(label="image-to-image strength", min=0.0, max=1.0, value=0.0,
                                    tooltip="RGB stains only (e.g. H&E-FFPE for frozen -> FFPE): "
                                    "how far from the source; 0 = off (plain translation)")
        self.render = CheckBox(text="also render markers as brightfield IHC (DAB) and score cells",
                               value=True)
        self.ihc_look = FileEdit(label="IHC look of", mode="r", nullable=True,
                                 filter="Images (*.png *.jpg *.jpeg *.tif *.tiff *.svs)",
                                 tooltip="optional: an IHC image of your lab; the DAB renderings take "
                                 "its counterstain and DAB strength (empty: the defaults)")
        self.ihc_look_mpp = FloatSpinBox(label="its um/px if unknown", min=0.0, max=100.0, value=0.0,
                                         step=0.01, tooltip="pixel size of that IHC image when its "
                                         "file states none; 0: use the file's")
        self.user_mpp = FloatSpinBox(label="slide um/px if unknown", min=0.0, max=100.0, value=0.0,
                                      step=0.01, tooltip="only for files without a pixel size "
                                      "(e.g. plain JPEGs); 0: use the file's")
        self.user_mpp.native.setDecimals(4)
        self.limit = FloatSpinBox(label="max region (mm²)", min=0.01, max=10000.0, value=4.0, step=0.5,
                                  tooltip="larger regions are refused with an estimated time")
        self.side_by_side = CheckBox(text="side by side (off: overlay)", value=False)
        self.opacity = FloatSlider(label="IHC opacity", min=0.0, max=1.0, value=IHC_OPACITY)
        self.buttons = RunCancel("Translate")
        self.run_button, self.cancel_button = self.buttons.run, self.buttons.cancel
        self.status = Label(value="")
        self.form = Container(widgets=[
            self.source, self.stains, self.region, self.klass, self.steps, self.seed, self.guidance,
            self.stain_norm, self.strength, self.render, self.ihc_look, self.ihc_look_mpp,
            self.user_mpp,
            self.limit,
            self.side_by_side, self.opacity, self.buttons,
            self.status])
        self.table = QTableWidget(0, len(TABLE_HEADERS))
        self.table.setHorizontalHeaderLabels(TABLE_HEADERS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setToolTip("predicted read-outs over each region's cells (not a measured stain): "
                              "% of cells at or above the marker's positivity threshold, H-score "
                              "= 1 x %1+ + 2 x %2+ + 3 x %3+ (bins in the stain catalogue, mupd/resources/stains.json)")
        self.export_folder = FileEdit(label="scores folder", mode="d")
        self.export_button = PushButton(text="Export scores (CSV + QuPath GeoJSON)", enabled=False)
        self.export_form = Container(widgets=[self.export_folder, self.export_button])
        self.scored: list[ScoredRegion] = []
        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        layout.addWidget(self.table)
        layout.addWidget(self.export_form.native)
        layout.addStretch()

        self._saved_stains = _settings.load("translate-stains").get("stains", [])
        _settings.persist("translate", {"region": self.region, "steps": self.steps,
                                        "seed": self.seed, "guidance": self.guidance,
                                        "stain_norm": self.stain_norm, "strength": self.strength,
                                        "render": self.render, "ihc_look": self.ihc_look,
                                        "ihc_look_mpp": self.ihc_look_mpp,
                                        "limit": self.limit, "side_by_side": self.side_by_side,
                                        "opacity": self.opacity})
        self.stains.changed.connect(self._save_stains)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.export_button.changed.connect(lambda: self.export_scores(self.export_folder.value))
        self.side_by_side.changed.connect(lambda on: arrange(result_layers(self.viewer), on))
        self.opacity.changed.connect(lambda v: set_rgb_opacity(result_layers(self.viewer), v))
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda _e: self.source.reset_choices())
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed,
                      napari_viewer.layers.selection.events.active):
            event.connect(lambda _e: self.klass.reset_choices())
        session().changed.connect(self._on_engine)
        if session().current_info is not None:
            self._on_engine(session().current_info)
        else:
            ensure_engine()

    # -- choices ---------------------------------------------------------------------------
    def _slide_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers if is_slide_layer(layer)]

    def _class_choices(self, _widget: Any = None) -> list[str]:
        return class_names(roi_shapes(self.viewer))

    def _on_engine(self, info: EngineInfo) -> None:
        wanted = list(self.stains.value or self._saved_stains)
        names = [t["name"] for t in info.targets]
        self.stains.choices = names
        self.stains.value = [s for s in wanted if s in names]

    def _save_stains(self, value: Any) -> None:
        self._saved_stains = list(value)
        _settings.save("translate-stains", {"stains": self._saved_stains})

    # -- work ------------------------------------------------------------------------------
    def regions(self, slide_layer: Any) -> list[Region]:
        """The regions to translate, named (level-0 outlines, holes, classes)."""
        if self.region.value == FIELD_OF_VIEW:
            return [Region(view_polygon(self.viewer, slide_layer), name="view")]
        if self.region.value == CLASS:
            self.klass.reset_choices()
            if not self.klass.value:
                raise RegionError("no annotation class to translate: open a QuPath GeoJSON (File > "
                                  "Open) or give shapes a 'classification' feature, then pick a class")
            regions = class_regions(roi_shapes(self.viewer), slide_layer, self.klass.value)
            default = f"{self.klass.value} {{}}"
        else:
            regions = selected_regions(roi_shapes(self.viewer), slide_layer)
            default = "ROI {}"
        for i, r in enumerate(regions):
            r.name = r.name or default.format(i + 1)
        return regions

    def look(self) -> Optional[IhcLook]:
        """The lab IHC's look when a file is given and IHC is rendered (measured here: ~1 s)."""
        if not self.render.value or self.ihc_look.value is None:
            return None
        return read_ihc_look(self.ihc_look.value, self.ihc_look_mpp.value or None)

    def _check_size(self, area: float) -> None:
        if area > self.limit.value:
            rate = self._rate()
            raise RegionError(
                f"region is {area:.2f} mm², larger than the {self.limit.value:g} mm² limit "
                f"(estimated {area * rate / 60:.1f} min on {self._device()} at {rate:.1f} s/mm²): "
                "draw a smaller region or raise 'max region' in the panel")

    def _device(self) -> str:
        info = session().current_info
        return info.device.split(":")[0] if info else "cpu"

    def _rate(self) -> float:
        measured = _settings.load("translate-rate").get(self._device())
        return float(measured or DEFAULT_SECONDS_PER_MM2.get(self._device(), 8.0))

    def run(self) -> Optional[EngineTask]:
        """Check the inputs here (instant errors), then translate each region in a worker."""
        try:
            slide_layer = self.source.value
            if slide_layer is None:
                raise RegionError("no slide is open: open a slide (File > Open) with the napari-mupd reader")
            named = self.regions(slide_layer)  # before any calibration: drawn in the layer's units
            mpp = slide_mpp(slide_layer) or self._calibrate(slide_layer)
            area = sum(area_mm2(r.polygon, mpp) for r in named)
            self._check_size(area)
            requests = translation_requests(slide_layer, [r.polygon for r in named],
                                            list(self.stains.value), self.steps.value,
                                            self.seed.value, self.render.value,
                                            round(self.guidance.value, 2), [r.holes for r in named],
                                            self.stain_norm.value, round(self.strength.value, 2),
                                            self.look())
        except MuPDError as exc:
            notify_error(exc, "Translate")
            return None
        names = [r.name for r in named]

        def call(progress, cancel) -> list[tuple[str, TranslateResult]]:
            engine = session().engine()
            return [(name, engine.translate(req, progress, cancel)) for name, req in zip(names, requests)]

        def done(results: list[tuple[str, TranslateResult]]) -> None:
            add_results(self.viewer, results, self.side_by_side.value)
            self.show_scores([ScoredRegion(r, res.scores, res.cells) for r, (_, res) in zip(named, results)])
            seconds = sum(r.seconds for _, r in results)
            tiles = sum(r.n_tiles for _, r in results)
            if area > 0 and seconds > 0:
                _settings.save("translate-rate", {**_settings.load("translate-rate"),
                                                  self._device(): seconds / area})
            self.status.value = f"{tiles} tiles, {area:.3f} mm² in {seconds:.1f} s"
            show_info(f"virtual stains added for {', '.join(names)}")

        self.buttons.busy(True)
        self.status.value = f"translating {area:.3f} mm²..."
        self.task = EngineTask(call, "Virtual staining", on_done=done,
                               on_finished=lambda: self.buttons.busy(False),
                               on_error=lambda e: setattr(self.status, "value", "failed")).start()
        return self.task

    def show_scores(self, scored: list[ScoredRegion]) -> None:
        """The table of the latest run's scores (kept for export)."""
        self.scored = [s for s in scored if s.scores]
        fill_scores_table(self.table, self.scored)
        self.export_button.enabled = bool(self.scored)

    def export_scores(self, folder: Any) -> list[Path]:
        """`scores.csv` and `scores-<marker>.geojson` of the latest run into `folder` (made if
        missing; existing files are never replaced)."""
        try:
            if not self.scored:
                raise ConditionError("no scores to export: translate a region with a marker, with "
                                     "'render markers as brightfield IHC' on")
            if not folder or str(folder) in ("", "."):
                raise ConditionError("choose a folder for the scores first")
            Path(folder).mkdir(parents=True, exist_ok=True)
            written = write_score_files(folder, self.scored)
        except (MuPDError, OSError) as exc:
            notify_error(exc, "Export scores")
            return []
        show_info(f"scores of {len(self.scored)} region(s) written to {folder}")
        return written

    def _calibrate(self, slide_layer: Any) -> float:
        """Give an uncalibrated slide the user's pixel size: layer scale and metadata alike."""
        mpp = float(self.user_mpp.value)
        if mpp <= 0:
            raise RegionError(f"{slide_layer.name!r} has no pixel size (mpp) in its file: the model works "
                              "at a fixed um/px, so enter the slide's 'um/px' in the panel first")
        slide_layer.metadata = {**slide_layer.metadata, "mpp": (mpp, mpp), "mpp_known": True,
                                "mpp_source": "user"}
        for layer in [slide_layer, *(l for l in self.viewer.layers if l._type_string == "shapes"
                                      and tuple(l.scale[-2:]) == tuple(slide_layer.scale[-2:]))]:
            layer.scale = (mpp, mpp)  # shapes drawn over the uncalibrated slide move with it
            layer.units = ("um", "um")
        show_info(f"{slide_layer.name} calibrated at {mpp:g} um/px (user-given)")
        return mpp

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.status.value = "cancelling..."
