"""How engine requests and results travel over HTTP: JSON, and npz for arrays; never pickle.

An npz body is an uncompressed zip of `.npy` members plus one `__meta__` member holding UTF-8
JSON (as a uint8 array). It is read with `allow_pickle=False`, and the members' declared sizes
are checked before anything is inflated, so a crafted archive cannot expand past the limit.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import types
import typing
import zipfile
from collections import Counter
from typing import Any, Optional, Sequence, TypeVar, Union

import numpy as np

from ..errors import MuPDError
from ..models.rna import profile_from_request
from ..regions.outputs import StainLayer
from ..regions.plan import Placement
from ..scores import CellReadout, MarkerScore
from ..requests import MPP_RANGE
from .api import (
    GenerateRequest,
    GenerateResult,
    TranslateRequest,
    TranslateResult,
)

NPZ_MEDIA_TYPE = "application/x-npz"
META_KEY = "__meta__"
#: dtypes accepted from the wire (object / void dtypes would need pickle or are meaningless here).
ALLOWED_DTYPES = {"uint8", "uint16", "float32", "float64", "int32", "int64", "bool"}

T = TypeVar("T")


class WireError(MuPDError):
    """A payload that is not a valid MuPD message (bad JSON, bad npz, wrong fields or arrays)."""


# -- the schema: every request field checked by type and range, once, at the boundary ---------
#: Any whole number on the wire fits int64 (numpy and torch take no more; 2**70 was a 500).
INT64 = (-(2**63), 2**63 - 1)
_KINDS = {bool: "true/false", str: "a string", list: "an array", tuple: "an array", dict: "an object",
          type(None): "null", int: "a number", float: "a number"}


def _expected(hint: Any, limits: Optional[tuple[float, float]] = None) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    span = " " + "..".join(str(v) if isinstance(v, int) else f"{v:g}" for v in limits) if limits else ""
    if hint is int:
        return f"a whole number{span or f' {INT64[0]}..{INT64[1]}'}"
    if hint is float:
        return f"a finite number{span}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a, limits) for a in args if a is not type(None))
    return {bool: "true or false", str: "a string", list: "an array", tuple: "an array",
            dict: "an object"}.get(origin or hint, getattr(hint, "__name__", str(hint)))


def check_value(value: Any, hint: Any, name: str, limits: Optional[tuple[float, float]] = None) -> Any:
    """`value` if it is what `hint` says (JSON kinds: bool, int, float, str, Optional/Union, list,
    tuple, dict), else a WireError naming `name`. Strings must be valid Unicode without NUL
    (paths, tokenizers), numbers finite and within `limits` (whole numbers at least int64).
    `limits` apply to every number inside `value`; tuples come back as tuples (JSON has arrays)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    number = type(value) in (int, float)

    def refuse() -> WireError:
        union = origin in (typing.Union, types.UnionType)
        if number and (hint in (int, float) or (union and {int, float} & set(args))):
            return WireError(f"{name}={value!r}: must be {_expected(hint, limits)}")
        return WireError(f"{name} must be {_expected(hint, limits)}, got "
                         f"{_KINDS.get(type(value), type(value).__name__)}")

    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:  # Optional[X]: X's own, precise refusal
            return check_value(value, options[0], name, limits)
        for option in options:
            try:
                return check_value(value, option, name, limits)
            except WireError:
                pass
        raise refuse()
    if hint is bool or hint is str:
        if type(value) is not hint:
            raise refuse()
        if hint is str and "\0" in value:
            raise WireError(f"{name} must not contain a NUL character")
        if hint is str and not _is_unicode(value):
            raise WireError(f"{name} is not valid UTF-8 text (it holds an unpaired surrogate)")
        return value
    if hint is int or hint is float:
        low, high = limits or (INT64 if hint is int else (-math.inf, math.inf))
        if not number or (hint is int and type(value) is float) or not math.isfinite(value) \
                or not low <= value <= high:
            raise refuse()
        return value
    if origin is list:
        if type(value) is not list:
            raise refuse()
        return [check_value(v, args[0], f"{name}[{i}]", limits) for i, v in enumerate(value)]
    if origin is tuple:
        if type(value) not in (list, tuple):
            raise refuse()
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(value) != len(items):
            raise WireError(f"{name} must be an array of {len(items)}, got {len(value)} item(s)")
        return tuple(check_value(v, t, f"{name}[{i}]", limits) for i, (v, t) in enumerate(zip(value, items)))
    if origin is dict:
        if type(value) is not dict:
            raise refuse()
        return {check_value(k, args[0], f"{name} key"): check_value(v, args[1], f"{name}[{k!r}]", limits)
                for k, v in value.items()}
    if type(value) is not hint:
        raise WireError(f"{name} must be {_expected(hint)}, got {type(value).__name__}")
    return value


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _schema(cls: type) -> dict[str, tuple[Any, Optional[tuple[float, float]]]]:
    """field -> (type hint, range) of a request dataclass (the range from `requests.bounded`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("range")) for f in dataclasses.fields(cls)}


def check_field(cls: type, name: str, value: Any) -> Any:
    """One field of `cls` checked as the wire checks it (the CLI's arguments use this)."""
    hint, limits = _schema(cls)[name]
    return check_value(value, hint, name, limits)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json.loads would keep the last one silently,
    e.g. one of two values for a gene)."""
    twice = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
    if twice:
        raise WireError(f"a JSON object gives key(s) {', '.join(map(ascii, twice))} more than once")
    return dict(pairs)


def parse_json(body: bytes | str, what: str = "request body") -> Any:
    """JSON, refusing what json.loads would take silently (a key given twice) or crash on
    (nesting deeper than Python's stack: RecursionError)."""
    try:
        return json.loads(body, object_pairs_hook=_unique_keys)
    except ValueError as exc:  # also UnicodeDecodeError, and an integer of over 4300 digits
        raise WireError(f"{what} is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise WireError(f"{what} nests JSON arrays/objects too deeply") from None


# -- plain dataclasses <-> JSON ---------------------------------------------------------------
def to_json(obj: Any) -> dict[str, Any]:
    """A dataclass without array fields as a JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def from_json(cls: type[T], data: Any, what: Optional[str] = None) -> T:
    """Build `cls` from a dict, naming unknown, missing or ill-typed fields (see check_value)."""
    what = what or cls.__name__
    if not isinstance(data, dict):
        raise WireError(f"{what}: expected a JSON object, got {_KINDS.get(type(data), type(data).__name__)}")
    schema = _schema(cls)
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise WireError(f"{what}: unknown field(s) {', '.join(map(ascii, unknown))}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise WireError(f"{what}: missing field(s) {', '.join(missing)}")
    try:
        return cls(**{k: check_value(v, schema[k][0], k, schema[k][1]) for k, v in data.items()})
    except WireError as exc:
        raise WireError(f"{what}: {exc}") from None


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
    meta = parse_json(arrays.pop(META_KEY).tobytes(), f"npz {META_KEY!r} member")
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
    if "reference" in meta:
        raise WireError("GenerateRequest: send 'reference' as an npz array, not in the JSON")
    req = from_json(GenerateRequest, meta)
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
    With `frame` (`regions.source.ArraySlide.frame()`: `origin`, `level_size`, `dimensions`) it is a
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
    mpp = check_value(meta.pop("upload_mpp", None), Union[float, tuple[float, float]],
                      "translate upload: upload_mpp", MPP_RANGE)
    frame = check_value(meta.pop("upload_frame", {}), dict[str, tuple[int, int]],
                        "translate upload: upload_frame", (0, 2**31 - 1))
    if set(frame) - set(FRAME_KEYS):
        raise WireError(f"translate upload: upload_frame keys are {', '.join(FRAME_KEYS)}; got "
                        f"{', '.join(map(ascii, sorted(set(frame) - set(FRAME_KEYS))))}")
    meta.setdefault("slide_path", "<upload>")
    return (translate_request_from_json(meta), image[..., :3],
            tuple(map(float, mpp)) if isinstance(mpp, tuple) else float(mpp), frame)


def translate_request_from_json(data: Any) -> TranslateRequest:
    """The request, its `ihc_look` checked here too: refused at the door, before the slide."""
    from ..render import IhcLook

    request = from_json(TranslateRequest, data)
    if request.ihc_look is not None:
        IhcLook.from_dict(request.ihc_look, "ihc_look")
    return request


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
            "seconds": res.seconds, "scores": [to_json(s) for s in res.scores]}
    arrays = {f"layer{i}": np.asarray(l.data) for i, l in enumerate(res.layers)}
    if res.cells is not None:
        meta["cell_markers"], cells = res.cells.arrays()
        arrays.update({f"cells_{k}": v for k, v in cells.items()})
    return encode_npz(meta, arrays)


def decode_translate_result(body: bytes) -> TranslateResult:
    meta, arrays = decode_npz(body)
    layers = []
    for i, entry in enumerate(meta.pop("layers")):
        entry["placement"] = from_json(Placement, entry["placement"], f"layers[{i}].placement")
        layers.append(StainLayer(data=arrays[f"layer{i}"], **entry))
    scores = [from_json(MarkerScore, s, f"scores[{k}]") for k, s in enumerate(meta.pop("scores", []))]
    cells = None
    markers = meta.pop("cell_markers", None)
    if markers is not None:
        try:
            cells = CellReadout.from_arrays(check_value(markers, list[str], "cell_markers"),
                                            {k: arrays[f"cells_{k}"] for k in CellReadout.ARRAYS})
        except KeyError as exc:
            raise WireError(f"translate result: cell array {exc} is missing") from None
        except MuPDError as exc:
            raise WireError(f"translate result: {exc}") from None
    return TranslateResult(layers=layers, scores=scores, cells=cells, **meta)


__all__ = [
    "NPZ_MEDIA_TYPE", "WireError", "to_json", "from_json", "encode_npz", "decode_npz",
    "encode_generate_request", "decode_generate_request", "encode_region_upload",
    "decode_region_upload", "encode_generate_result", "decode_generate_result",
    "encode_translate_result", "decode_translate_result",
]
