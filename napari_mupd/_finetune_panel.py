"""Fine-tune panel: gathers settings and data, then runs the engine's fine-tune job.

Data comes from a folder (pairs, spots or captioned tiles, checked by the engine before any
training) or from two open layers over the same region, which are cut here into a pairs folder
at the model's mpp. Training itself is the engine job `mupd finetune` runs; the panel polls it
off the Qt thread, plots the loss with matplotlib and registers the new model when it is done.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from magicgui.widgets import (ComboBox, Container, FileEdit, FloatSpinBox, Label, LineEdit,
                              RadioButtons, SpinBox)
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QVBoxLayout, QWidget

from mupd.engine.api import EngineInfo, JobStatus
from mupd.errors import CancelledError, DataError, MuPDError
from mupd.progress import ProgressEvent
from mupd.requests import FinetuneRequest

from . import _settings
from ._regions import is_slide_layer
from ._results import stain_of
from ._session import session
from ._tasks import EngineTask, RunCancel, notify_error

FOLDER, LAYERS = "folder", "open layers"
POLL_S = 0.5


def _world_box(layer: Any) -> np.ndarray:
    """[[y0, x0], [y1, x1]] of a 2-D image layer in world units (micrometres)."""
    return np.asarray(layer.extent.world)[:, -2:]


def _crop_world(layer: Any, box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The layer's pixels over a world box, resampled to `shape` (from level 0 of a pyramid) by
    the engine's one resampler, so fine-tuning pairs are cut as inference tiles are."""
    from mupd.io.resample import array_reader, resample_window

    data = layer.data[0] if layer.multiscale else layer.data
    # world_to_data gives pixel-centre coordinates; the resampler takes pixel edges (+0.5)
    (r0, c0), (r1, c1) = (np.asarray(layer.world_to_data(p))[-2:] + 0.5 for p in box)
    return resample_window(array_reader(data), c0, r0, shape[1], shape[0],
                           (c1 - c0) / shape[1], (r1 - r0) / shape[0])


def layers_to_pairs(source: Any, target: Any, stain: str, tile: int, mpp: float, out: Path) -> int:
    """Cut two overlapping layers at the model's mpp into a pairs folder (`out/HE` +
    `out/<stain>`, `mupd.data.pairs.write_pair_folder`); returns the count."""
    from mupd.data.pairs import write_pair_folder

    lo = np.maximum(_world_box(source)[0], _world_box(target)[0])
    hi = np.minimum(_world_box(source)[1], _world_box(target)[1])
    size_px = np.floor((hi - lo) / mpp).astype(int)
    rows, cols = (size_px // tile).tolist()
    if rows < 1 or cols < 1:
        raise DataError(f"layers {source.name!r} and {target.name!r} overlap by "
                        f"{max(hi[1] - lo[1], 0):.0f} x {max(hi[0] - lo[0], 0):.0f} um: fine-tuning needs "
                        f"at least one {tile * mpp:.0f} um tile in common")
    shape = (rows * tile, cols * tile)
    box = np.array([lo, lo + np.array(shape) * mpp])
    he = _crop_world(source, box, shape)
    tgt = _crop_world(target, box, shape)
    if tgt.ndim == 2:  # a marker map: keep its contrast range as 8-bit grey
        lo_v, hi_v = target.contrast_limits
        tgt = np.clip((tgt - lo_v) / max(hi_v - lo_v, 1e-9), 0, 1) * 255
    return write_pair_folder(he.round().astype(np.uint8), tgt.round().astype(np.uint8), stain, tile, out)


def default_output(base: str) -> str:
    from mupd.paths import cache_dir

    return str(cache_dir() / "models" / f"{Path(base).name}-ft-{time.strftime('%Y%m%d-%H%M%S')}")


class FinetunePanel(QWidget):
    """Dock widget: data, base model, LoRA/full, steps, learning rate; Start / Cancel; loss plot."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.task: Optional[EngineTask] = None
        self.history: list[tuple[int, float]] = []
        self.source_kind = RadioButtons(label="data from", choices=[FOLDER, LAYERS], value=FOLDER,
                                        orientation="horizontal")
        self.folder = FileEdit(label="data folder", mode="d", value="",
                               tooltip="pairs (HE/ + one folder per stain), captioned tiles or spots")
        self.source_layer = ComboBox(label="H&E layer", choices=self._image_choices)
        self.target_layer = ComboBox(label="target layer", choices=self._image_choices)
        self.stain = LineEdit(label="target stain name", value="",
                              tooltip="a catalogue name, or a new one the model will learn")
        self.base = ComboBox(label="base model", choices=self._model_choices)
        self.method = ComboBox(label="method", choices=["lora", "full"], value="lora")
        self.steps = SpinBox(label="steps", min=1, max=100000, value=200)
        self.lr = FloatSpinBox(label="learning rate", min=1e-7, max=1e-2, value=1e-4, step=1e-5)
        self.lr.native.setDecimals(7)
        self.output = LineEdit(label="output folder", value="",
                               tooltip="a new folder (default: in the user cache, named after the base)")
        self.buttons = RunCancel("Start fine-tuning")
        self.start_button, self.cancel_button = self.buttons.run, self.buttons.cancel
        self.status = Label(value="")
        self.form = Container(widgets=[
            self.source_kind, self.folder, self.source_layer, self.target_layer, self.stain, self.base,
            self.method, self.steps, self.lr, self.output,
            self.buttons,
            self.status])
        self.figure = Figure(figsize=(4, 2.2), tight_layout=True)
        self.axes = self.figure.add_subplot()
        self.canvas = FigureCanvasQTAgg(self.figure)
        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        layout.addWidget(self.canvas)
        layout.addStretch()
        self._plot()
        _settings.persist("finetune", {"source_kind": self.source_kind, "folder": self.folder,
                                       "stain": self.stain, "method": self.method,
                                       "steps": self.steps, "lr": self.lr})
        self.source_kind.changed.connect(self._show_kind)
        self.start_button.changed.connect(self.start)
        self.cancel_button.changed.connect(lambda: self.task and self.task.cancel())
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda _e: (self.source_layer.reset_choices(), self.target_layer.reset_choices()))
        # bound methods of this QWidget: Qt drops the connections when the panel is deleted
        session().changed.connect(self._refresh_models)
        session().models_changed.connect(self._refresh_models)
        self._show_kind(self.source_kind.value)

    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(l.name, l) for l in self.viewer.layers if l._type_string == "image"]

    def _model_choices(self, _widget: Any = None) -> list[str]:
        info = session().current_info
        current = [info.model_path] if info else []
        return current + [m for m in session().models if m not in current]

    def _refresh_models(self, *_: Any) -> None:
        self.base.reset_choices()

    def _show_kind(self, kind: str) -> None:
        layers = kind == LAYERS
        self.folder.visible = not layers
        for w in (self.source_layer, self.target_layer, self.stain):
            w.visible = layers

    def _plot(self) -> None:
        self.axes.clear()
        self.axes.set_xlabel("step")
        self.axes.set_ylabel("loss")
        if self.history:
            steps, losses = zip(*self.history)
            self.axes.plot(steps, losses, color="tab:blue")
        else:
            self.axes.text(0.5, 0.5, "loss appears here while training", ha="center", va="center",
                           transform=self.axes.transAxes, color="gray")
        self.canvas.draw_idle()

    # -- work --------------------------------------------------------------------------------
    def _data_dir(self, info: Optional[EngineInfo], output: str) -> str:
        if self.source_kind.value == FOLDER:
            folder = str(self.folder.value)
            if folder in ("", ".") or not Path(folder).is_dir():
                raise DataError(f"data folder {folder!r} does not exist: choose a folder of pairs, "
                                "captioned tiles or spots")
            return folder
        src, tgt = self.source_layer.value, self.target_layer.value
        stain = self.stain.value.strip() or (stain_of(tgt.name) if tgt is not None else "")
        if src is None or tgt is None or src is tgt:
            raise DataError("choose two different image layers: the H&E and its target stain")
        if not is_slide_layer(src):
            raise DataError(f"layer {src.name!r} is not a slide opened with napari-mupd (no mpp)")
        if not re.fullmatch(r"[A-Za-z0-9&+_.-]+", stain):
            raise DataError(f"target stain name {stain!r}: use letters, digits and & + _ . - only")
        if info is None:
            raise DataError("the engine is still loading: try again in a moment")
        if info.remote:  # the pairs would be cut into a folder on this machine
            raise DataError("pairs cut from open layers are written on this machine, which the remote "
                            "engine cannot read: cut them with a local engine, copy the pairs folder "
                            "into the server's data roots and fine-tune from that folder")
        data = Path(f"{output}.pairs")
        if data.exists():
            raise DataError(f"{data} already exists: choose another output folder")
        n = layers_to_pairs(src, tgt, stain, info.tile_size, info.mpp, data)
        show_info(f"{n} tile pairs of {src.name!r} -> {stain} written to {data}")
        return str(data)

    def request(self) -> FinetuneRequest:
        info = session().current_info
        base = self.base.value or (info.model_path if info else None)
        output = self.output.value.strip() or default_output(base or "mupd")
        if Path(output).exists():
            raise DataError(f"output folder {output} already exists: fine-tuning never overwrites a model")
        return FinetuneRequest(data_dir=self._data_dir(info, output), output_dir=output,
                               base_model=base, method=self.method.value, steps=self.steps.value,
                               learning_rate=self.lr.value)

    def start(self) -> Optional[EngineTask]:
        try:
            request = self.request()
        except MuPDError as exc:
            notify_error(exc, "Fine-tune")
            return None
        self.history = []
        self._plot()

        def call(progress, cancel) -> JobStatus:
            engine = session().engine()
            status = engine.start_finetune(request)
            while status.state not in ("done", "failed", "cancelled"):
                if cancel.cancelled:
                    engine.cancel_job(status.job_id)
                time.sleep(POLL_S)
                status = engine.job_status(status.job_id)
                progress(ProgressEvent("train", status.step, status.total or None,
                                       message=f"step {status.step}/{status.total}", metrics=status.metrics))
            if status.state == "cancelled":
                raise CancelledError(f"fine-tuning cancelled at step {status.step}")
            if status.state == "failed":
                raise MuPDError(status.message or "the fine-tune job failed")
            session().refresh_models()
            return status

        self.buttons.busy(True)
        self.status.value = f"fine-tuning {Path(request.base_model or '').name} -> {request.output_dir}"
        self.task = EngineTask(call, "Fine-tuning", on_done=self._finished,
                               on_finished=lambda: self.buttons.busy(False), on_progress=self._progress,
                               on_error=lambda e: setattr(self.status, "value", f"stopped: {e}"))
        return self.task.start()

    def _progress(self, event: ProgressEvent) -> None:
        loss = event.metrics.get("loss")
        if loss is not None and (not self.history or event.step > self.history[-1][0]):
            self.history.append((event.step, float(loss)))
            self._plot()

    def _finished(self, status: JobStatus) -> None:
        self.status.value = f"done: {status.result_path}"
        show_info(f"fine-tuned model saved to {status.result_path}; it is now listed in the Engine panel")
        session().models_changed.emit()
