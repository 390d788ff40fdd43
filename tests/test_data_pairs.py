"""Stain pairs: BCI / MIST paired folders built from real images, and landmark registration of
real serial sections (residuals before, after and leave-one-out)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mupd.data.pairs import match_pair_folders, pair_folders, read_landmarks, register_landmarks
from mupd.errors import DataError


def _write_pairs(shared_data, source, target, n=3, size=64, odd=True):
    """Real H&E and IHC crops under the same names; plus one unpaired file and one of each
    side with a different size when `odd`."""
    he = np.asarray(Image.open(shared_data / "he_patches" / "misc_he" /
                               "tiatoolbox_TCGA-HE-7130-01Z-00-DX1.png").convert("RGB"))
    ihc = np.asarray(Image.open(shared_data / "ihc" / "skimage_ihc_FHL2_colon.png").convert("RGB"))
    source.mkdir(parents=True)
    target.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(he[i * size:(i + 1) * size, :size]).save(source / f"{i:03d}.png")
        Image.fromarray(ihc[i * size:(i + 1) * size, :size]).save(target / f"{i:03d}.png")
    if odd:
        Image.fromarray(he[:size, :size]).save(source / "lonely.png")
        Image.fromarray(he[:size, :size]).save(source / "sized.png")
        Image.fromarray(ihc[:size // 2, :size]).save(target / "sized.jpg")


@pytest.mark.parametrize("layout", ["bci", "mist"])
def test_paired_folder_layouts(shared_data, tmp_path, layout):
    root = tmp_path / layout
    if layout == "bci":
        _write_pairs(shared_data, root / "HE" / "train", root / "IHC" / "train")
        source, target = pair_folders(root, split="train")
    else:
        _write_pairs(shared_data, root / "trainA", root / "trainB")
        source, target = pair_folders(root)
    report = match_pair_folders(source, target)
    assert [(a.name, b.name) for a, b in report.pairs] == [(f"{i:03d}.png",) * 2 for i in range(3)]
    assert report.unmatched_source == ["lonely"] and report.unmatched_target == []
    assert report.size_mismatch == [("sized", (64, 64), (64, 32))]
    assert "1 source files without a target" in report.summary()


def test_pair_folder_errors(shared_data, tmp_path):
    with pytest.raises(DataError, match="neither HE/ and IHC/"):
        pair_folders(tmp_path)
    _write_pairs(shared_data, tmp_path / "a", tmp_path / "b", n=0)  # only unusable files
    with pytest.raises(DataError, match="no usable image pairs"):
        match_pair_folders(tmp_path / "a", tmp_path / "b")


CASES = {"kidney": ("birl_rat_kidney", "Rat-Kidney_HE", "Rat-Kidney_PanCytokeratin"),
         "lung": ("birl_lung_lesion", "Izd2-29-041-w35_HE", "Izd2-29-041-w35_proSPC")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_landmark_registration_of_serial_sections(shared_data, case):
    folder, fixed_name, moving_name = CASES[case]
    folder = shared_data / "he_ihc_serial" / folder
    fixed, moving = (read_landmarks(folder / f"{fixed_name}.csv"),
                     read_landmarks(folder / f"{moving_name}.csv"))
    pts = read_landmarks(folder / f"{moving_name}.pts")
    np.testing.assert_array_equal(pts.to_numpy(), moving.to_numpy())  # both formats agree
    affine = register_landmarks(fixed, moving, "affine")
    tps = register_landmarks(fixed, moving, "tps")
    print(f"{case}: {affine.n_landmarks} landmarks, mean error before {affine.residual_before:.1f} px, "
          f"affine {affine.residual_after:.1f} (leave-one-out {affine.residual_loo:.1f}), "
          f"tps {tps.residual_after:.1f} (leave-one-out {tps.residual_loo:.1f})")
    # Serial sections are misplaced by tens of pixels at this 5% scale; an affine fit brings
    # held-out landmarks within a few pixels, and TPS interpolates its own landmarks.
    assert affine.residual_before > 20
    assert affine.residual_loo < 0.3 * affine.residual_before
    assert affine.residual_after <= affine.residual_loo
    assert tps.residual_after < 1e-3 and tps.residual_loo < 0.3 * tps.residual_before
    # The transform maps fixed (H&E) landmarks onto the moving (IHC) section.
    shared = fixed.index.intersection(moving.index)
    mapped = affine.transform(fixed.loc[shared].to_numpy())
    assert np.linalg.norm(mapped - moving.loc[shared].to_numpy(), axis=1).mean() < 10


def test_registration_refuses_too_few_landmarks(shared_data):
    folder = shared_data / "he_ihc_serial" / "birl_rat_kidney"
    fixed = read_landmarks(folder / "Rat-Kidney_HE.csv").iloc[:3]
    with pytest.raises(DataError, match="at least 4 shared landmarks"):
        register_landmarks(fixed, read_landmarks(folder / "Rat-Kidney_PanCytokeratin.csv"))
    with pytest.raises(DataError, match="cannot read landmarks"):
        read_landmarks(folder / "Rat-Kidney_HE.jpg")


def test_write_pair_folder_gives_the_pairs_layout_fine_tuning_reads(tmp_path):
    from mupd.data.pairs import write_pair_folder
    from mupd.errors import OutputExistsError
    from mupd.train.folders import load_folder

    rng = np.random.default_rng(0)
    he = rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)
    marker = rng.integers(0, 255, (70, 100), dtype=np.uint8)
    assert write_pair_folder(he, marker, "Ki67-mine", 32, tmp_path / "pairs") == 6  # 2 x 3, edges dropped
    data = load_folder(tmp_path / "pairs", 32)
    assert data.kind == "pairs" and data.stains == {"Ki67-mine": "marker"} and len(data.samples) == 6
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pairs" / "HE" / "tile_r001_c002.png")),
                                  he[32:64, 64:96])
    with pytest.raises(OutputExistsError):  # never over a folder that is there
        write_pair_folder(he, marker, "Ki67-mine", 32, tmp_path / "pairs")
    with pytest.raises(DataError, match="differ in size"):
        write_pair_folder(he, marker[:40], "Ki67-mine", 32, tmp_path / "other")
    with pytest.raises(DataError, match="no 128 px tile"):
        write_pair_folder(he, marker, "Ki67-mine", 128, tmp_path / "other")
    assert not (tmp_path / "other").exists()
