"""Seeded fuzz of `mupd serve`'s JSON and npz endpoints: no answer is a 5xx, memory stays bounded.

Hypothesis is not a dependency, so the cases come from a seeded `random.Random` (the same ones on
every run; a failure names its case number). Each case starts from a valid, cheap request
(1 step, 1 image, a 64 px slide) and breaks 1-3 things in it: JSON tokens json.dumps never writes
(1e400, NaN, lone surrogates, NUL, 5000-digit integers, deep nesting, keys given twice), wrong
kinds and ranges, unknown or missing fields, and for npz bodies broken arrays and archives.
Loopback only; bounded in count (FUZZ_CASES) and time (FUZZ_SECONDS).
"""

from __future__ import annotations

import io
import random
import time
import zipfile

import httpx
import numpy as np
import pytest
from skimage.data import immunohistochemistry

from mupd.engine import wire
from support_server import ServerProcess, save_tiny_model

pytestmark = pytest.mark.timeout(400)

SEED = 20261201
FUZZ_CASES = {"translate-json": 110, "models-load": 40, "finetune": 40, "generate-npz": 110,
              "translate-npz": 100}
FUZZ_SECONDS = 90  # the loop stops here even if cases remain (the test then fails: too slow)
RSS_GROWTH_LIMIT_MB = 100

#: Raw JSON tokens: wrong kinds, out of range, and what json.loads takes but Python chokes on.
BAD_TOKENS = [
    "null", "true", "false", "0", "-1", "1.5", "-0.0", str(2**63), str(2**70), str(-(2**70)),
    "1e400", "-1e400", "NaN", "Infinity", "-Infinity", '""', '"1"', '"0.5"', '"\\u0000"',
    '"a\\u0000b"', '"\\ud800"', '"x\\udfff"', '"\\udc80\\ud800"', "[]", "[1]", "[1, 2, 3, 4, 5]",
    "[null, null]", '["a", 1]', "{}", '{"a": 1}', '{"": null}', "[" * 40 + "]" * 40,
    "[" * 5000 + "]" * 5000, '"' + "A" * 5000 + '"', '"/' + "A" * 300 + '/x"', "1" * 5000, '{"\\ud800": 1}', "[1e400, 2]",
    "[0, 0, 1e400, 8]", "[[0, 0], [1e400, 0], [0, 5]]", '{"text": "NaN"}', '{"source": NaN}',
]
#: Valid, cheap requests (as raw JSON per field) that the cases break.
BASES = {
    "translate-json": {"slide_path": '"fuzz.png"', "stains": '["HER2"]', "slide_mpp": "1.0",
                       "steps": "1", "box": "[0, 0, 64, 64]", "seed": "0", "guidance": "{}",
                       "render_brightfield": "false"},
    "models-load": {"path": '"/nowhere/model"'},
    # output_dir lies outside the model roots: never a real job, whatever else the case does
    "finetune": {"data_dir": '"fuzz"', "output_dir": '"/outside/out"', "steps": "2", "seed": "0",
                 "method": '"lora"', "learning_rate": "0.001", "batch_size": "1"},
    "generate-npz": {"text": '"tumour"', "stain": '"H&E"', "num_images": "1", "steps": "1",
                     "seed": "0", "guidance": "{}", "rna": '{"ERBB2": 3, "ACTB": 10}',
                     "rna_normalized": "false"},
    "translate-npz": {"slide_path": '"upload.png"', "stains": '["HER2"]', "steps": "1", "seed": "0",
                      "upload_mpp": "1.0", "render_brightfield": "false"},
}
FIXED = {"finetune": {"output_dir"}, "models-load": set()}  # fields a case never changes
EXTRA_FIELDS = ["colour", "reference", "upload_frame", "__proto__", "box", "polygon", "output_path",
                "\\ud800", "a\\u0000", "steps"]


def _json_body(rng: random.Random, kind: str) -> str:
    """The base request of `kind` as JSON text with 1-3 things broken."""
    fields = dict(BASES[kind])
    twice = []
    for _ in range(rng.randint(1, 3)):
        what = rng.random()
        names = [k for k in fields if k not in FIXED.get(kind, ())]
        if what < 0.65 and names:
            token = rng.choice(BAD_TOKENS)
            if kind == "models-load" and token == "null":
                token = '"\\u0000"'  # null is the bundled model: valid, and slow to load
            fields[rng.choice(names)] = token
        elif what < 0.8:
            fields[rng.choice(EXTRA_FIELDS)] = rng.choice(BAD_TOKENS)
        elif what < 0.9 and names:
            fields.pop(rng.choice(names))
        else:  # a key given twice (json.loads would keep the last one silently)
            twice.append((rng.choice(list(BASES[kind])), rng.choice(BAD_TOKENS)))
    body = "{" + ", ".join(f'"{k}": {v}' for k, v in [*fields.items(), *twice]) + "}"
    if rng.random() < 0.08:
        body = body[: rng.randrange(len(body))]  # truncated
    if rng.random() < 0.04:
        body = rng.choice(BAD_TOKENS)  # not an object at all
    return body


def _npz(meta: bytes, arrays: dict[str, np.ndarray], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(
        buf, **{wire.META_KEY: np.frombuffer(meta, dtype=np.uint8)}, **arrays)
    return buf.getvalue()


def _bad_array(rng: random.Random, good: np.ndarray) -> np.ndarray:
    choices = [
        lambda: good.astype(np.float32), lambda: good.astype(np.float64) * np.nan,
        lambda: good[..., 0], lambda: good[:0], lambda: good[:, :0], lambda: good[:1, :1],
        lambda: np.zeros((3, 2, 2, 3), np.uint8), lambda: np.zeros((2, 2, 4), np.uint8),
        lambda: good.astype(bool), lambda: good.astype(np.int64) - 300, lambda: np.zeros((), np.uint8),
        lambda: np.zeros((1, 1, 1, 1, 1), np.uint16), lambda: good[:, :, :2],
    ]
    return rng.choice(choices)()


def _npz_body(rng: random.Random, kind: str, image: np.ndarray) -> bytes:
    """An npz request of `kind` broken in its JSON, its arrays or the archive itself."""
    meta = _json_body(rng, kind).encode("utf-8", "surrogatepass")
    name = "reference" if kind == "generate-npz" else "image"
    arrays = {name: image} if (kind == "translate-npz" or rng.random() < 0.5) else {}
    what = rng.random()
    if what < 0.3:  # valid JSON, broken arrays
        meta = ("{" + ", ".join(f'"{k}": {v}' for k, v in BASES[kind].items()) + "}").encode()
        arrays = {name: _bad_array(rng, image)}
        if rng.random() < 0.3:
            arrays["extra"] = np.zeros(3, np.float32)
    body = _npz(meta, arrays, compressed=rng.random() < 0.2)
    what = rng.random()
    if what < 0.06:
        body = body[: rng.randrange(len(body))]
    elif what < 0.12:
        flipped = bytearray(body)
        for _ in range(rng.randint(1, 20)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        body = bytes(flipped)
    elif what < 0.16:
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    elif what < 0.2:
        body = _npz(b"\xff\xfe not utf-8", arrays)
    elif what < 0.23:
        buf = io.BytesIO()
        np.savez(buf, **{wire.META_KEY: np.array([{"a": 1}], dtype=object)})  # needs pickle
        body = buf.getvalue()
    elif what < 0.26:
        body = _npz(meta, {name: np.zeros(6 * 2**20, np.uint8)}, compressed=True)  # inflates past 4x
    elif what < 0.29:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(f"{wire.META_KEY}.npy", b"\x93NUMPY garbage")
            zf.writestr("payload.pkl", b"\x80\x04K\x01.")
        body = buf.getvalue()
    return body


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = save_tiny_model(root / "model")
    proc = ServerProcess(root / "srv", model, ["--max-request-mb", "2"]).start()
    from PIL import Image

    Image.fromarray(immunohistochemistry()[:64, :64]).save(proc.root / "slides" / "fuzz.png")
    (proc.root / "slides" / "fuzz").mkdir()
    yield proc
    proc.stop()


def _cases(image: np.ndarray):
    """(case number, method path, content type, body), the same sequence on every run."""
    rng = random.Random(SEED)
    paths = {"translate-json": "/translate", "models-load": "/models/load", "finetune": "/jobs/finetune",
             "generate-npz": "/generate", "translate-npz": "/translate"}
    order = [k for k, n in FUZZ_CASES.items() for _ in range(n)]
    rng.shuffle(order)
    for i, kind in enumerate(order):
        if kind.endswith("npz"):
            yield i, paths[kind], wire.NPZ_MEDIA_TYPE, _npz_body(rng, kind, image)
        else:
            yield i, paths[kind], "application/json", _json_body(rng, kind).encode("utf-8", "surrogatepass")


def test_fuzzed_requests_never_get_a_5xx_and_memory_stays_bounded(server):
    import psutil

    process = psutil.Process(server.proc.pid)
    tile = immunohistochemistry()[:128, :128]
    failures, statuses, rss = [], {}, []
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
        for kind, path in (("generate-npz", "/generate"), ("translate-npz", "/translate")):
            meta = ("{" + ", ".join(f'"{k}": {v}' for k, v in BASES[kind].items()) + "}").encode()
            name = "reference" if kind == "generate-npz" else "image"
            r = client.post(path, content=_npz(meta, {name: tile}), headers={"Content-Type": wire.NPZ_MEDIA_TYPE})
            assert r.status_code == 200, r.text[:300]  # the bases are valid; lazy loads are done
        rss.append(process.memory_info().rss)
        start = time.monotonic()
        for i, path, kind, body in _cases(tile):
            if time.monotonic() - start > FUZZ_SECONDS:
                break
            try:
                r = client.post(path, content=body, headers={"Content-Type": kind})
            except httpx.TransportError as exc:  # the server hung up or died: a failure too
                failures.append(f"case {i} {path}: {type(exc).__name__} <- {body[:200]!r}")
                if not server.alive():
                    break
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code >= 500:
                failures.append(f"case {i} {path}: {r.status_code} {r.text[:200]} <- {body[:200]!r}")
    done = sum(statuses.values())
    rss.append(process.memory_info().rss)
    print(f"fuzz: {done} cases in {time.monotonic() - start:.1f} s, statuses {sorted(statuses.items())}, "
          f"RSS {rss[0] / 2**20:.0f} -> {rss[-1] / 2**20:.0f} MB")
    assert not failures, "\n".join(failures[:10])
    assert done == sum(FUZZ_CASES.values()), f"only {done} cases ran in {FUZZ_SECONDS} s"
    assert (rss[-1] - rss[0]) / 2**20 < RSS_GROWTH_LIMIT_MB
    assert server.alive() and "internal error" not in server.log.read_text()
    assert set(statuses) - {200, 202} and all(s < 500 for s in statuses)
