"""Panel values remembered between napari sessions: one small JSON file per user.

Each panel names the magicgui widgets it wants kept; their values are restored when the panel
opens and written whenever one changes. Secrets (the remote token) are never passed here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)


def settings_path() -> Path:
    from mupd.paths import config_dir

    return config_dir() / "plugin-settings.json"


def _read_all() -> dict[str, Any]:
    try:
        data = json.loads(settings_path().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # a damaged file costs the saved values, not the panel
        log.warning("ignoring unreadable panel settings %s: %s", settings_path(), exc)
        return {}
    return data if isinstance(data, dict) else {}


def load(panel: str) -> dict[str, Any]:
    values = _read_all().get(panel, {})
    return values if isinstance(values, dict) else {}


def save(panel: str, values: Mapping[str, Any]) -> None:
    """Write one panel's values atomically (a crash never leaves a half-written settings file)."""
    from mupd.io.atomic import atomic_write_text

    data = _read_all()
    data[panel] = {k: _jsonable(v) for k, v in values.items()}
    atomic_write_text(settings_path(), json.dumps(data, indent=1), fsync=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def persist(panel: str, widgets: Mapping[str, Any]) -> None:
    """Restore saved values into `widgets` (magicgui value widgets), then save on every change."""
    saved = load(panel)
    for name, widget in widgets.items():
        if name in saved:
            try:
                widget.value = saved[name]
            except (ValueError, TypeError, KeyError):  # e.g. a choice that no longer exists
                log.info("panel %s: saved %s=%r no longer applies", panel, name, saved[name])

    def write(*_: Any) -> None:
        save(panel, {n: w.value for n, w in widgets.items()})

    for widget in widgets.values():
        widget.changed.connect(write)
