"""`mupd stain` over a cohort: a killed run resumed, 2 processes (torchrun) = 1, bad inputs.

The slides are crops of the real CMU slide written as small pyramidal OME-TIFFs (4 tiles each);
the end-to-end test runs the CLI in subprocesses with the bundled model (or the untrained tiny
one), the rest runs in process with a model-free stand-in (TileContextPipeline)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from mupd.cli import main
from mupd.cohort import (FAILED, SETTINGS, SUMMARY, TABLE, CohortSettings, claim_output,
                         find_slides, stain_cohort)
from mupd.errors import OutputExistsError, SlideError
from mupd.io import open_slide, write_ome_tiff
from mupd.io.atomic import owner_tag
from support_server import free_port
from support_slides import TileContextPipeline, cmu_slide_path, model_folder

pytestmark = pytest.mark.timeout(900)  # 4 model-loading processes: ~2 min on 2 idle cores

#: Level-0 boxes of the CMU slide (0.499 um/px), all on tissue: 4 tiles each at 1 um/px.
CROPS = {"cmu-a": (900, 900, 400, 300), "cmu-b": (1200, 1500, 300, 360),
         "cmu-c": (600, 2000, 360, 300)}
STAINS = ["HER2", "Ki67"]


def _write_crops(folder: Path, names=CROPS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open_slide(cmu_slide_path(SHARED_DATA)) as cmu:
        for name in names:
            x, y, w, h = CROPS[name]
            write_ome_tiff(folder / f"{name}.ome.tif",
                           np.asarray(cmu.levels[0][y : y + h, x : x + w])[..., :3], mpp=cmu.mpp[0])
    return folder


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """3 slides, a note (skipped: not a slide) and a .tif that is no TIFF (fails, the rest go on)."""
    folder = _write_crops(tmp_path_factory.mktemp("cohort") / "slides")
    (folder / "notes.txt").write_text("scanned 2024-05-01")
    (folder / "not-a-slide.tif").write_bytes(b"not a tiff at all")
    return folder


def _env() -> dict[str, str]:
    src = Path(__file__).resolve().parents[1] / "src"
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}


def _launch(args: list[str], **popen) -> subprocess.Popen:
    """`python ARGS` in a session of its own, so `_stop` ends torchrun's workers with it."""
    return subprocess.Popen([sys.executable, *args], env=_env(), start_new_session=True, **popen)


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = _launch(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:  # also when the test times out: no process outlives it
        _stop(proc)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _stain_args(folder: Path, out: Path, model: str) -> list[str]:
    return ["-m", "mupd.cli", "stain", str(folder), "--stains", *STAINS, "--out", str(out),
            "--model", model, "--device", "cpu"]


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / TABLE, newline="") as f:
        return {r["output"]: r for r in csv.DictReader(f)}


def _layers(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(open_slide(p).levels[0]) for p in sorted(folder.glob("*.ome.zarr"))}


@pytest.mark.slow
def test_killed_run_resumes_and_two_processes_equal_one(cohort, tmp_path):
    model = str(model_folder(tmp_path / "model"))
    one, two = tmp_path / "one", tmp_path / "two"

    # 1 process, killed (SIGKILL: no clean-up of its own) once the first slide is finished
    with open(tmp_path / "killed.log", "w") as log:
        proc = _launch(_stain_args(cohort, one, model), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not (one / "cmu-a" / SUMMARY).exists():
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "killed.log").read_text()
                time.sleep(0.02)
        finally:
            _stop(proc)
    assert not (one / "cmu-c" / SUMMARY).exists()  # killed before the last slide
    finished = {p: p.stat().st_mtime_ns for p in [one / "cmu-a", *(one / "cmu-a").rglob("*")]}
    # and a half-written output of cmu-c, as the dead run would have left it mid-write
    host = owner_tag().rsplit("-", 1)[0]
    partial = one / f".cmu-c.{host}-{proc.pid}.0badc0de.partial"
    (partial / "Ki67.ome.zarr").mkdir(parents=True)
    (partial / "Ki67.ome.zarr" / "zarr.json").write_text("{")

    resumed = _run(_stain_args(cohort, one, model))
    assert resumed.returncode == 1, resumed.stderr[-3000:]  # not-a-slide.tif failed
    out = resumed.stdout
    assert "cmu-a: skipped, finished earlier" in out and "cmu-a: staining" not in out
    assert "cmu-c: done" in out and "skipping" in out and "notes.txt" in out
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not redone, not touched
    assert not partial.exists() and not list(one.glob(".cmu-*"))
    rows = _rows(one)
    assert sorted(rows) == ["cmu-a", "cmu-b", "cmu-c", "not-a-slide"]
    assert [rows[n]["status"] for n in sorted(rows)] == ["done", "done", "done", "failed"]
    assert "not-a-slide.tif" in rows["not-a-slide"]["reason"]
    assert "TIFF" in rows["not-a-slide"]["reason"]
    for name in CROPS:
        row = rows[name]
        assert int(row["tiles"]) == int(row["tissue_tiles"]) == 4
        assert row["region"] == " ".join(map(str, (0, 0) + CROPS[name][2:]))
        assert float(row["mpp"]) == pytest.approx(0.499)
        marker = _layers(one / name)["Ki67.ome.zarr"]
        assert float(row["mean_Ki67"]) == pytest.approx(float(marker.mean()), abs=1e-5)
        assert 0 < float(row["mean_HER2"]) <= 1

    # 2 processes under torchrun: each takes every 2nd slide of the sorted list
    port = str(free_port())
    proc2 = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                  "127.0.0.1", "--master_port", port, *_stain_args(cohort, two, model)])
    assert proc2.returncode == 1, proc2.stderr[-3000:]
    for rank, names in ((0, ["cmu-a", "cmu-c"]), (1, ["cmu-b", "not-a-slide"])):
        for name in names:
            assert f"[rank {rank}/2] {name}: staining" in proc2.stdout, proc2.stderr[-3000:]
    assert proc2.stdout.count("skipping") == 1  # the folder's note, said by rank 0 only
    rows2 = _rows(two)
    for name, row in rows.items():
        same = {k: v for k, v in row.items() if k not in ("seconds", "slide")}
        assert {k: v for k, v in rows2[name].items() if k not in ("seconds", "slide")} == same
    for name in CROPS:
        a, b = _layers(one / name), _layers(two / name)
        assert sorted(a) == sorted(b) == ["HER2.ome.zarr", "IHC-HER2.ome.zarr", "IHC-Ki67.ome.zarr",
                                          "Ki67.ome.zarr"]
        for layer in a:
            # float32 sums from processes with other thread layouts: equal to rounding (1e-6
            # measured), the CSV rows (6 digits) exactly
            np.testing.assert_allclose(a[layer], b[layer], atol=1e-5, err_msg=f"{name} {layer}")
        assert a["Ki67.ome.zarr"].std() > 0

    # a cohort's slide folder is the single-slide output, plus its summary row
    single = tmp_path / "single"
    assert main(["stain", str(cohort / "cmu-b.ome.tif"), "--stains", *STAINS, "--out", str(single),
                 "--model", model, "--device", "cpu"]) == 0
    assert sorted(p.name for p in (one / "cmu-b").iterdir()) == sorted(
        [p.name for p in single.iterdir()] + [SUMMARY])
    for layer, data in _layers(single).items():
        np.testing.assert_allclose(data, _layers(one / "cmu-b")[layer], atol=1e-5, err_msg=layer)


def _refused(args: list[str], capsys) -> tuple[int, str]:
    code = main(["stain", *args, "--stains", "Ki67", "--model", "/nonexistent/model"])
    return code, capsys.readouterr().err


def test_bad_inputs_are_refused_before_the_model_loads(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("slides come later")
    code, err = _refused([str(empty), "--out", str(tmp_path / "o1")], capsys)
    assert code == 2 and "holds no slide" in err and str(empty) in err

    a, b = _write_crops(tmp_path / "a", ["cmu-a"]), tmp_path / "b"
    b.mkdir()
    shutil.copy(a / "cmu-a.ome.tif", b / "cmu-a.tif")
    code, err = _refused([str(a), str(b), "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and "'cmu-a'" in err and str(a / "cmu-a.ome.tif") in err and str(b / "cmu-a.tif") in err

    listing = tmp_path / "cohort.txt"
    listing.write_text(f"# batch 1\n{a / 'cmu-a.ome.tif'}\n\nnotes.md\n")
    (tmp_path / "notes.md").write_text("x")
    code, err = _refused([str(listing), "--out", str(tmp_path / "o3")], capsys)
    assert code == 2 and "line 4 of" in err and "is not a slide" in err

    code, err = _refused([str(a), "--box", "0", "0", "10", "10", "--out", str(tmp_path / "o4")], capsys)
    assert code == 2 and "--box" in err and "stained whole" in err

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.xlsx").write_text("user data")
    code, err = _refused([str(a), "--out", str(mine)], capsys)
    assert code == 2 and "no mupd stain cohort" in err
    assert [p.name for p in mine.iterdir()] == ["results.xlsx"]
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_lists_folders_and_repeats(tmp_path):
    folder = _write_crops(tmp_path / "slides", ["cmu-a", "cmu-b"])
    (folder / "extra").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("# relative to the list\nslides/cmu-b.ome.tif\nslides\n")
    logged: list[str] = []
    slides = find_slides([str(listing)], logged.append)
    assert [(s.name, s.path) for s in slides] == [("cmu-a", folder / "cmu-a.ome.tif"),
                                                  ("cmu-b", folder / "cmu-b.ome.tif")]
    assert any("extra" in m and "not an OME-Zarr" in m for m in logged)
    assert any("named twice" in m for m in logged)
    with pytest.raises(SlideError, match="does not exist"):
        find_slides([str(tmp_path / "missing.txt")])


def _settings(pipeline, **change) -> CohortSettings:
    return CohortSettings.of(pipeline, "model", ["ki-67", "H&E"], **change)


def test_stain_cohort_shares_skips_and_records(tmp_path):
    """The model-free stand-in: rank 1 of 2 takes slides 2 and 4; a folder in the way is
    recorded as failed and left alone; a slide without mpp takes the fallback (only it)."""
    pipeline = TileContextPipeline()
    folder = _write_crops(tmp_path / "slides")
    with open_slide(folder / "cmu-a.ome.tif") as s:
        Image.fromarray(np.asarray(s.levels[0])).save(folder / "plain.png")  # no mpp in a PNG
    slides = find_slides([str(folder)])
    assert [s.name for s in slides] == ["cmu-a", "cmu-b", "cmu-c", "plain"]
    out = tmp_path / "out"
    settings = _settings(pipeline)
    assert settings.stains == ["Ki67", "H&E"] and settings.markers == ["Ki67"]
    claim_output(out, settings, write=True)
    (out / "plain").mkdir()
    (out / "plain" / "mine.txt").write_text("keep")

    counts = stain_cohort(pipeline, slides, out, settings, rank=1, world=2, log=lambda m: None)
    assert counts == {"done": 1, "failed": 1}
    assert (out / "cmu-b" / SUMMARY).is_file() and not (out / "cmu-a").exists()
    assert [p.name for p in (out / "plain").iterdir()] == ["mine.txt"]
    rows = _rows(out)
    assert rows["plain"]["status"] == "failed" and "no finished slide" in rows["plain"]["reason"]
    assert rows["cmu-a"]["status"] == rows["cmu-c"]["status"] == "pending"
    assert list(rows["cmu-b"]) == ["slide", "output", "status", "tiles", "tissue_tiles", "seconds",
                                   "region", "mpp", "mean_Ki67", "reason"]

    shutil.rmtree(out / "plain")
    counts = stain_cohort(pipeline, slides, out, settings, rank=1, world=2, log=lambda m: None)
    assert counts == {"skipped": 1, "failed": 1}  # a PNG states no mpp and none was given
    assert "--mpp" in _rows(out)["plain"]["reason"]
    counts = stain_cohort(pipeline, slides, out, settings, rank=1, world=2, fallback_mpp=0.499,
                          log=lambda m: None)
    assert counts == {"skipped": 1, "done": 1}
    rows = _rows(out)
    assert rows["plain"]["status"] == "done" and float(rows["plain"]["mpp"]) == 0.499
    assert not (out / FAILED / "plain.json").exists()  # its failure is forgotten once it is done


def test_resume_with_other_settings_is_refused(tmp_path):
    pipeline = TileContextPipeline()
    out = tmp_path / "out"
    claim_output(out, _settings(pipeline), write=True)
    claim_output(out, _settings(pipeline), write=False)  # the same: fine
    recorded = (out / SETTINGS).read_text()
    with pytest.raises(OutputExistsError, match="seed: 0 there, 3 now"):
        claim_output(out, _settings(pipeline, seed=3), write=True)
    assert (out / SETTINGS).read_text() == recorded
    assert json.loads(recorded)["stains"] == ["Ki67", "H&E"]
    # a lab's IHC look is a setting too: recorded, and another look refuses the resume
    from mupd.render import IhcLook

    look = IhcLook(0.08, 0.06, 0.07)
    other = tmp_path / "out-look"
    claim_output(other, _settings(pipeline, ihc_look=look), write=True)
    assert json.loads((other / SETTINGS).read_text())["ihc_look"] == look.to_dict()
    with pytest.raises(OutputExistsError, match="ihc_look"):
        claim_output(other, _settings(pipeline, ihc_look=IhcLook(0.04, 0.02, 0.2)), write=True)
