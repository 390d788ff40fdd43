"""`mupd data her2st|spots|slide|pairs|register` through `mupd.cli.main` on small real inputs."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from mupd.cli import main
from mupd.data.store import PatchStore
from test_data_pairs import _write_pairs


def test_her2st_command_refits_nothing_on_held_out_patients(shared_data, tmp_path, capsys):
    out = tmp_path / "c2"
    assert main(["data", "her2st", "--root", str(shared_data), "--sections", "C2",
                 "--max-spots", "8", "--out", str(out)]) == 0
    reference = tmp_path / "c2.reference.json"
    assert json.loads(reference.read_text())["fitted_on"] == ["C2"]
    assert main(["data", "her2st", "--root", str(shared_data), "--sections", "B4",
                 "--max-spots", "4", "--out", str(tmp_path / "b4")]) == 2
    assert "need --reference" in capsys.readouterr().err
    assert main(["data", "her2st", "--root", str(shared_data), "--sections", "B4", "--max-spots",
                 "4", "--reference", str(reference), "--out", str(tmp_path / "b4")]) == 0
    held = PatchStore(tmp_path / "b4")
    assert set(held.manifest.patient) == {"B"} and held.attrs["reference"]["fitted_on"] == ["C2"]
    assert not (tmp_path / "b4.reference.json").exists()


def test_spots_command_h5ad_with_captions_and_visium(shared_data, tmp_path, capsys):
    folder = shared_data / "st" / "visium" / "squidpy_mouse_brain"
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"key": "AAATTGCGGCGGTTCT-1", "text": "mouse brain, cortex"}\n')
    assert main(["data", "spots", str(folder / "test_data.h5ad"), "--image",
                 str(folder / "test_img.jpg"), "--patient", "M1", "--captions", str(captions),
                 "--tile", "64", "--mpp", "2", "--out", str(tmp_path / "brain")]) == 0
    store = PatchStore(tmp_path / "brain")
    row = store.manifest.index[store.manifest.spot == "AAATTGCGGCGGTTCT-1"][0]
    assert store.captions[row] == "mouse brain, cortex" and sum(map(bool, store.captions)) == 1
    assert store.attrs["captions"] == "given (captions file)"
    heart = shared_data / "st" / "visium" / "scanpy_human_heart"
    # Its only image is the 13.7 um/px lowres PNG: 1 um/px tiles would be blurred upsamples.
    assert main(["data", "spots", str(heart), "--max-spots", "10", "--out", str(tmp_path / "h")]) == 2
    assert "coarser --mpp" in capsys.readouterr().err
    assert main(["data", "spots", str(heart), "--max-spots", "10", "--mpp", "8", "--tile", "32",
                 "--out", str(tmp_path / "h")]) == 0
    heart_store = PatchStore(tmp_path / "h")
    assert len(heart_store) == 10 and heart_store.manifest.source.eq("visium-spot").all()
    assert heart_store.markers == {}  # this 100-gene test panel has no marker gene


def test_slide_command_tiles_captions_and_appends(shared_data, tmp_path):
    slide = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    captions = tmp_path / "captions.csv"
    captions.write_text("file,caption\nCMU-1-Small-Region.svs,\"H&E, skin\"\n")
    out = tmp_path / "s"
    common = ["--patient", "P1", "--mpp", "2", "--tile", "128", "--max-tiles", "3", "--out", str(out)]
    assert main(["data", "slide", str(slide), "--captions", str(captions), *common]) == 0
    assert main(["data", "slide", str(slide), "--append", *common]) == 0
    store = PatchStore(out)
    assert len(store) == 6 and len(store.info["shards"]) == 2
    assert store.captions == ["H&E, skin"] * 3 + [""] * 3
    assert np.allclose(store.manifest.slide_mpp, 0.499, atol=1e-3) and (store.manifest.mpp == 2).all()
    assert main(["data", "slide", str(slide), *common]) == 2  # exists, no --overwrite


def test_pairs_command_reports_a_bci_root(shared_data, tmp_path, capsys):
    _write_pairs(shared_data, tmp_path / "HE" / "test", tmp_path / "IHC" / "test", size=128)
    assert main(["data", "pairs", str(tmp_path), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 pairs") and "lonely" in out and "size mismatch sized" in out
    assert main(["data", "pairs", str(tmp_path), "--split", "test", "--out", str(tmp_path / "s"),
                 "--tile", "64"]) == 2  # the pixel size of the images is needed for a store
    assert main(["data", "pairs", str(tmp_path), "--split", "test", "--out", str(tmp_path / "s"),
                 "--tile", "64", "--image-mpp", "0.5", "--mpp", "0.5", "--stain", "FHL2"]) == 0
    store = PatchStore(tmp_path / "s")
    he = np.asarray(Image.open(tmp_path / "HE" / "test" / "001.png"))
    ihc = np.asarray(Image.open(tmp_path / "IHC" / "test" / "001.png"))
    row = store.manifest.index[(store.manifest.slide == "001.png") & (store.manifest.x == 64)
                               & (store.manifest.y == 0)]
    assert len(row) == 1 and set(store.manifest.patient) <= {"000", "001", "002"}
    np.testing.assert_array_equal(store.tiles[int(row[0])], he[:64, 64:128])
    np.testing.assert_array_equal(store.targets["FHL2"][int(row[0])], ihc[:64, 64:128])


def test_register_command_warps_ihc_onto_he(shared_data, tmp_path, capsys):
    folder = shared_data / "he_ihc_serial" / "birl_rat_kidney"
    warped = tmp_path / "warped.png"
    assert main(["data", "register", str(folder / "Rat-Kidney_HE.csv"),
                 str(folder / "Rat-Kidney_PanCytokeratin.pts"), "--images",
                 str(folder / "Rat-Kidney_HE.jpg"), str(folder / "Rat-Kidney_PanCytokeratin.jpg"),
                 "--warp", str(warped), "--out", str(tmp_path / "pairs"), "--stain", "PanCK",
                 "--image-mpp", "10", "--mpp", "10", "--tile", "64", "--patient", "rat1"]) == 0
    numbers = json.loads(capsys.readouterr().out.splitlines()[0])
    assert numbers["landmarks"] == 69 and numbers["residual_after_px"] < numbers["residual_before_px"]
    store = PatchStore(tmp_path / "pairs")  # H&E tiles with the registered PanCK tiles
    assert list(store.targets) == ["PanCK"] and len(store) > 20
    assert (store.manifest.source == "serial-registered").all() and store.attrs["registration"]
    ihc = store.targets["PanCK"][:]
    assert ihc.shape == (len(store), 64, 64, 3) and (ihc < 250).mean() > 0.3  # tissue, not fill

    def tissue(path, shape=None):
        """The section's silhouette (smoothed grey below the white glass)."""
        grey = np.asarray(Image.open(path).convert("L"), dtype=float)
        if shape is not None:  # unregistered: the moving image cropped/padded to the fixed frame
            out = np.full(shape, 255.0)
            h, w = min(shape[0], grey.shape[0]), min(shape[1], grey.shape[1])
            out[:h, :w] = grey[:h, :w]
            grey = out
        return ndi.gaussian_filter(grey, 4) < 230

    fixed = tissue(folder / "Rat-Kidney_HE.jpg")
    before = tissue(folder / "Rat-Kidney_PanCytokeratin.jpg", fixed.shape)
    after = tissue(warped)
    assert after.shape == fixed.shape

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    print(f"tissue overlap with H&E: unregistered {iou(fixed, before):.3f}, "
          f"registered {iou(fixed, after):.3f}")
    assert iou(fixed, after) > iou(fixed, before) + 0.05
