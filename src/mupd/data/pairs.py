"""Stain pairs for translation: paired folders and landmark-registered serial sections.

Paired folders follow the public H&E -> IHC sets: BCI (`HE/train/x.png` with `IHC/train/x.png`)
and MIST (`trainA/` H&E with `trainB/` IHC), or any two user-named folders: files pair by name
(stem, any image extension). Files without a partner and pairs whose sizes differ are reported,
never silently dropped or resized.

Serial sections are not pixel-aligned: the IHC section is registered onto the H&E one from
landmark files (`.csv` with an id column and X, Y, or `.pts`: "point", count, then "x y" rows,
as in the ANHIR/BIRL sets). An affine fit corrects rotation, scale and shear; a thin-plate
spline (TPS) also bends. The residual landmark distance is reported before and after, and as
leave-one-out (each landmark predicted by a fit without it): TPS interpolates its own landmarks,
so only the leave-one-out number says how well it registers points it was not fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from PIL import Image
from skimage import transform

from ..errors import DataError
from .crops import image_size
from .tissue import is_tissue

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
KINDS = {"affine": transform.AffineTransform, "similarity": transform.SimilarityTransform,
         "tps": transform.ThinPlateSplineTransform}


@dataclass
class PairReport:
    """Matched (source, target) files plus everything that could not be paired."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    unmatched_source: list[str] = field(default_factory=list)
    unmatched_target: list[str] = field(default_factory=list)
    size_mismatch: list[tuple[str, tuple[int, int], tuple[int, int]]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{len(self.pairs)} pairs"]
        if self.unmatched_source:
            lines.append(f"{len(self.unmatched_source)} source files without a target: "
                         f"{', '.join(self.unmatched_source[:10])}")
        if self.unmatched_target:
            lines.append(f"{len(self.unmatched_target)} target files without a source: "
                         f"{', '.join(self.unmatched_target[:10])}")
        for name, a, b in self.size_mismatch[:10]:
            lines.append(f"size mismatch {name}: source {a[0]}x{a[1]}, target {b[0]}x{b[1]} (skipped)")
        return "; ".join(lines)


def _images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"pair folder {folder} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in found:
                raise DataError(f"{folder} holds two images named {path.stem} "
                                f"({found[path.stem].name}, {path.name})")
            found[path.stem] = path
    return found


def match_pair_folders(source: Path, target: Path) -> PairReport:
    """Pair images of two folders by file stem; same-size pairs only (others reported)."""
    a, b = _images(Path(source)), _images(Path(target))
    report = PairReport(unmatched_source=sorted(set(a) - set(b)),
                        unmatched_target=sorted(set(b) - set(a)))
    for stem in sorted(set(a) & set(b)):
        sa, sb = image_size(a[stem]), image_size(b[stem])
        if sa != sb:
            report.size_mismatch.append((stem, sa, sb))
        else:
            report.pairs.append((a[stem], b[stem]))
    if not report.pairs:
        raise DataError(f"no usable image pairs between {source} and {target}: {report.summary()}")
    return report


def pair_folders(root: Path, source: str = "HE", target: str = "IHC",
                 split: Optional[str] = None) -> tuple[Path, Path]:
    """The two folders of a BCI-style (`root/HE[/split]`, `root/IHC[/split]`) or MIST-style
    (`root/trainA`, `root/trainB`, with split "train"/"val") pair set."""
    root = Path(root)
    if (root / source).is_dir() and (root / target).is_dir():
        a, b = root / source, root / target
        return (a / split, b / split) if split else (a, b)
    prefix = split or "train"
    if (root / f"{prefix}A").is_dir() and (root / f"{prefix}B").is_dir():
        return root / f"{prefix}A", root / f"{prefix}B"
    raise DataError(f"{root} has neither {source}/ and {target}/ folders (BCI) nor "
                    f"{prefix}A/ and {prefix}B/ (MIST)")


def read_landmarks(path: Path) -> pd.DataFrame:
    """Landmarks as a table with columns x, y, indexed by landmark id (1..N for `.pts`)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".pts":
            lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
            count = int(lines[1][0])
            xy = np.array(lines[2:2 + count], dtype=float)
            if xy.shape != (count, 2):
                raise ValueError(f"expected {count} 'x y' rows")
            return pd.DataFrame(xy, columns=["x", "y"], index=pd.RangeIndex(1, count + 1))
        table = pd.read_csv(path, index_col=0)
        table.columns = [c.lower() for c in table.columns]
        return table[["x", "y"]].astype(float)
    except (OSError, ValueError, IndexError, KeyError) as exc:
        raise DataError(f"cannot read landmarks from {path} (.csv with X, Y columns or .pts): "
                        f"{exc}") from None


@dataclass
class Registration:
    """`transform` maps fixed (H&E) coordinates to moving (IHC) ones, as `skimage.transform.warp`
    needs to resample the moving image into the fixed frame. Residuals are mean landmark
    distances in fixed-image pixels."""

    kind: str
    transform: transform.ProjectiveTransform
    n_landmarks: int
    residual_before: float
    residual_after: float
    residual_loo: float

    def warp(self, moving: np.ndarray, output_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The moving image resampled onto the fixed image's pixel grid (uint8, white outside),
        and the mask of fixed pixels the moving image covers."""
        out = transform.warp(moving, self.transform, output_shape=output_shape, order=1,
                             mode="constant", cval=1.0, preserve_range=False)
        inside = transform.warp(np.ones(moving.shape[:2]), self.transform, output_shape=output_shape,
                                order=0, mode="constant", cval=0.0) > 0.5
        return (out * 255).round().astype(np.uint8), inside


def _fit(kind: str, src: np.ndarray, dst: np.ndarray):
    tform = KINDS[kind].from_estimate(src, dst)
    if not tform:
        raise DataError(f"{kind} registration failed on {len(src)} landmarks: {tform}")
    return tform


def register_landmarks(fixed: pd.DataFrame, moving: pd.DataFrame, kind: str = "affine") -> Registration:
    """Fit the landmarks shared by id (a landmark missing on one side is left out)."""
    if kind not in KINDS:
        raise DataError(f"registration kind {kind!r} is not one of {sorted(KINDS)}")
    shared = fixed.index.intersection(moving.index)
    minimum = 3 if kind != "tps" else 4
    if len(shared) < minimum + 1:
        raise DataError(f"{kind} registration needs at least {minimum + 1} shared landmarks, "
                        f"got {len(shared)}")
    f = fixed.loc[shared, ["x", "y"]].to_numpy(float)
    m = moving.loc[shared, ["x", "y"]].to_numpy(float)
    to_fixed = _fit(kind, m, f)
    loo = []
    for i in range(len(f)):
        keep = np.arange(len(f)) != i
        loo.append(np.linalg.norm(_fit(kind, m[keep], f[keep])(m[i:i + 1]) - f[i]))
    return Registration(kind=kind, transform=_fit(kind, f, m), n_landmarks=len(shared),
                        residual_before=float(np.linalg.norm(m - f, axis=1).mean()),
                        residual_after=float(np.linalg.norm(to_fixed(m) - f, axis=1).mean()),
                        residual_loo=float(np.mean(loo)))


def pair_tiles(source: np.ndarray, target: np.ndarray, tile_size: int, scale: float = 1.0,
               covered: Optional[np.ndarray] = None,
               limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aligned tiles of a pixel-aligned pair: ((K, 2) x, y of each tile's corner in source px,
    H&E tiles, target tiles), both resampled by 1 / `scale` (tile px per image px), on a
    non-overlapping grid, keeping tiles whose H&E passes `is_tissue` and that `covered`
    (where the target has data, e.g. a registered section) covers entirely."""
    if source.shape[:2] != target.shape[:2]:
        raise DataError(f"pair images differ in size: {source.shape[:2]} vs {target.shape[:2]}")
    if not (np.isfinite(scale) and scale > 0):
        raise DataError(f"pair resampling scale must be positive, got {scale}")
    height, width = source.shape[:2]
    size = (max(round(width / scale), 1), max(round(height / scale), 1))
    a = np.asarray(Image.fromarray(source).resize(size, Image.BILINEAR))
    b = np.asarray(Image.fromarray(target).resize(size, Image.BILINEAR))
    c = None if covered is None else np.asarray(
        Image.fromarray(covered.astype(np.uint8)).resize(size, Image.NEAREST)).astype(bool)
    xy, he, other = [], [], []
    for y in range(0, size[1] - tile_size + 1, tile_size):
        for x in range(0, size[0] - tile_size + 1, tile_size):
            window = (slice(y, y + tile_size), slice(x, x + tile_size))
            if (c is not None and not c[window].all()) or not is_tissue(a[window]):
                continue
            xy.append((x * scale, y * scale))
            he.append(a[window])
            other.append(b[window])
            if limit is not None and len(he) >= limit:
                break
        if limit is not None and len(he) >= limit:
            break
    empty = np.zeros((0, tile_size, tile_size, 3), np.uint8)
    return (np.asarray(xy, dtype=float).reshape(-1, 2), np.stack(he) if he else empty,
            np.stack(other) if other else empty)


def write_pair_folder(he: np.ndarray, target: np.ndarray, stain: str, tile_size: int,
                      out: Path) -> int:
    """Cut two pixel-aligned images (the H&E and its target: RGB, or a grey uint8 marker map)
    on a non-overlapping grid into the fine-tuning "pairs" layout (`out/HE/*.png` +
    `out/<stain>/*.png`, same names); written whole or not at all. Returns the pair count."""
    from ..io.atomic import atomic_output

    if he.shape[:2] != target.shape[:2]:
        raise DataError(f"pair images differ in size: {he.shape[:2]} vs {target.shape[:2]}")
    rows, cols = he.shape[0] // tile_size, he.shape[1] // tile_size
    if rows < 1 or cols < 1:
        raise DataError(f"pair images of {he.shape[1]} x {he.shape[0]} px hold no {tile_size} px tile")
    with atomic_output(out) as tmp:
        (tmp / "HE").mkdir(parents=True)
        (tmp / stain).mkdir()
        for r in range(rows):
            for c in range(cols):
                name = f"tile_r{r:03d}_c{c:03d}.png"
                window = (slice(r * tile_size, (r + 1) * tile_size),
                          slice(c * tile_size, (c + 1) * tile_size))
                Image.fromarray(np.ascontiguousarray(he[window][..., :3], np.uint8)).save(tmp / "HE" / name)
                Image.fromarray(np.ascontiguousarray(target[window], np.uint8)).save(tmp / stain / name)
    return rows * cols
