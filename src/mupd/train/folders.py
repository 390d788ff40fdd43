"""A user's folder of training data, checked in full before any training starts.

Three layouts are accepted (the first that matches wins):
- pairs:    `HE/` plus one folder per target stain (`<STAIN>/`) holding the same file names;
            pixel-aligned pairs, RGB (brightfield) or single-channel (a marker map);
- captions: images plus `captions.csv` with columns `file,caption`;
- spots:    one `.h5ad` with `obsm['spatial']` (pixel x, y in the image) and one image file.
Images larger than the model's tile are cut into non-overlapping tiles; every problem found
(unreadable file, missing partner, size mismatch, too small, no known gene, too few samples) is
collected and reported at once, as a DataError, so a user fixes their folder in one pass.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..errors import DataError
from .batches import Sample

MIN_SAMPLES = 4
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
HE_FOLDERS = ("HE", "H&E", "he", "H_E")


@dataclass
class FolderData:
    kind: str  # "pairs" | "captions" | "spots"
    samples: list[Sample]
    stains: dict[str, str] = field(default_factory=dict)  # target stain -> "rgb" | "marker"
    summary: str = ""


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 for colour files; (H, W) float in [0, 1] for single-channel ones."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # whole-section JPEGs are legitimately huge
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB") if im.mode in ("P", "RGBA", "CMYK", "YCbCr")
                                   else im)
    except Exception as exc:  # any decoder failure is a bad file to the user
        raise DataError(f"cannot read image {path}: {exc}") from None
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3]
        if rgb.dtype != np.uint8:
            rgb = (rgb / max(float(rgb.max()), 1.0) * 255).round().astype(np.uint8)
        return rgb
    if array.ndim == 2:
        scale = float(np.iinfo(array.dtype).max) if array.dtype.kind in "ui" else max(float(array.max()), 1.0)
        return array.astype(np.float32) / scale
    raise DataError(f"image {path} has shape {array.shape}: expected RGB or one channel")


def tile_grid(shape: tuple[int, ...], tile: int) -> Iterator[tuple[int, int]]:
    for y in range(0, shape[0] - tile + 1, tile):
        for x in range(0, shape[1] - tile + 1, tile):
            yield y, x


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _pairs(folder: Path, he_dir: Path, tile: int, problems: list[str]) -> FolderData:
    he = _images(he_dir)
    if not he:
        problems.append(f"{he_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    stain_dirs = [d for d in sorted(folder.iterdir()) if d.is_dir() and d != he_dir
                  and not d.name.startswith(".")]
    if not stain_dirs:
        problems.append(f"{folder} has {he_dir.name}/ but no target stain folder beside it "
                        f"(e.g. {folder}/HER2/ with the same file names)")
    samples: list[Sample] = []
    stains: dict[str, str] = {}
    for stain_dir in stain_dirs:
        stain, targets = stain_dir.name, _images(stain_dir)
        for stem in sorted(set(targets) - set(he)):
            problems.append(f"{targets[stem]} has no H&E partner in {he_dir}")
        kinds = set()
        for stem in sorted(set(targets) & set(he)):
            try:
                source, target = read_image(he[stem]), read_image(targets[stem])
            except DataError as exc:
                problems.append(str(exc))
                continue
            if source.ndim != 3:
                problems.append(f"{he[stem]} is single-channel; H&E must be RGB")
                continue
            if source.shape[:2] != target.shape[:2]:
                problems.append(f"pair sizes differ: {he[stem]} is {source.shape[1]}x{source.shape[0]}"
                                f", {targets[stem]} is {target.shape[1]}x{target.shape[0]}")
                continue
            if min(source.shape[:2]) < tile:
                problems.append(f"{he[stem]} is {source.shape[1]}x{source.shape[0]}, smaller than "
                                f"the model's {tile}x{tile} tile")
                continue
            kinds.add("marker" if target.ndim == 2 else "rgb")
            for y, x in tile_grid(source.shape, tile):
                samples.append(Sample(target=target[y:y + tile, x:x + tile], stain=stain,
                                      source=source[y:y + tile, x:x + tile],
                                      name=f"{stain}/{stem}@{x},{y}"))
        if len(kinds) > 1:
            problems.append(f"{stain_dir} mixes RGB and single-channel images; use one kind per stain")
        if kinds:
            stains[stain] = kinds.pop()
    return FolderData("pairs", samples, stains,
                      f"{len(samples)} tiles from pairs H&E -> {', '.join(stains) or 'nothing'}")


def _captions(folder: Path, table: Path, tile: int, problems: list[str]) -> FolderData:
    with open(table, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        if "file" not in columns or "caption" not in columns:
            raise DataError(f"{table} needs columns 'file' and 'caption' (found {columns})")
        rows = list(reader)
    samples: list[Sample] = []
    for row in rows:
        path, caption = folder / row["file"], (row["caption"] or "").strip()
        if not caption:
            problems.append(f"{table}: empty caption for {row['file']}")
            continue
        if not path.is_file():
            problems.append(f"{table} names {row['file']}, which is not in {folder}")
            continue
        try:
            image = read_image(path)
        except DataError as exc:
            problems.append(str(exc))
            continue
        if image.ndim != 3 or min(image.shape[:2]) < tile:
            problems.append(f"{path} is {image.shape[1]}x{image.shape[0]}"
                            f"{'' if image.ndim == 3 else ' single-channel'}; need RGB of at "
                            f"least {tile}x{tile}")
            continue
        for y, x in tile_grid(image.shape, tile):
            samples.append(Sample(target=image[y:y + tile, x:x + tile], stain="H&E", text=caption,
                                  name=f"{row['file']}@{x},{y}"))
    return FolderData("captions", samples, {}, f"{len(samples)} captioned H&E tiles")


def _spots(folder: Path, h5ad: Path, tile: int, rna_tokenizer: Any,
           problems: list[str]) -> FolderData:
    from ..data.spatial import read_spatial_h5ad, spot_tiles

    images = list(_images(folder).values())
    if len(images) != 1:
        raise DataError(f"{folder} must hold exactly one image beside {h5ad.name} "
                        f"(found {len(images)}: {', '.join(p.name for p in images)})")
    image = read_image(images[0])
    if image.ndim != 3:
        raise DataError(f"{images[0]} is single-channel; the spot image must be RGB H&E")
    # The folder gives no pixel size: tiles are cut at the image's own pixels (mpp 1 = 1 px).
    table = read_spatial_h5ad(h5ad, images[0], mpp=1.0)
    genes = [str(g) for g in table.var_names]
    x = table.X.toarray()
    normalized = bool(table.uns["mupd"]["normalized"])
    if rna_tokenizer is None:
        raise DataError("the model has no RNA tokenizer; spot data cannot be used")
    _, _, used, _ = rna_tokenizer.align(dict(zip(genes, x.sum(0).tolist())), normalized=True)
    if not used:
        raise DataError(f"none of the {len(genes)} genes in {h5ad} (e.g. {', '.join(genes[:5])}) "
                        f"is in the model's gene panel")
    h, w = image.shape[:2]
    corner = np.round(table.obs[["x_px", "y_px"]].to_numpy(float)) - tile // 2
    inside = np.flatnonzero((corner >= 0).all(axis=1) & (corner[:, 0] + tile <= w)
                            & (corner[:, 1] + tile <= h))
    tiles = spot_tiles(table, tile, 1.0, list(table.obs_names[inside]))
    samples = [Sample(target=t, stain="H&E", rna=dict(zip(genes, x[i].tolist())),
                      rna_normalized=normalized, name=f"{h5ad.name}:{table.obs_names[i]}")
               for i, t in zip(inside, tiles)]
    outside = table.n_obs - len(inside)
    summary = (f"{len(samples)} spot tiles with RNA ({len(used)} panel genes found"
               + (f"; {outside} spots too close to the image edge skipped)" if outside else ")"))
    return FolderData("spots", samples, {}, summary)


def load_folder(folder: str | Path, tile_size: int, rna_tokenizer: Optional[Any] = None,
                min_samples: int = MIN_SAMPLES) -> FolderData:
    """Read and check a fine-tuning folder; raises DataError listing every problem found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    problems: list[str] = []
    he_dir = next((folder / n for n in HE_FOLDERS if (folder / n).is_dir()), None)
    h5ads = sorted(folder.glob("*.h5ad"))
    if he_dir is not None:
        data = _pairs(folder, he_dir, tile_size, problems)
    elif (folder / "captions.csv").is_file():
        data = _captions(folder, folder / "captions.csv", tile_size, problems)
    elif len(h5ads) == 1:
        data = _spots(folder, h5ads[0], tile_size, rna_tokenizer, problems)
    else:
        raise DataError(f"{folder} is not a training folder: expected HE/ + <STAIN>/ folders "
                        f"(pairs), images + captions.csv, or one .h5ad + its image (spots)")
    if not problems and len(data.samples) < min_samples:
        problems.append(f"only {len(data.samples)} training tiles of {tile_size}x{tile_size} "
                        f"found; at least {min_samples} are needed")
    if problems:
        listed = "\n  - ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{folder}: {len(problems)} problem(s) in the training data:\n"
                        f"  - {listed}{more}")
    return data
