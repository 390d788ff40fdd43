"""OME-Zarr / OME-TIFF round trips through open_slide, overwrite refusal and atomic writes."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import tifffile

from mupd.errors import OutputExistsError
from mupd.io import open_slide, write_ome_tiff, write_ome_zarr
from mupd.io import ometiff, omezarr
from support_io import sample_svs  # noqa: F401  (fixture)

WRITERS = {"zarr": (write_ome_zarr, "x.ome.zarr", omezarr, "_write_pyramid"),
           "tiff": (write_ome_tiff, "x.ome.tif", ometiff, "_write_tiff")}


@pytest.fixture(scope="module")
def rgb_crop(sample_svs):
    """A real H&E crop (odd sizes, so pyramid edges are exercised)."""
    with open_slide(sample_svs) as s:
        return s.read_region((300, 400), (1201, 1333))


@pytest.fixture(scope="module")
def fluorescence(shared_data):
    with open_slide(shared_data / "mif/small_vectra.qptiff") as s:
        return s.levels[0], s.channel_names, s.channel_colors, s.mpp


@pytest.mark.parametrize("kind", WRITERS)
def test_rgb_round_trip(tmp_path, rgb_crop, kind):
    write, name, _, _ = WRITERS[kind]
    out = write(tmp_path / name, rgb_crop, mpp=0.499, metadata={"source": "CMU", "box": [300, 400]})
    with open_slide(out) as s:
        assert s.format == ("ome-zarr" if kind == "zarr" else "ome-tiff")
        assert s.is_rgb and s.channel_names == ["R", "G", "B"]
        assert s.mpp == pytest.approx((0.499, 0.499), rel=1e-12)
        np.testing.assert_array_equal(s.levels[0].compute(), rgb_crop)
        assert len(s.levels) >= 2 and s.level_dimensions[1] == (1201 // 2, 1333 // 2)
        assert s.levels[0].npartitions > 1
        assert s.metadata == {"source": "CMU", "box": [300, 400]}
        half = rgb_crop[:1332, :1200].reshape(666, 2, 600, 2, 3).mean(axis=(1, 3))
        assert np.abs(s.levels[1].compute().astype(float) - half).max() <= 0.5 + 1e-9


@pytest.mark.parametrize("kind", WRITERS)
def test_multichannel_round_trip(tmp_path, fluorescence, kind):
    image, names, colors, mpp = fluorescence
    write, name, _, _ = WRITERS[kind]
    out = write(tmp_path / name, image, mpp=mpp, channel_names=names, colors=colors, n_levels=2)
    with open_slide(out) as s:
        assert not s.is_rgb and s.channel_names == ["DAPI", "FITC", "Cy3"]
        assert s.channel_colors == colors and s.mpp == (0.5, 0.5) and len(s.levels) == 2
        np.testing.assert_array_equal(s.levels[0].compute(), image.compute())
        np.testing.assert_array_equal(s.read_region((7, 9), (300, 200)), image[9:209, 7:307].compute())


def test_ome_tiff_layout_is_subifd_pyramid(tmp_path, rgb_crop):
    out = write_ome_tiff(tmp_path / "p.ome.tif", rgb_crop, mpp=(0.5, 0.5), n_levels=3)
    with tifffile.TiffFile(out) as tf:
        assert tf.is_ome and len(tf.pages) == 1  # sub-resolutions live in SubIFDs, not top-level pages
        page = tf.pages[0]
        assert page.is_tiled and page.photometric == tifffile.PHOTOMETRIC.RGB
        assert len(tf.series[0].levels) == 3
        assert 'PhysicalSizeX="0.5"' in tf.ome_metadata


def test_ome_zarr_ngff_metadata(tmp_path, rgb_crop):
    import zarr

    out = write_ome_zarr(tmp_path / "m.ome.zarr", rgb_crop, mpp=0.25, n_levels=2)
    ome = zarr.open_group(str(out), mode="r").attrs["ome"]
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["axes"][1]["unit"] == "micrometer"
    assert [d["coordinateTransformations"][0]["scale"][1:] for d in ms["datasets"]] == [[0.25, 0.25], [0.5, 0.5]]
    assert [c["color"] for c in ome["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF"]


@pytest.mark.parametrize("kind", WRITERS)
def test_overwrite_refused_then_allowed(tmp_path, rgb_crop, kind):
    write, name, _, _ = WRITERS[kind]
    target = write(tmp_path / name, rgb_crop[:300, :300], mpp=0.5)
    with pytest.raises(OutputExistsError, match=name):
        write(target, rgb_crop[:200, :200], mpp=0.5)
    with open_slide(target) as s:
        assert s.dimensions == (300, 300)  # untouched
    write(target, rgb_crop[:200, :250], mpp=0.5, overwrite=True)
    with open_slide(target) as s:
        assert s.dimensions == (250, 200)
    assert sorted(os.listdir(tmp_path)) == [name]


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_nothing(tmp_path, rgb_crop, monkeypatch, kind, existing):
    write, name, module, inner = WRITERS[kind]
    if existing:
        write(tmp_path / name, rgb_crop[:100, :100], mpp=0.5)
    real = getattr(module, inner)

    def crash(target, *args):
        real(target, *args)  # the data is fully written under the temporary name...
        assert target.exists() and target.name != name
        raise RuntimeError("disk full")  # ...and then the process "fails" before the rename

    monkeypatch.setattr(module, inner, crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write(tmp_path / name, rgb_crop, mpp=0.5, overwrite=True)
    assert os.listdir(tmp_path) == ([name] if existing else [])  # no temp left over
    if existing:
        with open_slide(tmp_path / name) as s:  # the previous file survives intact
            assert s.dimensions == (100, 100)


def test_bad_writer_inputs_name_the_problem(tmp_path, rgb_crop):
    from mupd.errors import MuPDError

    with pytest.raises(MuPDError, match="2 channel names"):
        write_ome_zarr(tmp_path / "a.ome.zarr", rgb_crop, mpp=0.5, channel_names=["a", "b"])
    with pytest.raises(MuPDError, match="mpp"):
        write_ome_tiff(tmp_path / "a.ome.tif", rgb_crop, mpp=-1)
    with pytest.raises(MuPDError, match="hex"):
        write_ome_tiff(tmp_path / "a.ome.tif", rgb_crop, mpp=1, colors=["red", "00FF00", "0000FF"])
    assert os.listdir(tmp_path) == []


def test_reads_ngff_v04_written_by_ome_zarr(tmp_path, fluorescence):
    """A zarr-v2 / NGFF 0.4 image as other tools write it (t, c, z, y, x, no omero): still opens."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscale

    image = fluorescence[0].compute()
    tczyx = np.moveaxis(image, -1, 0)[None, :, None]
    group = zarr.open_group(str(tmp_path / "v04.zarr"), mode="w", zarr_format=2)
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
            {"name": "z", "type": "space", "unit": "micrometer"},
            {"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    with warnings.catch_warnings():  # ome-zarr deprecates explicit transforms; other writers still emit them
        warnings.simplefilter("ignore", DeprecationWarning)
        write_multiscale([tczyx, tczyx[..., ::2, ::2]], group, fmt=FormatV04(), axes=axes,
                         coordinate_transformations=[[{"type": "scale", "scale": [1, 1, 1, 0.5, 0.5]}],
                                                     [{"type": "scale", "scale": [1, 1, 1, 1.0, 1.0]}]])
    with open_slide(tmp_path / "v04.zarr") as s:
        assert s.format == "ome-zarr" and s.mpp == (0.5, 0.5) and len(s.levels) == 2
        assert s.channel_names == ["channel 0", "channel 1", "channel 2"]
        np.testing.assert_array_equal(s.read_region((5, 6), (100, 80)), image[6:86, 5:105])
        np.testing.assert_array_equal(s.levels[1].compute(), image[::2, ::2])


# -- hardening: what a SIGKILLed run leaves behind is cleared by the next run into the place ---
KILLED_WRITE = r"""
import os, signal, sys
from pathlib import Path
from mupd.io.atomic import atomic_output

final, stage = Path(sys.argv[1]), sys.argv[2]
replace = os.replace
calls = []

def replace_then_die(src, dst):  # dies between moving the old output aside and renaming the new in
    calls.append(src)
    replace(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)

with atomic_output(final, overwrite=True) as tmp:
    tmp.mkdir()
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    if stage == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace_then_die
"""


def _killed(final, stage):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(final), stage], timeout=60)
    assert proc.returncode == -9


def test_a_killed_runs_partial_output_is_removed_by_the_next_run(tmp_path, rgb_crop):
    target = tmp_path / "x.ome.zarr"
    _killed(target, "writing")
    assert [p.name.endswith(".partial") for p in tmp_path.iterdir()] == [True]  # what a kill leaves
    write_ome_zarr(target, rgb_crop[:64, :64], mpp=0.5)
    assert os.listdir(tmp_path) == ["x.ome.zarr"]


def test_an_output_a_killed_run_moved_aside_is_put_back(tmp_path, rgb_crop):
    target = write_ome_zarr(tmp_path / "x.ome.zarr", rgb_crop[:64, :80], mpp=0.5)
    _killed(target, "renaming")
    assert not target.exists() and sorted(p.suffix for p in tmp_path.iterdir()) == [".old", ".partial"]
    with pytest.raises(OutputExistsError):  # put back first, so it is protected as before
        write_ome_zarr(target, rgb_crop[:32, :32], mpp=0.5)
    assert os.listdir(tmp_path) == ["x.ome.zarr"]
    with open_slide(target) as s:
        assert s.dimensions == (80, 64)


def test_concurrent_writers_of_one_output_never_collide(tmp_path):
    """Writers of one file and of one folder at the same time: every write lands whole (a reader
    never sees part of one), none trips over another's temporary, and nothing is left beside."""
    import threading

    from mupd.io.atomic import atomic_output, atomic_write_text

    file, folder = tmp_path / "settings.json", tmp_path / "model"
    writers, rounds, size = 3, 30, 20_000
    failures: list[BaseException] = []
    seen: list[str] = []
    done = threading.Event()

    def write(w: int) -> None:
        try:
            for i in range(rounds):
                token = f"<{w}-{i}>"
                atomic_write_text(file, token * size, fsync=False)
                with atomic_output(folder, overwrite=True) as tmp:
                    tmp.mkdir()
                    for name in ("a", "b"):
                        (tmp / name).write_text(token)
        except BaseException as exc:  # noqa: BLE001  (reported below, with the others)
            failures.append(exc)

    def read() -> None:
        while not done.is_set():
            try:
                seen.append(file.read_text())
            except FileNotFoundError:  # before the first write lands
                pass

    reader = threading.Thread(target=read)
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert failures == []
    whole = {f"<{w}-{i}>" * size for w in range(writers) for i in range(rounds)}
    assert seen and all(text in whole for text in seen)
    a, b = ((folder / name).read_text() for name in ("a", "b"))
    assert a == b and a * size in whole
    assert sorted(os.listdir(tmp_path)) == ["model", "settings.json"]
