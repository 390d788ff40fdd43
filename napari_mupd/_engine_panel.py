"""Engine panel: where the model runs (this machine or a `mupd serve` GPU box) and which model.

Connecting builds the engine in a worker (loading torch and weights takes seconds) and installs
it in the shared session, so every other panel follows. The token is never saved to disk; a
token file path is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton, RadioButtons
from qtpy.QtWidgets import QVBoxLayout, QWidget

from mupd.engine.api import EngineInfo

from . import _settings
from ._session import make_local_engine, make_remote_engine, session
from ._tasks import EngineTask

LOCAL, REMOTE = "local", "remote"


def card_summary(card: str, lines: int = 6) -> str:
    """The first lines of a model card's prose (headings and tables skipped)."""
    keep = [l.strip() for l in card.splitlines()
            if l.strip() and not l.lstrip().startswith(("#", "|", "```"))]
    return "\n".join(keep[:lines])


def describe(info: EngineInfo) -> str:
    stains = ", ".join(t["name"] for t in info.targets if t.get("kind") == "rgb")
    markers = ", ".join(t["name"] for t in info.targets if t.get("kind") == "marker")
    where = "remote" if info.remote else "local"
    return (f"<b>{info.model_name}</b> on <b>{info.device}</b> ({where})<br>"
            f"{info.tile_size} px tiles at {info.mpp:g} um/px, {len(info.rna_genes)} RNA genes<br>"
            f"stains: {stains or '-'}<br>markers: {markers or '-'}<br>"
            f"<small>{card_summary(info.model_card).replace(chr(10), '<br>')}</small>")


class EnginePanel(QWidget):
    """Dock widget: local (device auto-picked) or remote (URL + token), model folder, info."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.task: Optional[EngineTask] = None
        self.mode = RadioButtons(label="engine", choices=[LOCAL, REMOTE], value=LOCAL,
                                 orientation="horizontal")
        self.device = ComboBox(label="device", choices=["auto", "cuda", "mps", "cpu"], value="auto",
                               tooltip="auto: CUDA, then Apple MPS, then CPU")
        self.url = LineEdit(label="server URL", value="http://127.0.0.1:8765")
        self.token = LineEdit(label="token")
        self.token.native.setEchoMode(self.token.native.EchoMode.Password)
        self.token_file = FileEdit(label="or token file", mode="r", value="")
        self.model = ComboBox(label="model", choices=self._model_choices,
                              tooltip="the bundled model, models you opened or fine-tuned")
        self.browse = FileEdit(label="open model folder", mode="d", value="")
        self.connect_button = PushButton(text="Connect / load model")
        self.finetune_button = PushButton(text="Fine-tune...")
        self.info = Label(value="no engine yet: the first job loads the bundled model locally")
        self.info.native.setWordWrap(True)
        self.form = Container(widgets=[self.mode, self.device, self.url, self.token, self.token_file,
                                       self.model, self.browse, self.connect_button,
                                       self.finetune_button, self.info])
        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        layout.addStretch()
        _settings.persist("engine", {"mode": self.mode, "device": self.device, "url": self.url,
                                     "token_file": self.token_file})
        self.mode.changed.connect(self._show_mode)
        self.browse.changed.connect(self._add_browsed)
        self.connect_button.changed.connect(self.connect)
        self.finetune_button.changed.connect(self._open_finetune)
        session().changed.connect(self._on_engine)
        session().models_changed.connect(self._refresh_models)  # a bound method: dropped with the panel
        self._show_mode(self.mode.value)
        if session().current_info is not None:
            self._on_engine(session().current_info)

    # -- choices -----------------------------------------------------------------------------
    def _model_choices(self, _widget: Any = None) -> list[str]:
        from mupd.paths import DEFAULT_MODEL

        return session().models or [str(DEFAULT_MODEL)]

    def _add_browsed(self, folder: Any) -> None:
        path = str(folder)
        if path and path != "." and Path(path).is_dir():
            choices = list(self.model.choices)
            if path not in choices:
                self.model.choices = choices + [path]
            self.model.value = path

    def _show_mode(self, mode: str) -> None:
        remote = mode == REMOTE
        self.device.visible = not remote
        for w in (self.url, self.token, self.token_file):
            w.visible = remote

    def _on_engine(self, info: EngineInfo) -> None:
        self.info.value = describe(info)
        self._refresh_models()

    def _refresh_models(self, *_: Any) -> None:
        self.model.reset_choices()

    # -- actions -----------------------------------------------------------------------------
    def _token(self) -> str:
        if self.token.value.strip():
            return self.token.value
        path = str(self.token_file.value)
        if path and path != ".":
            from mupd.engine.remote import read_token_file

            return read_token_file(path)
        return ""

    def connect(self) -> Optional[EngineTask]:
        """Build the chosen engine off the Qt thread; on success every panel switches to it."""
        remote, model, device = self.mode.value == REMOTE, self.model.value, self.device.value
        url = self.url.value

        def call(progress, cancel):
            if remote:
                engine = make_remote_engine(url, self._token())  # the server's own model
            else:
                engine = make_local_engine(model, device)
            return session().install(engine)

        self.connect_button.enabled = False
        self.info.value = f"connecting to {url}..." if remote else f"loading {Path(model).name}..."
        self.task = EngineTask(call, "Engine", on_done=lambda _info: None,
                               on_error=lambda exc: setattr(self.info, "value", f"not connected: {exc}"),
                               on_finished=lambda: setattr(self.connect_button, "enabled", True))
        return self.task.start()

    def _open_finetune(self) -> None:
        self.viewer.window.add_plugin_dock_widget("napari-mupd", "Fine-tune")
