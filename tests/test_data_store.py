"""Patch store round trip, atomic writes, patient-level splits, HER2ST ingestion."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mupd.data.splits import her2st_split, patient_split
from mupd.data.store import PatchStore, write_patch_store
from mupd.errors import DataError, OutputExistsError


def _manifest(patients):
    return pd.DataFrame({"patient": patients, "slide": [f"{p}1" for p in patients], "x": 0.0,
                         "y": 0.0, "mpp": 1.0, "tile_size": 8, "source": "test",
                         "caption": [f"tile of {p}" for p in patients]})


def test_store_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    rna = rng.random((5, 3)).astype(np.float32)
    rna[1, 2] = np.nan
    maps = {"HER2": rng.random((5, 8, 8)).astype(np.float32)}
    path = write_patch_store(tmp_path / "s", tiles, _manifest(list("AABBC")), markers=maps,
                             marker_scales={"HER2": 2.0}, rna=rna, genes=["ERBB2", "ESR1", "PGR"])
    store = PatchStore(path)
    np.testing.assert_array_equal(store.tiles[:], tiles)
    np.testing.assert_allclose(store.markers["HER2"][:], maps["HER2"], atol=1e-3)  # float16
    np.testing.assert_array_equal(np.isnan(store.rna[:]), np.isnan(rna))
    assert store.genes == ["ERBB2", "ESR1", "PGR"] and store.marker_scales == {"HER2": 2.0}
    assert store.captions[0] == "tile of A"
    np.testing.assert_array_equal(store.rows_of(["B"]), [2, 3])
    with pytest.raises(OutputExistsError):
        write_patch_store(path, tiles, _manifest(list("AABBC")))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    tiles = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(DataError, match="rna must be"):
        write_patch_store(tmp_path / "s", tiles, _manifest(list("AB")), rna=np.zeros((2, 2)),
                          genes=["A"])
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_patch_store(tmp_path / "s", tiles, _manifest(list("AB")))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", range(20))
def test_patient_split_never_shares_a_patient(seed):
    rng = np.random.default_rng(seed)
    patients = rng.choice(list("ABCDEFGH"), size=200).tolist()
    manifest = _manifest(patients)
    test = sorted(set(patients))[:2]
    split = patient_split(manifest, test_patients=test, val_fraction=0.3, seed=seed)
    sides = {k: set(manifest.patient.iloc[v]) for k, v in split.items()}
    assert not (sides["train"] & sides["val"]) and not (sides["train"] & sides["test"])
    assert not (sides["val"] & sides["test"]) and sides["test"] == set(test)
    assert sum(len(v) for v in split.values()) == len(manifest)


def test_her2st_split_holds_out_a_and_b():
    manifest = _manifest(list("CCBDDA"))
    split = her2st_split(manifest)
    assert list(split["test"]) == [2, 5] and list(split["train"]) == [0, 1, 3, 4]
    assert list(her2st_split(_manifest(list("CD")))["test"]) == []


def test_split_names_unknown_patients():
    with pytest.raises(DataError, match="not in the manifest"):
        patient_split(_manifest(list("AB")), test_patients=["Z"])


def test_store_shards_append_and_records(tmp_path, monkeypatch):
    """Records spread over several shards read back as one array; appends add whole shards."""
    import mupd.data.store as store_module

    monkeypatch.setattr(store_module, "SHARD_RECORDS", 2)
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    maps = rng.random((5, 2, 8, 8)).astype(np.float32)
    valid = rng.random((5, 2, 8, 8)) > 0.5
    path = write_patch_store(tmp_path / "s", tiles[:3], _manifest(list("AAB")), markers=maps[:3],
                             marker_names=["HER2", "ER"], marker_valid=valid[:3])
    store_module.append_patch_store(path, tiles[3:], _manifest(list("CC")), markers=maps[3:],
                                    marker_valid=valid[3:])
    store = PatchStore(path)
    assert len(store) == 5 and len(store.info["shards"]) == 3  # 2 + 1, then 2
    np.testing.assert_array_equal(store.tiles[[4, 0, 2]], tiles[[4, 0, 2]])
    np.testing.assert_array_equal(store.tiles[-1], tiles[-1])
    np.testing.assert_allclose(store.markers["ER"][1:4], maps[1:4, 1], atol=1e-3)
    np.testing.assert_array_equal(store.marker_valid["HER2"][:], valid[:, 0])
    records = store.records(store.rows_of(["C"]))
    assert records["markers"].shape == (2, 2, 8, 8) and list(records["manifest"].patient) == ["C", "C"]
    with pytest.raises(DataError, match="marker maps must be"):
        store_module.append_patch_store(path, tiles[:1], _manifest(["D"]))


def test_her2st_store_from_real_spots(shared_data, tmp_path):
    from mupd.data.build import build_her2st_store

    path, ref = build_her2st_store(shared_data, tmp_path / "c2", ["C2"], max_spots=24)
    store = PatchStore(path)
    assert 12 <= len(store) <= 24  # most spot tiles lie on tissue
    assert set(store.manifest.patient) == {"C"} and len(store.genes) == 793  # the 785-gene panel + 8 marker genes it lacks
    assert {"slide", "x", "y", "mpp", "slide_mpp"} <= set(store.manifest.columns)
    assert (store.manifest.slide == "C2").all() and np.allclose(store.manifest.slide_mpp, 0.686, atol=0.01)
    assert set(store.markers) >= {"HER2", "ER", "Ki67", "CD45"}
    her2 = store.markers["HER2"][:].astype(np.float32)
    assert her2.min() >= 0 and her2.max() <= 1 and her2.std() > 0  # real variation across spots
    assert store.marker_valid["HER2"][:].any(axis=(1, 2)).all()  # every centre spot measured it
    assert all(c.startswith("H&E, breast") for c in store.captions)
    assert store.attrs["captions"].startswith("derived")
    # A held-out store is scaled with the training reference, never refitted on itself.
    path_b, ref_b = build_her2st_store(shared_data, tmp_path / "b4", ["B4"], reference=ref,
                                       max_spots=12)
    assert ref_b is ref and set(PatchStore(path_b).manifest.patient) == {"B"}
    assert PatchStore(path_b).marker_scales == PatchStore(path).marker_scales
