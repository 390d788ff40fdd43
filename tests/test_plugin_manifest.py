"""The npe2 manifest: valid, found by napari, one file; and the import contract both ways: the
plugin never imports torch (the panels reach torch only through a local engine, created when a
job needs it), the engine never imports napari or Qt; and training never imports the engine
(the engine runs training, so an import back would be a cycle)."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
#: Imports every module of a package (argv[1]), then prints every loaded module's name.
IMPORT_ALL = """
import importlib, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(module.name)
print(" ".join(sorted(sys.modules)))
"""


def _modules_loaded_by_all_of(package: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, package], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def _imported_by_all_of(package: str) -> set[str]:
    """The top-level packages that importing every module of `package` loads."""
    return {name.split(".")[0] for name in _modules_loaded_by_all_of(package)}


def test_manifest_validates() -> None:
    npe2 = Path(sys.executable).with_name("npe2")
    proc = subprocess.run([str(npe2), "validate", "napari-mupd"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout


def test_package_manifest_is_the_top_level_file() -> None:
    inner = REPO / "napari_mupd" / "napari.yaml"
    assert inner.is_symlink()
    assert inner.resolve() == (REPO / "napari.yaml").resolve()
    assert inner.read_bytes() == (REPO / "napari.yaml").read_bytes()


def test_napari_finds_reader_writers_and_sample() -> None:
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-mupd")
    assert manifest.display_name == "MuPD"
    for name in ("slide.svs", "slide.ndpi", "slide.ome.tif", "panel.qptiff", "he.jpg", "image.zarr", "slide.mrxs",
                 "slide.bif", "slide.vms", "slide.vmu", "level0.dcm", "philips.tiff"):
        assert "napari-mupd" in {r.plugin_name for r in pm.iter_compatible_readers([name])}, name
    writers = {(w.command, ext) for w in manifest.contributions.writers for ext in w.filename_extensions}
    assert ("napari-mupd.write_ome_zarr", ".zarr") in writers
    assert ("napari-mupd.write_ome_tiff", ".ome.tif") in writers
    assert ("napari-mupd.write_geojson", ".geojson") in writers
    assert [s.key for s in manifest.contributions.sample_data] == ["cmu1_small"]
    from napari.plugins import _npe2  # what napari's File > Open and sample menus consult

    assert _npe2.get_readers("slide.svs").get("napari-mupd") == "MuPD"
    assert "napari-mupd" in dict(_npe2.sample_iterator())


def test_plugin_modules_and_reader_never_import_torch(tmp_path: Path) -> None:
    from skimage import data
    from skimage.io import imsave

    assert "torch" not in _imported_by_all_of("napari_mupd")
    png = tmp_path / "ihc.png"
    imsave(png, data.immunohistochemistry())
    code = (
        "import sys\n"
        "import napari_mupd._reader\n"
        f"layers = napari_mupd._reader.napari_get_reader({str(png)!r})({str(png)!r})\n"
        "assert layers and layers[0][1]['rgb'], layers\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_engine_modules_never_import_napari_or_qt() -> None:
    loaded = _imported_by_all_of("mupd")
    assert "torch" in loaded  # the walk reached the model code
    gui = {name for name in loaded
           if name in {"napari", "qtpy", "magicgui", "superqt"} or name.startswith("PyQt")}
    assert not gui, f"importing mupd loads {sorted(gui)}"


def _engine_imports(path: Path, package: str) -> list[str]:
    """`path:line` of each import of `mupd.engine` in a module of `package`, at any depth (a
    function-level import counts), written absolute or relative."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[:len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names = [module, *(f"{module}.{a.name}" for a in node.names)]
        else:
            continue
        if any(n == "mupd.engine" or n.startswith("mupd.engine.") for n in names):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_train_modules_never_import_the_engine() -> None:
    train = REPO / "src" / "mupd" / "train"
    direct = [hit for path in sorted(train.rglob("*.py"))
              for hit in _engine_imports(path, ".".join(["mupd", *path.parent.relative_to(train.parent).parts]))]
    assert not direct, f"mupd.train imports mupd.engine at {direct}"
    loaded = _modules_loaded_by_all_of("mupd.train")
    assert "mupd.train.finetune" in loaded  # the walk reached the fine-tuning code
    engine = sorted(name for name in loaded if name == "mupd.engine" or name.startswith("mupd.engine."))
    assert not engine, f"importing mupd.train loads {engine}"


def test_reader_declines_what_is_not_a_slide(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from napari_mupd._reader import napari_get_reader

    fake = tmp_path / "notes.svs"
    fake.write_text("not a slide")
    folder = tmp_path / "empty.zarr"
    folder.mkdir()
    with caplog.at_level(logging.INFO, logger="napari_mupd._reader"):
        assert napari_get_reader(str(fake)) is None
        assert napari_get_reader(str(folder)) is None
        assert napari_get_reader([str(fake), str(folder)]) is None
    text = caplog.text
    assert "notes.svs" in text and "empty.zarr" in text


def test_opening_reads_no_full_resolution_pixels(tmp_path: Path) -> None:
    """The reader runs no dask task; napari's layer set-up touches only the coarsest level (thumbnail)."""
    from dask.callbacks import Callback
    from napari.layers import Layer
    from skimage import data

    from mupd.io import write_ome_tiff
    from napari_mupd._reader import napari_get_reader

    # a real IHC image as a 3-level OME-TIFF pyramid, once RGB and once as 3 named channels
    ihc = np.tile(data.immunohistochemistry(), (3, 3, 1))
    rgb_path = write_ome_tiff(tmp_path / "ihc.ome.tif", ihc, mpp=0.5, n_levels=3)
    planes_path = write_ome_tiff(tmp_path / "planes.ome.tif", ihc, mpp=0.5, n_levels=3,
                                 channel_names=["DAPI", "CD8", "PanCK"])
    ran: list[str] = []

    class Count(Callback):
        def _pretask(self, key, dask, state):
            ran.append(key[0] if isinstance(key, tuple) else key)

    for path in (rgb_path, planes_path):
        with Count():
            tuples = napari_get_reader(str(path))(str(path))
        assert ran == [], "the reader itself must not compute anything"
        with Count():
            layers = [Layer.create(*t) for t in tuples]
        assert all(layer.multiscale and len(layer.data) == 3 for layer in layers)
        fine = {t[0][level].name for t in tuples for level in (0, 1)}
        assert not fine & set(ran), "creating the layers read full-resolution tiles"
        ran.clear()
    assert [layer.name for layer in layers] == ["DAPI", "CD8", "PanCK"]
