"""Codec latents of the training tiles, encoded once per (data, codec) and cached in the run folder.

With a VAE codec, every training step would otherwise run the VAE encoder on every tile of the
batch. The cache encodes each distinct image once, before training, and the loop then reads
latents instead of pixels. What is cached is the posterior mode (the mean latents, scaled and
shifted), exactly what `VAECodec.encode` gives: deterministic, the same latents the pipeline
would compute on the fly, so caching changes speed, not the objective.

Layout of `<run>/latents/<key>/`:
    cache.json    what the key was made of (data path and fingerprint, codec fingerprint,
                  image count) and the latent shape
    latents.f32   (N, C, h, w) float32, C order, raw (read with a memory map, never unpickled)
    index.npy     (views x n_samples, 2) int64: each sample's target and source row (-1: no
                  source); row v * n_samples + i is view v of sample i (mupd.train.augment)
The key hashes the data's files (relative path, size and mtime of every file of every store or
folder the samples come from), the selection (config data section, tile size, sample count)
every weight of the codec (`codec_fingerprint`) and the marker codec, if any: a changed store,
selection, VAE or marker codec gives a new key, and the run's other caches are removed when a
new one is built. An image shared by several samples (the H&E tile that is the generation
target and the translation source of the same record) is encoded once: images are identified
by (sample name, stain), so sample names must be unique per image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..io.atomic import atomic_output
from ..models.codec import AreaCodec, Codec, codec_fingerprint, encode_targets
from ..progress import ProgressCallback, ProgressEvent, no_progress
from .augment import AugmentSection, view_of
from .batches import Sample, image_to_tensor

CACHE_FILE = "cache.json"
LATENTS_FILE = "latents.f32"
INDEX_FILE = "index.npy"


def data_fingerprint(path: Path) -> str:
    """Hash of (relative path, size, mtime) of every file under `path` (a store or a folder):
    appending to a store or rewriting a tile changes it, reading does not."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(path) if f != path else f.name}\0{stat.st_size}\0"
                      f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _image_keys(sample: Sample) -> tuple[str, Optional[str]]:
    if not sample.name:
        raise DataError("a training sample has no name; the latent cache identifies images by "
                        "sample name (fix the data source that made it)")
    return f"{sample.name}|{sample.stain}", (f"{sample.name}|H&E" if sample.source is not None
                                             else None)


class LatentSamples(Sequence[Sample]):
    """The samples of `samples` with their cached latents in place of the pixels."""

    def __init__(self, samples: Sequence[Sample], folder: Path) -> None:
        self.samples, self.folder = samples, Path(folder)
        info = json.loads((self.folder / CACHE_FILE).read_text())
        self.shape = (int(info["images"]), *info["latent_shape"])
        self.augment = AugmentSection(**info["augment"]) if info.get("augment") else None
        self.index = np.load(self.folder / INDEX_FILE, allow_pickle=False)
        views = self.augment.views if self.augment else 1
        if len(self.index) != views * len(samples):
            raise DataError(f"latent cache {self.folder} indexes {len(self.index)} samples, the "
                            f"data has {len(samples)} x {views} views")
        self._latents: Optional[np.memmap] = None  # opened on first read (in each worker)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        if self._latents is None:
            self._latents = np.memmap(self.folder / LATENTS_FILE, dtype=np.float32, mode="r",
                                      shape=self.shape)
        target_row, source_row = (int(r) for r in self.index[i])
        latents = {"target": np.array(self._latents[target_row])}
        if source_row >= 0:
            latents["source"] = np.array(self._latents[source_row])
        view, sample = divmod(i, len(self.samples))
        sample = self.samples[sample]
        valid = sample.target_valid
        if valid is not None and view:  # the mask turns with its target
            valid = view_of(self.augment, sample.name, view).geometry(valid)
        return dataclasses.replace(sample, target=None, source=None, latents=latents,
                                   target_valid=valid)

    def __getstate__(self) -> dict[str, Any]:  # data-loader workers reopen the memory map
        return {**self.__dict__, "_latents": None}


def _encode_all(samples: Sequence[Sample], codec: Codec, markers: Optional[AreaCodec], tmp: Path,
                device: Any, batch_size: int, progress: ProgressCallback,
                augment: Optional[AugmentSection] = None) -> tuple[int, list[int]]:
    """Encode every distinct image of every view of `samples` into tmp/LATENTS_FILE and
    tmp/INDEX_FILE (marker maps, the 2-D targets, through `markers` when given)."""
    rows: dict[str, int] = {}
    views = augment.views if augment else 1
    n = len(samples)
    index = np.full((views * n, 2), -1, dtype=np.int64)
    pending: list[torch.Tensor] = []
    is_marker: list[bool] = []
    shape: list[int] = []

    with open(tmp / LATENTS_FILE, "wb") as out:
        def flush() -> None:
            if not pending:
                return
            images = torch.stack(pending).to(device)
            z = encode_targets(codec, markers, images, is_marker).float().cpu().numpy()
            if not shape:
                shape.extend(z.shape[1:])
            out.write(np.ascontiguousarray(z, dtype=np.float32).tobytes())
            pending.clear()
            is_marker.clear()

        for j in range(views * n):
            view, i = divmod(j, n)
            sample = samples[i]
            transform = view_of(augment, sample.name, view)
            for slot, (key, image) in enumerate(zip(_image_keys(sample),
                                                    (sample.target, sample.source))):
                if key is None:
                    continue
                key = f"{key}|{view}"
                if key not in rows:
                    rows[key] = len(rows)
                    pending.append(image_to_tensor(transform.apply(image) if view else image))
                    is_marker.append(image.ndim == 2)
                    if len(pending) == batch_size:
                        flush()
                index[j, slot] = rows[key]
            if (j + 1) % 64 == 0 or j + 1 == views * n:
                progress(ProgressEvent("latents", j + 1, views * n,
                                       message=f"encoding training tiles once ({len(rows)} images, "
                                       f"{views} view{'s' * (views > 1)})"))
        flush()
        out.flush()
        os.fsync(out.fileno())
    np.save(tmp / INDEX_FILE, index, allow_pickle=False)
    return len(rows), shape


def build_latent_cache(samples: Sequence[Sample], codec: Codec, root: Path,
                       data_paths: Sequence[Path], selection: dict[str, Any], device: Any = "cpu",
                       batch_size: int = 32,
                       progress: Optional[ProgressCallback] = None,
                       markers: Optional[AreaCodec] = None,
                       augment: Optional[AugmentSection] = None) -> Path:
    """The cache folder for (samples, codec, data): reused when it exists, else built once.
    `markers`: the model's marker codec (None: `codec` codes the marker maps too); `augment`:
    with views > 1, that many versions of every sample (mupd.train.augment).

    `selection`: what picks `samples` out of the data (e.g. the config's data section and tile
    size), part of the key. Built in a hidden temporary folder and renamed into place, so a
    killed build leaves no half cache; other caches under `root` (older data or VAE) are
    removed."""
    progress = progress or no_progress
    root = Path(root)
    identity = {"data": [str(Path(p).resolve()) for p in data_paths],
                "data_fingerprint": [data_fingerprint(Path(p)) for p in data_paths],
                "selection": selection, "samples": len(samples), "codec": codec_fingerprint(codec)}
    if markers is not None:
        identity["markers"] = markers.config()
    augment = augment if augment is not None and augment.views > 1 else None
    if augment is not None:
        identity["augment"] = dataclasses.asdict(augment)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    folder = root / key
    if (folder / CACHE_FILE).is_file():
        progress(ProgressEvent("latents", len(samples), len(samples),
                               message=f"latent cache {folder} reused"))
        return folder
    with atomic_output(folder, overwrite=True) as tmp:  # a concurrent build of the key: same data
        tmp.mkdir()
        images, shape = _encode_all(samples, codec, markers, tmp, device, batch_size, progress, augment)
        (tmp / CACHE_FILE).write_text(json.dumps({**identity, "images": images,
                                                  "latent_shape": shape}, indent=1))
    for old in root.iterdir():  # not the hidden temporaries: other builds' (live) or the next one's
        if old != folder and old.is_dir() and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return folder
