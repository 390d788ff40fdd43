"""`mupd serve` as a real subprocess: the Engine interface over HTTP, security and faults."""

from __future__ import annotations

import io
import socket
import threading

import httpx
import numpy as np
import pytest
from skimage.data import immunohistochemistry

from mupd.engine import wire
from mupd.engine.api import GenerateRequest, TranslateRequest
from mupd.engine.remote import AuthError, EngineUnreachableError, RemoteEngine, RemoteError
from mupd.errors import CancelledError
from mupd.progress import CancelToken
from mupd.regions.source import ArraySlide
from mupd.requests import MAX_STEPS
from support_server import ServerProcess, free_port, save_tiny_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "mupd-tiny-test")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    proc = ServerProcess(tmp_path_factory.mktemp("server"), tiny_model, ["--max-request-mb", "2"]).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def local(tiny_model):
    from mupd.engine.local import LocalEngine

    return LocalEngine(str(tiny_model), device="cpu")


@pytest.fixture
def remote(server):
    with RemoteEngine(server.url, server.token, timeout=120) as engine:
        yield engine


def _region(local, size_tiles=2):
    """A real IHC-stained region sized in model tiles, as a slide at the model's mpp."""
    t = local.info().tile_size * size_tiles
    return ArraySlide(immunohistochemistry()[:t, :t], mpp=local.info().mpp)


def test_info_matches_the_local_engine(remote, local):
    info, here = remote.info(), local.info()
    assert info.remote and (info.tile_size, info.mpp) == (here.tile_size, here.mpp)
    assert [t["name"] for t in info.targets] == [t["name"] for t in here.targets]
    assert info.guidance == here.guidance  # the model's validated scales reach a remote panel


def test_generate_equals_local_for_the_same_seed(remote, local):
    req = GenerateRequest(text="HER2-positive invasive carcinoma", num_images=2, steps=2, seed=3)
    got, want = remote.generate(req), local.generate(req)
    assert got.images.shape == want.images.shape
    assert np.abs(got.images.astype(int) - want.images.astype(int)).max() <= 1


def test_translate_upload_equals_local_and_is_placed_over_the_slide(remote, local, tmp_path, server):
    slide = _region(local)
    marker = next(t["name"] for t in local.info().targets if t["kind"] == "marker")
    req = TranslateRequest(slide_path="roi", stains=[marker], seed=1)
    body = wire.encode_region_upload(req, slide.image, slide.mpp[0])
    r = httpx.post(f"{server.url}/translate", content=body, timeout=120,
                   headers={**server.headers, "Content-Type": wire.NPZ_MEDIA_TYPE})
    assert r.status_code == 200, r.text
    got = wire.decode_translate_result(r.content)
    want = local.translate_slide(slide, req)
    assert [l.name for l in got.layers] == [l.name for l in want.layers]
    for g, w in zip(got.layers, want.layers):
        assert g.data.shape == w.data.shape
        assert np.allclose(g.data.astype(float), w.data.astype(float), atol=1.01)
        assert g.placement.translate_um == w.placement.translate_um


def test_translate_a_slide_the_server_reads(server, local):
    from PIL import Image

    slide = _region(local)
    Image.fromarray(slide.image).save(server.root / "slides" / "roi.png")
    marker = next(t["name"] for t in local.info().targets if t["kind"] == "marker")
    look = {"nucleus_h": 0.08, "background_h": 0.06, "dab_max": 0.07}  # a lab's IHC look travels too
    req = TranslateRequest(slide_path="roi.png", stains=[marker], seed=2, slide_mpp=slide.mpp[0],
                           box=(4, 8, slide.image.shape[1] - 4, slide.image.shape[0] - 8), ihc_look=look)
    with RemoteEngine(server.url, server.token, timeout=120, upload="never") as engine:
        got = engine.translate(req)
    want = local.translate(TranslateRequest(**{**req.__dict__,
                                               "slide_path": str(server.root / "slides" / "roi.png")}))
    assert got.layers[1].metadata["rendering"]["ihc_look"] == look
    for g, w in zip(got.layers, want.layers, strict=True):
        assert np.allclose(g.data.astype(float), w.data.astype(float), atol=1.01), g.name
        assert g.placement.translate_um == w.placement.translate_um
        assert g.placement.scale_um == w.placement.scale_um


def test_slide_paths_are_confined_to_the_slide_roots(server, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    link = server.root / "slides" / "escape.png"
    link.symlink_to(outside)
    for path in ["../../etc/passwd", str(outside), "escape.png"]:
        r = httpx.post(f"{server.url}/translate", headers=server.headers, timeout=30,
                       json={"slide_path": path, "stains": ["HER2"]})
        assert r.status_code == 403, (path, r.text)
        assert "outside the folders" in r.json()["detail"]
    r = httpx.post(f"{server.url}/translate", headers=server.headers, timeout=30,
                   json={"slide_path": "missing.svs", "stains": ["HER2"]})
    assert r.status_code == 404 and "missing.svs" in r.json()["detail"]
    r = httpx.post(f"{server.url}/models/load", headers=server.headers, json={"path": "/etc"}, timeout=30)
    assert r.status_code == 403


def test_wrong_or_missing_token_is_refused_and_never_logged(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.token}):
        assert httpx.get(f"{server.url}/info", headers=headers, timeout=10).status_code == 401
    with pytest.raises(AuthError, match="refused the token") as err:
        RemoteEngine(server.url, "not-the-token").info()
    assert "not-the-token" not in str(err.value)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # unauthenticated
    assert server.token not in server.log.read_text()


def test_malformed_payloads_get_422_with_a_reason(server):
    h = {**server.headers, "Content-Type": wire.NPZ_MEDIA_TYPE}
    cases = [
        ("/translate", b"not an npz", h, "not an npz"),
        ("/generate", b"PK\x03\x04 broken zip", h, "npz"),
        ("/translate", b"{not json", {**server.headers, "Content-Type": "application/json"}, "JSON"),
        ("/translate", b"x", {**server.headers, "Content-Type": "text/plain"}, "application/json"),
        ("/jobs/finetune", b'{"data_dir": "d"}', {**server.headers, "Content-Type": "application/json"},
         "missing field"),
    ]
    for path, body, headers, reason in cases:
        r = httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=30)
        assert r.status_code == 422, (path, r.text)
        assert reason in r.json()["detail"]
    r = httpx.post(f"{server.url}/generate", headers=h, timeout=30,
                   content=wire.encode_generate_request(GenerateRequest(stain="Nonexistium", steps=1,
                                                                        num_images=1)))
    assert r.status_code == 400 and "Nonexistium" in r.json()["detail"]
    assert server.alive()


def test_oversized_payloads_get_413(server):
    big = b"\0" * (3 * 2**20)
    r = httpx.post(f"{server.url}/translate", content=big, timeout=30,
                   headers={**server.headers, "Content-Type": wire.NPZ_MEDIA_TYPE})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(6):
            yield b"\0" * 2**19

    r = httpx.post(f"{server.url}/translate", content=chunks(), timeout=30,
                   headers={**server.headers, "Content-Type": wire.NPZ_MEDIA_TYPE})
    assert r.status_code == 413
    r = httpx.post(f"{server.url}/generate", timeout=30,
                   headers={**server.headers, "Content-Type": wire.NPZ_MEDIA_TYPE},
                   content=wire.encode_generate_request(GenerateRequest(num_images=10_000)))
    assert r.status_code == 413 and "num_images" in r.json()["detail"]
    assert server.alive()


def _generate(server, body: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", content=body, timeout=60,
                      headers={**server.headers, "Content-Type": wire.NPZ_MEDIA_TYPE})


def test_rna_must_be_a_gene_mapping_and_is_never_read_as_a_server_file(server, tmp_path):
    secret = tmp_path / "secret.tsv"  # outside every root of the server
    secret.write_text("top-secret-first-line\n")
    details = []
    for rna in (str(secret), str(tmp_path / "absent.tsv"), ["ERBB2", 1], 3):
        r = _generate(server, wire.encode_generate_request(GenerateRequest(rna=rna, steps=1, num_images=1)))
        assert r.status_code in (400, 422), (rna, r.text[:300])
        detail = r.json()["detail"]
        assert "rna must be" in detail and "top-secret" not in detail and "does not exist" not in detail
        details.append(detail)
    assert details[0] == details[1]  # an existing and a missing file answer alike: nothing to probe


@pytest.mark.parametrize("rna, named", [
    ('{"ERBB2": 3, "ERBB2": 5}', ["ERBB2"]),  # json.loads would keep the last one silently
    ('{"ERBB2": 3, "Erbb2": 5}', ["ERBB2", "Erbb2"]),  # the same gene: symbols match in any case
    ('{"ERBB2": NaN, "ACTB": 1}', ["ERBB2"]),
    ('{"ERBB2": 1e308, "ACTB": 1e308}', ["largest float"]),  # the CPM total overflows: not silent zeros
])
def test_duplicate_or_non_finite_rna_is_refused_naming_it(server, rna, named):
    meta = f'{{"rna": {rna}, "steps": 1, "num_images": 1}}'.encode()
    buf = io.BytesIO()
    np.savez(buf, **{wire.META_KEY: np.frombuffer(meta, dtype=np.uint8)})
    r = _generate(server, buf.getvalue())
    assert r.status_code in (400, 422), r.text[:300]
    assert all(name in r.json()["detail"] for name in named), r.json()


@pytest.mark.parametrize("steps", [0, -5, 2.5, 10**9])
def test_steps_are_capped_on_generate_and_translate(server, steps):
    from PIL import Image

    image = immunohistochemistry()[:64, :64]
    Image.fromarray(image).save(server.root / "slides" / "steps.png")
    req = TranslateRequest(slide_path="steps.png", stains=["HER2"], steps=steps, slide_mpp=0.5)
    answers = [
        _generate(server, wire.encode_generate_request(GenerateRequest(steps=steps, num_images=1))),
        httpx.post(f"{server.url}/translate", json=wire.to_json(req), headers=server.headers, timeout=60),
        httpx.post(f"{server.url}/translate", content=wire.encode_region_upload(req, image, 0.5), timeout=60,
                   headers={**server.headers, "Content-Type": wire.NPZ_MEDIA_TYPE}),
    ]
    for r in answers:
        assert r.status_code == 422, r.text[:300]
        assert f"steps={steps!r}" in r.json()["detail"] and f"1..{MAX_STEPS}" in r.json()["detail"]
    assert server.alive()


def test_client_disconnecting_mid_request_leaves_the_server_serving(server, remote, local):
    body = wire.encode_generate_request(GenerateRequest(num_images=4, steps=50, seed=1))
    head = (f"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
            f"Content-Type: {wire.NPZ_MEDIA_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head + body)
        threading.Event().wait(1.0)  # the server is now sampling; hang up on it
    deadline = 60
    while deadline > 0 and httpx.get(f"{server.url}/health", timeout=5).json()["device"]["running"]:
        threading.Event().wait(0.5)
        deadline -= 0.5
    assert httpx.get(f"{server.url}/health", timeout=5).json()["device"]["running"] is None
    assert "client went away" in server.log.read_text()
    got = remote.generate(GenerateRequest(num_images=1, steps=2, seed=9))
    assert got.images.shape[0] == 1


def test_cancelling_a_remote_call_stops_it(remote):
    token = CancelToken()
    threading.Timer(1.0, token.cancel).start()
    events = []
    with pytest.raises(CancelledError):
        remote.generate(GenerateRequest(num_images=4, steps=200), progress=events.append, cancel=token)
    assert remote.generate(GenerateRequest(num_images=1, steps=1)).images.shape[0] == 1


def test_unreachable_engine_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EngineUnreachableError, match=url.replace(".", r"\.")):
        RemoteEngine(url, "t", timeout=5).info()


def test_unknown_job_is_404(remote):
    with pytest.raises(RemoteError, match="no fine-tune job") as err:
        remote.job_status("0123456789ab")
    assert err.value.status_code == 404


# -- hardening: each field checked by type and range at the boundary (4xx naming it, never 500)
def _meta_npz(meta: str) -> bytes:
    """An npz whose JSON is written by hand (escapes json.dumps would never produce)."""
    buf = io.BytesIO()
    np.savez(buf, **{wire.META_KEY: np.frombuffer(meta.encode(), dtype=np.uint8)})
    return buf.getvalue()


def _broken_shapes_model(server) -> str:
    import json
    import shutil

    folder = server.root / "models" / "wrong-shapes"
    if not folder.exists():
        shutil.copytree(server.model, folder)
        config = folder / "transformer" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 96}))
    return str(folder)


BAD_FIELDS = [  # (endpoint, body, field the answer must name)
    ("/translate", '{"slide_path": "a\\u0000.png", "stains": ["HER2"]}', "slide_path"),
    ("/models/load", '{"path": "/x\\u0000y"}', "path"),
    ("/translate", '{"slide_path": "steps.png", "stains": ["HER2"], "box": [0, 0, 1e400, 8]}', "box[2]"),
    ("/generate", '{"text": "\\ud800 carcinoma", "steps": 1, "num_images": 1}', "text"),
    ("/translate", '{"slide_path": "steps.png", "stains": ["H\\udfffR2"]}', "stains[0]"),
    ("/generate", f'{{"seed": {2**70}, "steps": 1, "num_images": 1}}', "seed"),
    ("/translate", f'{{"slide_path": "steps.png", "stains": ["HER2"], "seed": {2**70}}}', "seed"),
    ("/generate", '{"num_images": "1", "steps": 1}', "num_images"),
    ("/translate", '{"slide_path": "steps.png", "stains": ["HER2"], "slide_mpp": "0.5"}', "slide_mpp"),
    ("/translate", '{"slide_path": "steps.png", "stains": ["HER2"], "guidance": {"source": "2"}}',
     "guidance['source']"),
    ("/jobs/finetune", '{"data_dir": "d", "output_dir": "o", "steps": "9"}', "steps"),
    ("/translate", '{"slide_path": "steps.png", "stains": ["H&E"], "strength": 1.5}', "strength"),
    ("/translate", '{"slide_path": "steps.png", "stains": ["H&E"], "strength": "0.5"}', "strength"),
    ("/translate", '{"slide_path": "steps.png", "stains": ["H&E"], "stain_norm": 3}', "stain_norm"),
    ("/translate", '{"slide_path": "steps.png", "stains": ["HER2"], "ihc_look": {"nucleus_h": "x"}}',
     "ihc_look['nucleus_h']"),
    ("/translate", '{"slide_path": "steps.png", "stains": ["HER2"], "ihc_look": {"nucleus_h": 0.04}}',
     "ihc_look"),
    ("/translate", '{"slide_path": "steps.png", "stains": ["HER2"], "ihc_look": '
     '{"nucleus_h": 0.04, "background_h": 0.02, "dab_max": -1}}', "dab_max"),
    ("/models/load", None, "wrong-shapes/transformer"),  # a model config with wrong shapes
]


@pytest.mark.parametrize("path, body, field", BAD_FIELDS, ids=[f"{p}:{f}" for p, _, f in BAD_FIELDS])
def test_bad_fields_get_4xx_naming_the_field(server, path, body, field):
    if body is None:
        body = '{"path": "%s"}' % _broken_shapes_model(server)
    if path == "/generate":
        kind, content = wire.NPZ_MEDIA_TYPE, _meta_npz(body)
    else:
        kind, content = "application/json", body.encode()
    r = httpx.post(f"{server.url}{path}", content=content, timeout=60,
                   headers={**server.headers, "Content-Type": kind})
    assert r.status_code in (400, 422), r.text[:300]
    assert field in r.json()["detail"], r.json()
    assert server.alive() and "internal error" not in server.log.read_text()


def test_a_model_whose_text_encoder_is_a_pickle_outside_the_root_is_not_loaded(server, tmp_path, tiny_model):
    import json
    import shutil

    import torch

    outside = tmp_path / "encoder"  # outside the server's model root
    outside.mkdir()
    from mupd.models.text import default_encoder_dir

    shutil.copy(default_encoder_dir() / "config.json", outside / "config.json")
    torch.save({"weight": torch.zeros(2)}, outside / "pytorch_model.bin")
    model = server.root / "models" / "pickled-encoder"
    shutil.copytree(tiny_model, model)
    index = json.loads((model / "model_index.json").read_text())
    index["text_encoder"] = index["config"]["text_encoder"] = str(outside)
    (model / "model_index.json").write_text(json.dumps(index))
    try:
        r = httpx.post(f"{server.url}/models/load", json={"path": str(model)}, headers=server.headers,
                       timeout=120)
        assert r.status_code == 400, r.text[:300]
        assert str(outside) in r.json()["detail"] and "outside" in r.json()["detail"]
        assert httpx.get(f"{server.url}/info", headers=server.headers, timeout=30).json()[
            "model_path"] == str(tiny_model)  # still serving the model it had
    finally:
        httpx.post(f"{server.url}/models/load", json={"path": str(tiny_model)}, headers=server.headers,
                   timeout=120)


def test_an_existing_output_gets_409_saying_what_the_client_can_do(server):
    from PIL import Image

    Image.fromarray(immunohistochemistry()[:64, :64]).save(server.root / "slides" / "out-src.png")
    taken = server.root / "slides" / "results"
    taken.mkdir(exist_ok=True)
    (taken / "mine.txt").write_text("user data")
    r = httpx.post(f"{server.url}/translate", headers=server.headers, timeout=60, json={
        "slide_path": "out-src.png", "stains": ["HER2"], "slide_mpp": 1.0, "output_path": str(taken)})
    assert r.status_code == 409, r.text[:300]
    detail = r.json()["detail"]
    assert "--overwrite" not in detail and "output_path" in detail
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
