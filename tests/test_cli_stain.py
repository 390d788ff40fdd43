"""`mupd stain` end to end on real slides: box, GeoJSON, whole slide, OME-TIFF, and refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr

from mupd.cli import main
from mupd.io import open_slide, rectangle, write_geojson
from support_slides import cmu_slide_path, model_folder

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(model_folder(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def cmu(shared_data):
    return str(cmu_slide_path(shared_data))


def test_box_writes_marker_ihc_and_ome_tiff(cmu, model, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["stain", cmu, "--stains", "ki-67", "--box", "517", "333", "300", "260",
                 "--out", str(out), "--model", model, "--device", "cpu", "--ome-tiff"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "IHC-Ki67.ome.tif", "IHC-Ki67.ome.zarr", "Ki67.ome.tif", "Ki67.ome.zarr", "scores-Ki67.geojson",
        "scores.csv"]
    printed = capsys.readouterr().out
    assert "Ki67" in printed and "predicted Ki67:" in printed and "H-score" in printed
    marker = open_slide(out / "Ki67.ome.tif")
    assert marker.channel_names == ["Ki67"] and marker.mpp == pytest.approx((1.0, 1.0))
    assert marker.dimensions == (150, 130)  # 300 x 260 px at 0.499 -> 1.0 um/px
    assert np.array_equal(np.asarray(marker.levels[0]),
                          np.asarray(open_slide(out / "Ki67.ome.zarr").levels[0]))
    ihc = open_slide(out / "IHC-Ki67.ome.zarr")
    assert ihc.is_rgb and "rendered as DAB" in ihc.metadata["rendered_from"]
    assert ihc.metadata["source_box_level0_xywh"] == [517, 333, 300, 260]


def test_geojson_regions_each_get_a_folder(cmu, model, tmp_path):
    regions = tmp_path / "rois.geojson"
    write_geojson(regions, [rectangle(600, 700, 200, 150, name="a"), rectangle(1200, 1500, 180, 200)])
    out = tmp_path / "out"
    assert main(["stain", cmu, "--stains", "HER2", "--geojson", str(regions), "--out", str(out),
                 "--model", model, "--device", "cpu", "--no-render"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["region-000", "region-001"]
    boxes = [dict(zarr.open_group(str(out / r / "HER2.ome.zarr"), mode="r").attrs)["mupd"]
             ["source_box_level0_xywh"] for r in ("region-000", "region-001")]
    assert boxes == [[600, 700, 200, 150], [1200, 1500, 180, 200]]


def test_qupath_annotations_are_translated_and_scored_together(cmu, model, tmp_path, capsys):
    """QuPath's own layout in: a polygon with a hole, a two-part MultiPolygon, an ellipse, an
    unclassified polygon (and a cell detection, skipped); scores of all of them out, under their
    names and classes, beside the per-region folders."""
    from pathlib import Path

    from mupd.io import read_geojson

    qupath = Path(__file__).parent / "data" / "qupath_annotations.geojson"
    out = tmp_path / "out"
    assert main(["stain", cmu, "--stains", "Ki67", "--geojson", str(qupath), "--out", str(out),
                 "--model", model, "--device", "cpu"]) == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"region-{i:03d}" for i in range(5)] + ["scores-Ki67.geojson", "scores.csv"]
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("region,marker,cells,predicted mean level,predicted positive %")
    assert [r.split(",")[0] for r in rows[1:]] == ["Tumour core", "Stroma", "Stroma", "Tumour margin",
                                                   "region-004"]
    back = read_geojson(out / "scores-Ki67.geojson")
    assert [(r.name, r.classification) for r in back] == [
        ("Tumour core", "Tumor"), ("Stroma", "Stroma"), ("Stroma", "Stroma"),
        ("Tumour margin", "Tumor"), ("region-004", None)]
    assert len(back[0].holes) == 1 and back[3].shape == "ellipse"
    assert all("Predicted Ki67: H-score" in r.measurements for r in back if
               r.measurements["Predicted Ki67: Num Detections"] > 0)
    cells = read_geojson(out / "scores-Ki67.geojson", object_types=("detection",))
    assert len(cells) == sum(r.measurements["Predicted Ki67: Num Detections"] for r in back)
    # the hole's tiles and cells are out: no cell centre of the core lies in it
    hole = back[0].holes[0]
    core = read_geojson(out / "region-000" / "scores-Ki67.geojson", object_types=("detection",))
    xs = [np.mean([p[0] for p in c.polygon]) for c in core]
    ys = [np.mean([p[1] for p in c.polygon]) for c in core]
    assert core and not any(hole[0][0] + 5 < x < hole[1][0] - 5 and hole[0][1] + 5 < y < hole[2][1] - 5
                            for x, y in zip(xs, ys))


def test_whole_small_slide_with_given_mpp(shared_data, model, tmp_path):
    image = shared_data / "he_patches/misc_he/tiatoolbox_TCGA-HE-7130-01Z-00-DX1.png"  # 1000 x 1000
    out = tmp_path / "out"
    assert main(["stain", str(image), "--stains", "H&E", "CD45", "--mpp", "0.5", "--out", str(out),
                 "--model", model, "--device", "cpu"]) == 0
    he = open_slide(out / "HandE.ome.zarr")
    assert he.dimensions == (500, 500) and he.mpp == pytest.approx((1.0, 1.0))
    assert {p.name for p in out.iterdir()} == {"HandE.ome.zarr", "CD45.ome.zarr", "IHC-CD45.ome.zarr",
                                                "scores-CD45.geojson", "scores.csv"}


def test_ihc_look_of_a_labs_image_reaches_the_rendering(cmu, model, tmp_path, capsys):
    """`--ihc-look` measures the lab's IHC once; the IHC layer records it and differs from the
    default rendering; glass as a "lab IHC" is refused before any output is written."""
    from PIL import Image
    from skimage.data import immunohistochemistry

    from mupd.render import measure_ihc_look

    lab = tmp_path / "lab-ihc.png"
    Image.fromarray(immunohistochemistry()).save(lab)
    box = ["--box", "800", "1200", "400", "400", "--model", model, "--device", "cpu"]
    images = {}
    for name, extra in (("plain", []), ("look", ["--ihc-look", str(lab), "--ihc-look-mpp", "0.5"])):
        assert main(["stain", cmu, "--stains", "Ki67", "--out", str(tmp_path / name), *box, *extra]) == 0, \
            capsys.readouterr().err
        ihc = open_slide(tmp_path / name / "IHC-Ki67.ome.zarr")
        images[name] = (np.asarray(ihc.levels[0]).astype(int), ihc.metadata["rendering"]["ihc_look"])
    assert images["plain"][1] == "default"
    assert images["look"][1] == pytest.approx(measure_ihc_look(immunohistochemistry(), 0.5).to_dict())
    assert np.abs(images["look"][0] - images["plain"][0]).mean() > 1
    glass = tmp_path / "glass.png"
    Image.fromarray(np.full((300, 300, 3), 240, np.uint8)).save(glass)
    code = main(["stain", cmu, "--stains", "Ki67", "--out", str(tmp_path / "glass-out"), *box,
                 "--ihc-look", str(glass), "--ihc-look-mpp", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "glass.png" in err and "nuclei" in err
    assert not (tmp_path / "glass-out").exists()


def test_existing_output_is_refused_untouched(cmu, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["stain", cmu, "--stains", "Ki67", "--out", str(out), "--model", str(tmp_path / "nomodel")])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err
    assert "--overwrite" not in err and "choose another --out" in err  # stain has no --overwrite
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_unknown_stain_exits_2_naming_it(cmu, model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mupd.cli", "stain", cmu, "--stains", "PD-L1",
                           "--box", "0", "0", "256", "256", "--out", str(tmp_path / "out"),
                           "--model", model, "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "PD-L1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_slide_without_mpp_asks_for_it(shared_data, model, tmp_path, capsys):
    slide = shared_data / "wsi/TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.warns(UserWarning):
        code = main(["stain", str(slide), "--stains", "Ki67", "--box", "0", "0", "256", "256",
                     "--out", str(tmp_path / "out"), "--model", model, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "--mpp" in err and "TCGA-CR-7395" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps", ["0", "-5", "100000000"])
def test_steps_out_of_range_are_refused_while_parsing(tmp_path, capsys, steps):
    from mupd.requests import MAX_STEPS

    with pytest.raises(SystemExit) as exit:  # argparse: before any file or model is touched
        main(["stain", str(tmp_path / "slide.svs"), "--stains", "Ki67", "--out", str(tmp_path / "out"),
              "--model", str(tmp_path / "no-model"), "--steps", steps])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"mupd stain: error: argument --steps: steps={steps}: must be a whole number "
                       f"1..{MAX_STEPS}")  # the words the server answers with
    assert not (tmp_path / "out").exists()
