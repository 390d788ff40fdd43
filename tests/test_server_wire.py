"""The wire format: round trips, and refusal of pickle, bombs and malformed messages."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from skimage.data import immunohistochemistry

from mupd.engine import wire
from mupd.engine.api import (
    GenerateRequest,
    GenerateResult,
    JobStatus,
    TranslateRequest,
    TranslateResult,
)
from mupd.regions.outputs import StainLayer
from mupd.regions.plan import Placement
from mupd.requests import FinetuneRequest


def test_generate_request_round_trip_keeps_reference_pixels():
    ref = immunohistochemistry()[:64, :64]
    req = GenerateRequest(text="HER2-positive carcinoma", rna={"ERBB2": 12.0}, reference=ref,
                          num_images=3, steps=2, guidance={"text": 2.5}, seed=7)
    back = wire.decode_generate_request(wire.encode_generate_request(req))
    assert np.array_equal(back.reference, ref)
    assert (back.text, back.rna, back.num_images, back.guidance, back.seed) == (
        req.text, req.rna, 3, {"text": 2.5}, 7)


def test_translate_result_round_trip_keeps_layers_and_placement():
    rgb = immunohistochemistry()[:40, :50]
    marker = np.linspace(0, 1, 40 * 50, dtype=np.float32).reshape(40, 50)
    where = Placement((8, 12, 100, 80), (0.5, 0.5), (1.25, -3.0))
    res = TranslateResult(layers=[
        StainLayer("IHC-HER2", "rgb", rgb, where, "gray", {"target": "HER2"}),
        StainLayer("HER2", "marker", marker, where, "magenta"),
    ], n_tiles=4, seconds=0.5)
    back = wire.decode_translate_result(wire.encode_translate_result(res))
    assert [l.name for l in back.layers] == ["IHC-HER2", "HER2"]
    assert np.array_equal(back.layers[0].data, rgb) and back.layers[1].data.dtype == np.float32
    assert np.array_equal(back.layers[1].data, marker)
    assert back.layers[0].placement == where and back.layers[0].metadata == {"target": "HER2"}
    assert back.n_tiles == 4


def test_region_upload_round_trip_and_shape_checks():
    image = immunohistochemistry()[:30, :20]
    body = wire.encode_region_upload(TranslateRequest("a.svs", ["HER2"], box=(1, 2, 3, 4)), image, 1.0)
    req, back, mpp, frame = wire.decode_region_upload(body)
    assert np.array_equal(back, image) and mpp == 1.0 and req.stains == ["HER2"] and frame == {}
    window = {"origin": (5, 7), "level_size": (400, 300), "dimensions": (1600, 1200)}
    body = wire.encode_region_upload(TranslateRequest("a.svs", ["HER2"], polygon=[(1, 2), (9, 2), (5, 8)]),
                                     image, (0.25, 0.26), window)
    req, back, mpp, frame = wire.decode_region_upload(body)
    assert mpp == (0.25, 0.26) and frame == window and req.polygon == [(1, 2), (9, 2), (5, 8)]
    for bad in ({"origin": [1.5, 2]}, {"origin": [1, 2, 3]}, {"offset": [0, 0]}, [0, 0]):
        with pytest.raises(wire.WireError, match="upload_frame"):
            wire.decode_region_upload(wire.encode_npz(
                {"slide_path": "a", "stains": [], "upload_mpp": 1.0, "upload_frame": bad}, {"image": image}))
    with pytest.raises(wire.WireError, match="uint8"):
        wire.decode_region_upload(wire.encode_npz({"slide_path": "a", "stains": [], "upload_mpp": 1.0},
                                                  {"image": image.astype(np.float32)}))
    with pytest.raises(wire.WireError, match="upload_mpp"):
        wire.decode_region_upload(wire.encode_npz({"slide_path": "a", "stains": []}, {"image": image}))


def test_object_arrays_need_pickle_and_are_refused():
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(b"{}", np.uint8), evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(wire.WireError, match="refused|not accepted"):
        wire.decode_npz(buf.getvalue())


def test_compressed_bomb_is_refused_before_inflating():
    buf = io.BytesIO()
    np.savez_compressed(buf, __meta__=np.frombuffer(b"{}", np.uint8), big=np.zeros(50_000_000, np.uint8))
    assert len(buf.getvalue()) < 1_000_000  # small on the wire
    with pytest.raises(wire.WireError, match="inflates to"):
        wire.decode_npz(buf.getvalue(), max_bytes=10_000_000)


def test_non_npz_members_and_garbage_are_refused():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("payload.pkl", b"\x80\x04K\x01.")
    with pytest.raises(wire.WireError, match="not .npy"):
        wire.decode_npz(buf.getvalue())
    with pytest.raises(wire.WireError, match="not an npz"):
        wire.decode_npz(b"definitely not a zip")


def test_json_dataclasses_name_unknown_and_missing_fields():
    job = JobStatus("abc", "running", step=3, total=10, history=[{"step": 1.0, "loss": 0.5}])
    assert wire.from_json(JobStatus, wire.to_json(job)) == job
    with pytest.raises(wire.WireError, match="unknown field.*colour"):
        wire.from_json(FinetuneRequest, {"data_dir": "d", "output_dir": "o", "colour": 1})
    with pytest.raises(wire.WireError, match="missing field.*output_dir"):
        wire.from_json(FinetuneRequest, {"data_dir": "d"})
    with pytest.raises(wire.WireError, match="box"):
        wire.translate_request_from_json({"slide_path": "a", "stains": ["HER2"], "box": [1, 2]})


def test_generate_result_round_trip():
    images = immunohistochemistry()[None, :16, :16].repeat(2, axis=0)
    back = wire.decode_generate_result(wire.encode_generate_result(
        GenerateResult(images=images, missing_genes=["PGR"], used_genes=["ERBB2"], seconds=1.0)))
    assert np.array_equal(back.images, images) and back.missing_genes == ["PGR"]
