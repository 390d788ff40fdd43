"""Spatial transcriptomics ingestion (Visium spaceranger, .h5ad), marker maps from spot RNA,
captions files."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from mupd.data.captions import level_word, read_captions
from mupd.data.markers import render_marker_maps, spot_level
from mupd.data.spatial import (MissingGenesWarning, normalize_log_cpm, panel_values,
                               read_spatial_h5ad, read_visium)
from mupd.data.store import PatchStore
from mupd.errors import DataError


def _heart(shared_data):
    return shared_data / "st" / "visium" / "scanpy_human_heart"


def _brain(shared_data):
    folder = shared_data / "st" / "visium" / "squidpy_mouse_brain"
    return folder / "test_data.h5ad", folder / "test_img.jpg"


def test_visium_folder_is_placed_on_its_lowres_image(shared_data):
    folder = _heart(shared_data)
    table = read_visium(folder)
    factors = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    info = table.uns["mupd"]
    # The hires PNG of this test folder is a black placeholder: the lowres one is used.
    assert info["image_path"].endswith("tissue_lowres_image.png") and not info["normalized"]
    assert table.n_obs == 100 and table.n_vars == 100
    assert info["mpp"] == pytest.approx(55 / factors["spot_diameter_fullres"]
                                        / factors["tissue_lowres_scalef"])
    positions = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None,
                            index_col=0).loc[table.obs_names]  # columns 4, 5: full-res row, col
    scale = factors["tissue_lowres_scalef"]
    np.testing.assert_allclose(table.obs.x_px, positions[5] * scale)
    np.testing.assert_allclose(table.obs.y_px, positions[4] * scale)
    norm = normalize_log_cpm(table)
    raw = table.X.toarray()
    expect = np.log1p(raw / raw.sum(axis=1, keepdims=True) * 1e6)
    np.testing.assert_allclose(norm.X.toarray(), expect, rtol=1e-5)


def test_h5ad_spots_genes_are_case_insensitive_and_missing_ones_masked(shared_data):
    h5ad, image = _brain(shared_data)
    table = read_spatial_h5ad(h5ad, image)
    assert table.n_obs == 49 and table.uns["mupd"]["normalized"]  # log-normalised upstream
    assert table.uns["mupd"]["mpp"] == pytest.approx(55 / 89.44476, rel=1e-4)
    with pytest.warns(MissingGenesWarning, match="ERBB2"):
        values = panel_values(table, ["ACTA2", "ERBB2"])  # mouse symbols: Acta2, no Erbb2
    assert np.isfinite(values[:, 0]).all() and np.isnan(values[:, 1]).all()
    assert values[:, 0].std() > 0


def test_h5ad_on_the_wrong_image_is_refused(shared_data):
    h5ad, _ = _brain(shared_data)
    wrong = _heart(shared_data) / "spatial" / "tissue_lowres_image.png"  # 600x600 px
    with pytest.raises(DataError, match="outside image"):
        read_spatial_h5ad(h5ad, wrong, mpp=0.6)


def test_marker_map_of_an_isolated_spot_is_its_value_inside_the_footprint():
    maps, valid = render_marker_maps(np.array([[32.0, 32.0]]), np.array([[3.0, np.nan]]),
                                     scales=[6.0, 1.0], tile_size=128, mpp=1.0,
                                     spot_diameter_um=40.0)
    assert maps[0, 32, 32] == pytest.approx(0.5, abs=1e-3)  # 3 / scale 6
    assert maps[0, 127, 127] < 1e-3 and not valid[0, 127, 127] and valid[0, 32, 32]
    profile = maps[0, 32, 32:]  # fades out from the footprint edge without a step
    assert np.all(np.diff(profile) <= 1e-6) and np.abs(np.diff(profile)).max() < 0.05
    assert not valid[1].any() and not maps[1].any()  # gene not measured: nothing valid
    assert spot_level(maps, valid)[0] == pytest.approx(0.5, abs=0.02)


def test_spot_store_marker_maps_follow_the_spot_rna(shared_data, tmp_path):
    from mupd.data.build import build_spot_store

    h5ad, image = _brain(shared_data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingGenesWarning)
        path, reference = build_spot_store([read_spatial_h5ad(h5ad, image, patient="M1")],
                                           tmp_path / "s", tile_size=64, mpp=2.0)
    store = PatchStore(path)
    # Only ACTA2 (SMA) of the marker panel is measured in this mouse brain panel.
    assert list(store.markers) == ["SMA"] and "HER2" in reference["unmeasured"]
    assert set(store.manifest.patient) == {"M1"} and len(store) >= 40
    centre = store.markers["SMA"][:, 32, 32].astype(np.float32)
    acta2 = store.rna[:, store.genes.index("Acta2")]
    expected = np.clip(acta2 / reference["scales"]["SMA"], 0, 1)
    np.testing.assert_allclose(centre, expected, atol=0.01)  # 55 um spots on a 100 um pitch
    assert store.captions is None


def test_captions_csv_and_jsonl(tmp_path):
    (tmp_path / "c.csv").write_text("file,caption\na.png,H&E colon\nb.png,H&E liver\n")
    (tmp_path / "c.jsonl").write_text('{"key": "s1", "text": "tumour"}\n\n{"key": "s2", "text": "stroma"}\n')
    assert read_captions(tmp_path / "c.csv") == {"a.png": "H&E colon", "b.png": "H&E liver"}
    assert read_captions(tmp_path / "c.jsonl") == {"s1": "tumour", "s2": "stroma"}
    (tmp_path / "bad.csv").write_text("file,caption\na.png,x\na.png,y\n")
    with pytest.raises(DataError, match="more than once"):
        read_captions(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("name,words\na,b\n")
    with pytest.raises(DataError, match="needs a 'file'"):
        read_captions(tmp_path / "cols.csv")


def test_her2st_a1_spots_carry_region_labels_and_hide_the_pasted_thumbnail(shared_data):
    from mupd.data.spatial import her2st_spots, spot_tiles

    table = her2st_spots(shared_data, "A1")  # 2000-px downscale, ~3.2 um/px
    assert table.obs.label.notna().all() and (table.obs.label == "invasive cancer").sum() > 100
    assert table.uns["mupd"]["mpp"] == pytest.approx(3.17, abs=0.05)
    x0, y0, x1, y1 = table.uns["mupd"]["masked_boxes"][0]
    corner = table.obs.iloc[:1].copy()
    corner[["x_px", "y_px"]] = [(x0 + x1) / 2, (y0 + y1) / 2]  # a tile inside the pasted thumbnail
    probe = table[:1].copy()
    probe.obs = corner
    assert not spot_tiles(probe, 32, 3.2).any()  # masked black, never tissue


def test_derived_captions_name_other_markers_by_their_training_tertile():
    """With `extra_markers=3` captions name HER2, the immune level and three other measured
    markers, each with the tertile its value falls in; the pick is the spot id's (the same in
    every build), varies between spots, skips unmeasured markers; by default, or with cuts
    without other markers, they name none."""
    from mupd.data.captions import fit_caption_cuts, her2st_captions

    names = ["HER2", "ER", "Ki67", "CD45", "CD3", "CD8", "CD68"]
    rng = np.random.default_rng(0)
    levels = rng.gamma(2.0, 2.0, size=(60, len(names)))
    levels[:, 1] = np.nan  # ER measured nowhere: no cut, never named
    cuts = fit_caption_cuts(levels, names)
    assert "ER" not in cuts and set(cuts) == {*names} - {"ER"} | {"immune"}
    spots = [f"spot{i}" for i in range(60)]
    captions = her2st_captions(levels, names, cuts, spots, extra_markers=3)
    assert captions == her2st_captions(levels, names, cuts, spots, extra_markers=3)
    named = []
    for caption, row in zip(captions, levels):
        words = caption.split(", ")
        assert words[:4] == ["H&E", "breast", "HER2-positive carcinoma",
                             f"HER2-{level_word(row[0], cuts['HER2'])}"]
        others = [w for w in words[5:] if w.split("-")[0] in names]
        assert len(others) == 3
        for word in others:
            marker, level = word.split("-")
            assert marker != "ER" and level == level_word(row[names.index(marker)], cuts[marker])
        named.append(tuple(others))
    assert len({tuple(w.split("-")[0] for w in n) for n in named}) > 5
    old = {k: cuts[k] for k in ("HER2", "immune")}  # a reference fitted before this change
    assert all(len(c.split(", ")) == 5 for c in her2st_captions(levels, names, old, spots, extra_markers=3))
    assert all(len(c.split(", ")) == 5 for c in her2st_captions(levels, names, cuts, spots))
