"""Translate panel: virtual IHC / mIF over the selected region(s) of an open slide.

The panel only gathers choices and turns results into layers; the work is `Engine.translate`
(the same call `mupd stain` and the server make), run off the Qt thread with a progress bar.
"""

from __future__ import annotations

from typing import Any, Optional

from magicgui.widgets import (CheckBox, ComboBox, Container, FloatSlider, FloatSpinBox, Label,
                              RadioButtons, Select, SpinBox)
from napari.layers import Layer
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QVBoxLayout, QWidget

from mupd.engine.api import EngineInfo, TranslateRequest, TranslateResult
from mupd.errors import ConditionError, MuPDError, RegionError

from . import _settings
from ._regions import (Polygon, area_mm2, check_inside, is_slide_layer, roi_shapes,
                       selected_polygons, slide_mpp, view_polygon)
from ._results import IHC_OPACITY, arrange, result_layers, set_rgb_opacity, stain_layer_data
from ._session import session
from ._tasks import EngineTask, RunCancel, ensure_engine, notify_error

#: Seconds per mm² of tissue before this engine has measured its own rate (whole HER2ST section
#: C2 on the 2-core CPU dev machine: 232 s for ~44 mm², rounded up; see docs/slides.md).
DEFAULT_SECONDS_PER_MM2 = {"cpu": 8.0, "mps": 2.0, "cuda": 0.5}
FIELD_OF_VIEW = "field of view"
SELECTED = "selected shapes"


def translation_requests(slide_layer: Any, polygons: list[Polygon], stains: list[str], steps: int,
                         seed: int, render_brightfield: bool,
                         source_guidance: float = 1.0) -> list[TranslateRequest]:
    """One engine request per region of an open slide layer (level-0 polygons)."""
    if not stains:
        raise ConditionError("pick at least one target stain or marker")
    for polygon in polygons:
        check_inside(polygon, slide_layer)
    user_mpp = slide_layer.metadata["mpp"][0] if slide_layer.metadata.get("mpp_source") == "user" else None
    return [TranslateRequest(slide_path=slide_layer.metadata["slide_path"], stains=list(stains),
                             polygon=polygon, steps=steps, seed=seed, slide_mpp=user_mpp,
                             guidance={} if source_guidance == 1.0 else {"source": source_guidance},
                             render_brightfield=render_brightfield) for polygon in polygons]


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
        self.region = RadioButtons(label="region", choices=[SELECTED, FIELD_OF_VIEW], value=SELECTED)
        self.steps = SpinBox(label="steps", min=1, max=100, value=1,
                             tooltip="sampling steps; 1 is the one-step readout (fastest)")
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.guidance = FloatSlider(label="source guidance", min=0.0, max=5.0, value=1.0,
                                    tooltip="image guidance on the H&E: 1 = the model as trained, "
                                    ">1 pushes further from the model with the H&E hidden")
        self.render = CheckBox(text="also render markers as brightfield IHC (DAB)", value=True)
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
            self.source, self.stains, self.region, self.steps, self.seed, self.guidance, self.render,
            self.user_mpp,
            self.limit,
            self.side_by_side, self.opacity, self.buttons,
            self.status])
        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        layout.addStretch()

        self._saved_stains = _settings.load("translate-stains").get("stains", [])
        _settings.persist("translate", {"region": self.region, "steps": self.steps,
                                        "seed": self.seed, "guidance": self.guidance,
                                        "render": self.render,
                                        "limit": self.limit, "side_by_side": self.side_by_side,
                                        "opacity": self.opacity})
        self.stains.changed.connect(self._save_stains)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.side_by_side.changed.connect(lambda on: arrange(result_layers(self.viewer), on))
        self.opacity.changed.connect(lambda v: set_rgb_opacity(result_layers(self.viewer), v))
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda _e: self.source.reset_choices())
        session().changed.connect(self._on_engine)
        if session().current_info is not None:
            self._on_engine(session().current_info)
        else:
            ensure_engine()

    # -- choices ---------------------------------------------------------------------------
    def _slide_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers if is_slide_layer(layer)]

    def _on_engine(self, info: EngineInfo) -> None:
        wanted = list(self.stains.value or self._saved_stains)
        names = [t["name"] for t in info.targets]
        self.stains.choices = names
        self.stains.value = [s for s in wanted if s in names]

    def _save_stains(self, value: Any) -> None:
        self._saved_stains = list(value)
        _settings.save("translate-stains", {"stains": self._saved_stains})

    # -- work ------------------------------------------------------------------------------
    def regions(self, slide_layer: Any) -> list[tuple[str, Polygon]]:
        if self.region.value == FIELD_OF_VIEW:
            return [("view", view_polygon(self.viewer, slide_layer))]
        polygons = selected_polygons(roi_shapes(self.viewer), slide_layer)
        return [(f"ROI {i + 1}", p) for i, p in enumerate(polygons)]

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
            area = sum(area_mm2(p, mpp) for _, p in named)
            self._check_size(area)
            requests = translation_requests(slide_layer, [p for _, p in named], list(self.stains.value),
                                            self.steps.value, self.seed.value, self.render.value,
                                            round(self.guidance.value, 2))
        except MuPDError as exc:
            notify_error(exc, "Translate")
            return None
        names = [n for n, _ in named]

        def call(progress, cancel) -> list[tuple[str, TranslateResult]]:
            engine = session().engine()
            return [(name, engine.translate(req, progress, cancel)) for name, req in zip(names, requests)]

        def done(results: list[tuple[str, TranslateResult]]) -> None:
            add_results(self.viewer, results, self.side_by_side.value)
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
