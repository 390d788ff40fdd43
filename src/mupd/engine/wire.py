"""How engine requests and results travel over HTTP: JSON, and npz for arrays; never pickle.

An npz body is an uncompressed zip of `.npy` members plus one `__meta__` member holding UTF-8
JSON (as a uint8 array). It is read with `allow_pickle=False`, and the members' declared sizes
are checked before anything is inflated, so a crafted archive cannot expand past the limit.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from collections import Counter
from typing import Any, Optional, Sequence, TypeVar

import numpy as np

from ..errors import MuPDError
from ..models.rna import profile_from_request
from .api import GenerateRequest, GenerateResult, StainLayer, TranslateRequest, TranslateResult

NPZ_MEDIA_TYPE = "application/x-npz"
META_KEY = "__meta__"
#: dtypes accepted from the wire (object / void dtypes would need pickle or are meaningless here).
ALLOWED_DTYPES = {"uint8", "uint16", "float32", "float64", "int32", "int64", "bool"}

T = TypeVar("T")


class WireError(MuPDError):
    """A payload that is not a valid MuPD message (bad JSON, bad npz, wrong fields or arrays)."""


# -- plain dataclasses <-> JSON ---------------------------------------------------------------
def to_json(obj: Any) -> dict[str, Any]:
    """A dataclass without array fields as a JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def from_json(cls: type[T], data: Any, what: Optional[str] = None) -> T:
    """Build `cls` from a dict, naming unknown or missing fields instead of a TypeError."""
    what = what or cls.__name__
    if not isinstance(data, dict):
        raise WireError(f"{what}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise WireError(f"{what}: unknown field(s) {', '.join(unknown)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise WireError(f"{what}: missing field(s) {', '.join(missing)}")
    try:
        return cls(**data)
    except TypeError as exc:  # pragma: no cover - fields were checked above
        raise WireError(f"{what}: {exc}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json.loads would keep the last one silently,
    e.g. one of two values for a gene)."""
    twice = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
    if twice:
        raise WireError(f"a JSON object gives key(s) {', '.join(map(repr, twice))} more than once")
    return dict(pairs)


# -- npz ------------------------------------------------------------------------------------
def encode_npz(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """JSON metadata plus named arrays in one uncompressed npz body."""
    if META_KEY in arrays:
        raise ValueError(f"array name {META_KEY!r} is reserved")
    for name, a in arrays.items():
        if a.dtype.name not in ALLOWED_DTYPES:
            raise ValueError(f"array {name!r} has dtype {a.dtype}, which the wire does not carry")
    buf = io.BytesIO()
    meta_bytes = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(buf, **{META_KEY: meta_bytes}, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def decode_npz(body: bytes, max_bytes: Optional[int] = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) from an npz body; raises WireError for anything that is not one."""
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            members = zf.infolist()
            total = sum(m.file_size for m in members)
            if max_bytes is not None and total > max_bytes:
                raise WireError(
                    f"npz payload inflates to {total} bytes, more than the limit of {max_bytes}")
            if any(not m.filename.endswith(".npy") for m in members):
                raise WireError("npz payload holds members that are not .npy arrays")
    except zipfile.BadZipFile:
        raise WireError("payload is not an npz (zip) archive") from None
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:  # object arrays need pickle: refused
        raise WireError(f"npz payload refused: {exc}") from None
    except Exception as exc:
        raise WireError(f"npz payload could not be read: {type(exc).__name__}: {exc}") from None
    if META_KEY not in arrays:
        raise WireError(f"npz payload lacks its {META_KEY!r} JSON member")
    try:
        meta = json.loads(arrays.pop(META_KEY).tobytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"npz {META_KEY!r} member is not UTF-8 JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise WireError(f"npz {META_KEY!r} member must be a JSON object")
    for name, a in arrays.items():
        if a.dtype.name not in ALLOWED_DTYPES:
            raise WireError(f"array {name!r} has dtype {a.dtype}, which is not accepted")
    return meta, arrays


# -- requests -------------------------------------------------------------------------------
def encode_generate_request(req: GenerateRequest) -> bytes:
    meta = {f.name: getattr(req, f.name) for f in dataclasses.fields(req) if f.name != "reference"}
    arrays = {} if req.reference is None else {"reference": np.asarray(req.reference)}
    return encode_npz(meta, arrays)


def decode_generate_request(body: bytes, max_bytes: Optional[int] = None) -> GenerateRequest:
    meta, arrays = decode_npz(body, max_bytes)
    extra = sorted(set(arrays) - {"reference"})
    if extra:
        raise WireError(f"GenerateRequest: unexpected array(s) {', '.join(extra)}")
    req = from_json(GenerateRequest, meta)
    if "reference" in meta:
        raise WireError("GenerateRequest: send 'reference' as an npz array, not in the JSON")
    req.reference = arrays.get("reference")
    if req.rna is not None:  # never a file name: that would read the server's files
        req.rna = profile_from_request(req.rna)
    return req


#: The fields of an upload's frame (see `encode_region_upload`).
FRAME_KEYS = ("origin", "level_size", "dimensions")


def encode_region_upload(req: TranslateRequest, image: np.ndarray, mpp: float | Sequence[float],
                         frame: Optional[dict[str, Sequence[int]]] = None) -> bytes:
    """A translate request whose source is uploaded (H, W, 3) uint8 pixels.

    Without `frame` the image is a whole slide at `mpp` um/px (results placed in its own frame).
    With `frame` (`slides.ArraySlide.frame()`: `origin`, `level_size`, `dimensions`) it is a
    window of one pyramid level of the client's slide whose level-0 pixels are `mpp` (x, y) um;
    `req.box` / `req.polygon` are then level-0 coordinates of that slide, and the server reads
    the same tiles as a local run on the slide file.
    """
    meta = to_json(req)
    meta["upload_mpp"] = float(mpp) if np.isscalar(mpp) else [float(v) for v in mpp]
    if frame is not None:
        meta["upload_frame"] = {k: [int(v) for v in frame[k]] for k in FRAME_KEYS if k in frame}
    return encode_npz(meta, {"image": np.asarray(image)})


def decode_region_upload(body: bytes, max_bytes: Optional[int] = None
                         ) -> tuple[TranslateRequest, np.ndarray, Any, dict[str, tuple[int, int]]]:
    """(request, image, mpp (a number or (x, y)), frame) of an upload; the frame is empty for a
    whole-slide image and otherwise holds ArraySlide's `origin`, `level_size`, `dimensions`."""
    meta, arrays = decode_npz(body, max_bytes)
    if set(arrays) != {"image"}:
        raise WireError(f"translate upload: expected exactly one array 'image', got {sorted(arrays)}")
    image = arrays["image"]
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise WireError(f"translate upload: 'image' must be (H, W, 3) uint8 RGB, got "
                        f"{image.shape} {image.dtype}")
    mpp = meta.pop("upload_mpp", None)
    values = mpp if isinstance(mpp, list) and len(mpp) == 2 else [mpp]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        raise WireError(f"translate upload: 'upload_mpp' must be a positive number or two, got {mpp!r}")
    frame = meta.pop("upload_frame", {})
    if not isinstance(frame, dict) or set(frame) - set(FRAME_KEYS) or not all(
            isinstance(v, list) and len(v) == 2 and all(type(i) is int for i in v) for v in frame.values()):
        raise WireError(f"translate upload: 'upload_frame' must map {', '.join(FRAME_KEYS)} to "
                        f"[x, y] integer pairs, got {frame!r}")
    meta.setdefault("slide_path", "<upload>")
    return (translate_request_from_json(meta), image[..., :3],
            tuple(float(v) for v in mpp) if isinstance(mpp, list) else float(mpp),
            {k: tuple(v) for k, v in frame.items()})


def translate_request_from_json(data: Any) -> TranslateRequest:
    req = from_json(TranslateRequest, data)
    try:
        if req.box is not None:
            if len(req.box) != 4:
                raise ValueError
            req.box = tuple(int(v) for v in req.box)
    except (TypeError, ValueError):
        raise WireError(f"TranslateRequest: box must be [x, y, width, height], got {req.box!r}") from None
    try:
        if req.polygon is not None:
            req.polygon = [(float(x), float(y)) for x, y in req.polygon]
    except (TypeError, ValueError):
        raise WireError("TranslateRequest: polygon must be a list of [x, y] points") from None
    if not isinstance(req.stains, list) or not all(isinstance(s, str) for s in req.stains):
        raise WireError(f"TranslateRequest: stains must be a list of names, got {req.stains!r}")
    return req


# -- results --------------------------------------------------------------------------------
def encode_generate_result(res: GenerateResult) -> bytes:
    meta = {"missing_genes": res.missing_genes, "used_genes": res.used_genes, "seconds": res.seconds}
    return encode_npz(meta, {"images": np.asarray(res.images)})


def decode_generate_result(body: bytes) -> GenerateResult:
    meta, arrays = decode_npz(body)
    return GenerateResult(images=arrays["images"], **meta)


def encode_translate_result(res: TranslateResult) -> bytes:
    layers = []
    for layer in res.layers:
        entry = to_json(dataclasses.replace(layer, data=None))
        entry.pop("data")
        layers.append(entry)
    meta = {"layers": layers, "output_path": res.output_path, "n_tiles": res.n_tiles,
            "seconds": res.seconds}
    arrays = {f"layer{i}": np.asarray(l.data) for i, l in enumerate(res.layers)}
    return encode_npz(meta, arrays)


def decode_translate_result(body: bytes) -> TranslateResult:
    meta, arrays = decode_npz(body)
    layers = []
    for i, entry in enumerate(meta.pop("layers")):
        entry["scale_um"] = tuple(entry["scale_um"])
        entry["translate_um"] = tuple(entry["translate_um"])
        layers.append(StainLayer(data=arrays[f"layer{i}"], **entry))
    return TranslateResult(layers=layers, **meta)


__all__ = [
    "NPZ_MEDIA_TYPE", "WireError", "to_json", "from_json", "encode_npz", "decode_npz",
    "encode_generate_request", "decode_generate_request", "encode_region_upload",
    "decode_region_upload", "encode_generate_result", "decode_generate_result",
    "encode_translate_result", "decode_translate_result",
]
