"""The one engine every panel talks to, local or remote, and the signal that says it changed.

Panels never build engines themselves: the Engine panel (or the first job that needs one)
installs it here, and `changed` tells the others (stain lists, model choices) on the Qt main
thread, even when the engine was created in a worker.
"""

from __future__ import annotations

import threading
from typing import Optional

from qtpy.QtCore import QObject, Signal

from mupd.engine.api import Engine, EngineInfo


def make_local_engine(model: Optional[str] = None, device: str = "auto") -> Engine:
    """The in-process engine (loads torch and the model: call it from a worker thread)."""
    from mupd.engine.local import LocalEngine

    return LocalEngine(model_path=model or None, device=device)


def make_remote_engine(url: str, token: str, model: Optional[str] = None) -> Engine:
    """A client for `mupd serve`; asks for /info at once so a bad URL or token fails here."""
    from mupd.engine.remote import RemoteEngine
    from mupd.errors import MuPDError

    if not url.strip():
        raise MuPDError("remote engine: give the server URL, e.g. http://gpu-box:8765")
    if not token.strip():
        raise MuPDError("remote engine: give the server's token (or a token file)")
    engine = RemoteEngine(url.strip(), token.strip())
    try:
        if model:
            engine.load_model(model)
        else:
            engine.info()
    except BaseException:
        engine.close()
        raise
    return engine


class EngineSession(QObject):
    """Holds the current engine and its info; `changed(EngineInfo)` fires on the main thread."""

    changed = Signal(object)
    models_changed = Signal()  # a model folder was made (fine-tuning) or opened

    def __init__(self) -> None:
        super().__init__()
        self._engine: Optional[Engine] = None
        self._info: Optional[EngineInfo] = None
        self._models: list[str] = []
        self._lock = threading.Lock()

    @property
    def current_info(self) -> Optional[EngineInfo]:
        return self._info

    @property
    def models(self) -> list[str]:
        """Model folders the current engine knows (as of the last refresh: no call on the Qt thread)."""
        return list(self._models)

    def refresh_models(self) -> list[str]:
        """Ask the engine for its models (call from a worker: remote engines answer over HTTP)."""
        engine = self._engine
        self._models = list(engine.list_models()) if engine is not None else []
        return self.models

    def engine(self) -> Engine:
        """The current engine, creating the local one with the bundled model on first use."""
        with self._lock:
            if self._engine is None:
                engine = make_local_engine()
                self._set(engine, engine.info())
            return self._engine

    def install(self, engine: Engine, info: Optional[EngineInfo] = None) -> EngineInfo:
        """Make `engine` the current one (closing a remote client it replaces)."""
        with self._lock:
            old = self._engine
            self._set(engine, info or engine.info())
        if old is not None and old is not engine and hasattr(old, "close"):
            old.close()
        return self._info

    def _set(self, engine: Engine, info: EngineInfo) -> None:
        self._engine, self._info = engine, info
        self.refresh_models()
        self.changed.emit(info)

    def reset(self) -> None:
        """Forget the engine (tests; the next job creates a fresh local one)."""
        with self._lock:
            engine, self._engine, self._info = self._engine, None, None
        if engine is not None and hasattr(engine, "close"):
            engine.close()


_SESSION: Optional[EngineSession] = None


def session() -> EngineSession:
    """The process-wide session (created on the Qt main thread by the first panel)."""
    global _SESSION
    if _SESSION is None:
        _SESSION = EngineSession()
    return _SESSION
