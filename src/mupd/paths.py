"""Where the project's bundled resources and caches live (local paths only, never a hub)."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import platformdirs

#: Package data of `mupd` (stain catalogue, RNA panels, bundled models), so that an editable
#: install, `pip install .` and a wheel find the same files; MUPD_RESOURCES points elsewhere.
RESOURCES = Path(os.environ.get("MUPD_RESOURCES") or files("mupd") / "resources")
STAIN_CATALOGUE = RESOURCES / "stains.json"
DEFAULT_MODEL = RESOURCES / "models" / "mupd-tiny"


def cache_dir() -> Path:
    """Per-user cache (sample slide, extracted wheels); override with MUPD_CACHE."""
    path = Path(os.environ.get("MUPD_CACHE", platformdirs.user_cache_dir("napari-mupd")))
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_dir() -> Path:
    """Per-user settings (panel values, remembered between napari sessions); override with MUPD_CONFIG."""
    path = Path(os.environ.get("MUPD_CONFIG", platformdirs.user_config_dir("napari-mupd")))
    path.mkdir(parents=True, exist_ok=True)
    return path
