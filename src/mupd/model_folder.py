"""The MuPD model folder: what `MuPDPipeline.save_pretrained` writes and `from_pretrained` reads.

Layout (diffusers-like): model_index.json (class, format, the pipeline config), transformer/
(diffusers ModelMixin, safetensors), scheduler/, codec/, catalogue.json, rna_panel.json; the
text encoder by reference. Loading is where untrusted files enter (a server loads folders a
client names), so it refuses pickles and any reference outside the folder and its roots, and
turns every broken file into a ModelError naming it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .errors import ModelError, MuPDError, OutputExistsError
from .io.atomic import atomic_output
from .models.catalogue import StainCatalogue
from .models.codec import load_codec, save_codec
from .models.rna import RNATokenizer
from .models.text import DEFAULT as TEXT_DEFAULT
from .models.text import TextEncoder
from .models.transformer import MuPDTransformer
from .schedulers import load_scheduler

INDEX_FILE = "model_index.json"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth", ".pkl")
#: Keys of model_index.json / codec.json whose string values are files or folders of the model.
REFERENCE_KEYS = ("codec", "catalogue", "rna_panel", "text_encoder", "folder", "path")


def _refuse_pickles(folder: Path) -> None:
    pickles = [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles and not any(folder.rglob("*.safetensors")):
        raise ModelError(f"{folder} holds pickle checkpoints ({', '.join(p.name for p in pickles[:3])}) "
                         f"and no safetensors; pickle weights are refused (they can run code): "
                         f"convert them to safetensors")


@contextmanager
def _loading(path: Path) -> Iterator[None]:
    """Whatever a broken model file raises (bad JSON, a missing key, truncated safetensors,
    shapes unlike the config) as a ModelError naming that file, for the CLI and the server."""
    try:
        yield
    except MuPDError:
        raise
    except Exception as exc:  # diffusers, safetensors and json raise many kinds
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ModelError(f"cannot load {path}: {reason}") from None


def _references(node: Any, key: str = "") -> Iterator[str]:
    """The file references in a model_index.json / codec.json tree: strings under a key that
    names a file or folder ("default", the bundled text encoder, is a name, not a path)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _references(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _references(v, key)
    elif isinstance(node, str) and key in REFERENCE_KEYS and node != TEXT_DEFAULT:
        yield node


def _check_references(folder: Path, index: dict[str, Any], roots: Sequence[Path]) -> Optional[Path]:
    """Refuse a model folder that reaches outside itself and `roots` (a symlink, the codec's VAE,
    a path in model_index.json); returns the text encoder folder (None: the default one)."""
    allowed = [p.resolve() for p in (folder, *roots)]

    def inside(path: Path) -> Path:
        for p in (path, *path.rglob("*")) if path.is_dir() else (path,):
            if not any(p.resolve().is_relative_to(root) for root in allowed):
                raise ModelError(f"model folder {folder} refers to {p}, which lies outside it"
                                 f"{' and the model roots' if roots else ''} (at {p.resolve()}); "
                                 f"copy it into the model folder")
        return path

    inside(folder)
    for ref in _references(index):
        inside(folder / Path(ref).expanduser())
    with _loading(folder / "codec" / "codec.json"):
        codec_spec = json.loads((folder / "codec" / "codec.json").read_text())
    for ref in _references(codec_spec):
        inside(folder / "codec" / ref)
    reference = index.get("text_encoder", TEXT_DEFAULT)
    return None if reference == TEXT_DEFAULT else folder / Path(str(reference)).expanduser()


def save_model_folder(pipeline: Any, folder: str | Path, overwrite: bool = False) -> Path:
    """Write the whole model folder (safetensors weights; the text encoder by reference).

    Written into a sibling temporary folder, fsync'd, then swapped in: a kill mid-write
    leaves the previous model whole; other entries of `folder` (checkpoints) are kept."""
    from .io.atomic import atomic_output

    folder = Path(folder)
    if (folder / INDEX_FILE).exists() and not overwrite:
        raise OutputExistsError(f"{folder} already holds a model; pass overwrite=True to replace it")
    with atomic_output(folder, overwrite=True, fsync=True, keep_others=True) as tmp:
        tmp.mkdir()
        pipeline.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        pipeline.scheduler.save_pretrained(tmp / "scheduler")
        save_codec(pipeline.codec, tmp / "codec")
        pipeline.catalogue.save(tmp / "catalogue.json")
        pipeline.rna_tokenizer.save(tmp / "rna_panel.json")
        config = dict(pipeline.config, rna_panel="rna_panel.json", catalogue="catalogue.json",
                      codec={"folder": "codec"}, text_encoder=pipeline.text_encoder.reference)
        index = {"_class_name": type(pipeline).__name__, "format": FORMAT_VERSION,
                 "transformer": ["mupd.models.transformer", "MuPDTransformer"],
                 "scheduler": ["mupd.schedulers", type(pipeline.scheduler).__name__], "codec": "codec",
                 "text_encoder": pipeline.text_encoder.reference, "catalogue": "catalogue.json",
                 "rna_panel": "rna_panel.json", "config": config}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return folder


def load_model_folder(cls: type, folder: str | Path, roots: Sequence[str | Path] = ()) -> Any:
    """Load a model folder as a `cls` (MuPDPipeline). Every file it refers to (text encoder, codec, files named in
    model_index.json, symlinks) must lie inside it or inside one of `roots` (a server's
    model roots) and hold safetensors weights; a broken file is a ModelError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    _refuse_pickles(folder)
    needed = [INDEX_FILE, "transformer/config.json",
              "transformer/diffusion_pytorch_model.safetensors", "codec/codec.json",
              "catalogue.json", "rna_panel.json"]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise ModelError(f"{folder} is not a complete MuPD model folder: missing {', '.join(missing)}")
    with _loading(folder / INDEX_FILE):
        index = json.loads((folder / INDEX_FILE).read_text())
        if index.get("_class_name") != cls.__name__:
            raise ModelError(f"{folder / INDEX_FILE} describes a {index.get('_class_name')!r}, "
                             f"not a {cls.__name__}")
        config, reference = dict(index["config"]), str(index["text_encoder"])
        encoder = _check_references(folder, index, [Path(r) for r in roots])
    with _loading(folder / "transformer"):
        transformer = MuPDTransformer.from_pretrained(folder / "transformer", use_safetensors=True,
                                                      local_files_only=True)
    with _loading(folder / "rna_panel.json"):
        tokenizer = RNATokenizer.from_file(folder / "rna_panel.json")
    with _loading(folder / "codec"):
        codec = load_codec(folder / "codec")
    scheduler = None  # a folder saved before schedulers were saved: the config's Euler
    if (folder / "scheduler").is_dir():
        with _loading(folder / "scheduler"):
            scheduler = load_scheduler(folder / "scheduler")
    with _loading(folder / INDEX_FILE):  # a config key missing or of the wrong kind
        text_encoder = TextEncoder(reference, int(config.get("text_max_length", 64)), folder=encoder)
        pipeline = cls(transformer.eval(), codec, StainCatalogue.load(folder / "catalogue.json"),
                       tokenizer, text_encoder, config, scheduler)
        if not pipeline.mpp > 0:  # read lazily later: a missing or bad mpp fails here
            raise ModelError(f"{folder / INDEX_FILE}: config mpp {pipeline.mpp} must be positive")
    return pipeline
