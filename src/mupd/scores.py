"""Per-region read-outs of predicted markers, the way a pathologist reads an IHC slide.

Each cell of a region (segmented in the source H&E by `mupd.cells`, once, by the renderer in
`mupd.render`) has a level per marker: the mean predicted intensity over the cell, the same
number the `IHC-<marker>` rendering stains it with. From those levels, per region and marker:

- **mean predicted level**: the mean of the cells' levels;
- **predicted % positive**: 100 x the fraction of cells with level >= the marker's
  `positivity_threshold` (the catalogue's, `src/mupd/resources/stains.json`);
- **predicted H-score** (0-300): 1 x % weak (1+) + 2 x % moderate (2+) + 3 x % strong (3+),
  a positive cell being weak from the threshold, moderate from `intensity_bins[0]` and strong
  from `intensity_bins[1]` (the catalogue's, default 0.5 and 0.7). Every percentage is of all
  the region's cells, so % positive = % 1+ + % 2+ + % 3+.

All of it describes a prediction, and every name written out says so ("predicted"). Exports:
`write_scores_csv` (one row per region and marker) and `write_qupath_scores` (per marker, a
QuPath GeoJSON: each region an annotation with the scores as `measurements`, each cell a
detection classified Positive / Negative in QuPath's colours).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import ConditionError

#: QuPath's colours of its standard Positive and Negative classes (PathClassFactory).
POSITIVE_COLOR = (250, 62, 62)
NEGATIVE_COLOR = (112, 112, 225)
#: The intensity classes of the H-score, in QuPath's names; index = weight in the H-score.
INTENSITY_CLASSES = ("Negative", "1+", "2+", "3+")


@dataclass
class MarkerScore:
    """The read-out of one marker over one region's cells (percentages of all its cells; None
    when the region has no cell)."""

    marker: str
    n_cells: int
    mean_level: Optional[float]
    percent_positive: Optional[float]
    h_score: Optional[float]
    percent_weak: Optional[float]
    percent_moderate: Optional[float]
    percent_strong: Optional[float]
    threshold: float
    intensity_bins: tuple[float, float]  # (moderate from, strong from)


@dataclass
class CellReadout:
    """The cells of one region: centre, area, outline (level-0 px of the slide, QuPath's pixel-
    edge convention) and each marker's level (the cell's mean predicted intensity)."""

    centroids: np.ndarray  # (N, 2) float64 level-0 (x, y)
    areas_um2: np.ndarray  # (N,) float32
    outline_xy: np.ndarray  # (K, 2) float32 level-0 (x, y) of all outlines, one after another
    outline_offsets: np.ndarray  # (N + 1,) int64: cell i's ring is outline_xy[o[i]:o[i + 1]]
    levels: dict[str, np.ndarray] = field(default_factory=dict)  # marker -> (N,) float32

    def __len__(self) -> int:
        return len(self.centroids)

    def outline(self, i: int) -> np.ndarray:
        return self.outline_xy[self.outline_offsets[i] : self.outline_offsets[i + 1]]

    #: The arrays `arrays` gives, by name (levels as one (N, markers) array).
    ARRAYS = ("centroids", "areas_um2", "outline_xy", "outline_offsets", "levels")

    def arrays(self) -> tuple[list[str], dict[str, np.ndarray]]:
        """(marker names, plain arrays) for the wire's npz; `from_arrays` inverts it."""
        markers = list(self.levels)
        levels = (np.stack([self.levels[m] for m in markers], axis=1) if markers
                  else np.zeros((len(self), 0), np.float32))
        return markers, {"centroids": self.centroids, "areas_um2": self.areas_um2,
                         "outline_xy": self.outline_xy, "outline_offsets": self.outline_offsets,
                         "levels": levels.astype(np.float32)}

    @classmethod
    def from_arrays(cls, markers: Sequence[str], arrays: dict[str, np.ndarray]) -> "CellReadout":
        """The cells `arrays` describes, refused (ConditionError) unless they agree."""
        levels = np.asarray(arrays["levels"])
        if levels.ndim != 2 or levels.shape[1] != len(markers):
            raise ConditionError(f"cell levels {levels.shape} do not hold one column per marker "
                                 f"of {list(markers)}")
        cells = cls(arrays["centroids"], arrays["areas_um2"], arrays["outline_xy"],
                    arrays["outline_offsets"], {m: levels[:, k] for k, m in enumerate(markers)})
        cells.check()
        return cells

    @classmethod
    def empty(cls, markers: Sequence[str] = ()) -> "CellReadout":
        return cls(np.zeros((0, 2)), np.zeros(0, np.float32), np.zeros((0, 2), np.float32),
                   np.zeros(1, np.int64), {m: np.zeros(0, np.float32) for m in markers})

    @classmethod
    def concat(cls, parts: Sequence["CellReadout"]) -> "CellReadout":
        """The cells of several (disjoint) parts, in order."""
        if not parts:
            return cls.empty()
        starts = np.cumsum([0] + [len(p.outline_xy) for p in parts[:-1]])
        offsets = np.concatenate([parts[0].outline_offsets[:1]]
                                 + [p.outline_offsets[1:] + s for p, s in zip(parts, starts)])
        return cls(np.concatenate([p.centroids for p in parts]),
                   np.concatenate([p.areas_um2 for p in parts]),
                   np.concatenate([p.outline_xy for p in parts]), offsets.astype(np.int64),
                   {m: np.concatenate([p.levels[m] for p in parts]) for m in parts[0].levels})

    def placed(self, scale: float, origin: tuple[float, float]) -> "CellReadout":
        """The same cells with every coordinate mapped to origin + scale * (x, y)."""
        o = np.asarray(origin, dtype=np.float64)
        return CellReadout(self.centroids * scale + o, self.areas_um2,
                           (self.outline_xy * scale + o).astype(np.float32),
                           self.outline_offsets, dict(self.levels))

    def check(self) -> None:
        """Refuse arrays that do not describe the same cells (e.g. from a bad payload)."""
        n, o = len(self.centroids), self.outline_offsets
        ok = (self.centroids.ndim == 2 and self.centroids.shape[1:] == (2,)
              and self.outline_xy.ndim == 2 and self.outline_xy.shape[1:] == (2,)
              and self.areas_um2.shape == (n,) and o.shape == (n + 1,)
              and all(v.shape == (n,) for v in self.levels.values())
              and (n == 0 or (o[0] == 0 and o[-1] == len(self.outline_xy) and np.all(np.diff(o) >= 0))))
        if not ok:
            raise ConditionError(f"cell read-out arrays disagree: {n} centroids, areas "
                                 f"{self.areas_um2.shape}, offsets {o.shape}, outline vertices "
                                 f"{self.outline_xy.shape}, levels "
                                 f"{ {m: v.shape for m, v in self.levels.items()} }")


def intensity_class(levels: np.ndarray, threshold: float,
                    bins: tuple[float, float]) -> np.ndarray:
    """0 (negative), 1 (1+), 2 (2+) or 3 (3+) per level; a level on an edge takes the upper bin."""
    moderate, strong = bins
    if not threshold < moderate < strong:
        raise ConditionError(f"H-score bins need threshold < moderate < strong, got threshold "
                             f"{threshold:g} and bins {tuple(bins)}")
    return np.searchsorted(np.array([threshold, moderate, strong]), np.asarray(levels), side="right")


def score_marker(marker: str, levels: np.ndarray, threshold: float,
                 bins: tuple[float, float]) -> MarkerScore:
    """The read-out of one marker from its cells' levels (no cell: None for every score)."""
    levels = np.asarray(levels, dtype=np.float64)
    n = len(levels)
    counts = np.bincount(intensity_class(levels, threshold, bins), minlength=4)
    edges = (float(threshold), (float(bins[0]), float(bins[1])))
    if n == 0:
        return MarkerScore(marker, 0, None, None, None, None, None, None, *edges)
    pct = 100.0 * counts / n
    return MarkerScore(
        marker=marker, n_cells=int(n), mean_level=float(levels.mean()),
        percent_positive=float(pct[1:].sum()), h_score=float(pct[1] + 2 * pct[2] + 3 * pct[3]),
        percent_weak=float(pct[1]), percent_moderate=float(pct[2]), percent_strong=float(pct[3]),
        threshold=edges[0], intensity_bins=edges[1])


def score_cells(cells: CellReadout, targets: Sequence[Any]) -> list[MarkerScore]:
    """One MarkerScore per marker target, with the catalogue's threshold and bins."""
    from .models.catalogue import intensity_bins_of, threshold_of

    return [score_marker(t.name, cells.levels[t.name], threshold_of(t), intensity_bins_of(t))
            for t in targets if t.name in cells.levels]


# -- exports -----------------------------------------------------------------------------------
#: CSV columns: (header, MarkerScore attribute or None for the region name).
CSV_COLUMNS = (
    ("region", None), ("marker", "marker"), ("cells", "n_cells"),
    ("predicted mean level", "mean_level"), ("predicted positive %", "percent_positive"),
    ("predicted H-score", "h_score"), ("predicted 1+ (weak) %", "percent_weak"),
    ("predicted 2+ (moderate) %", "percent_moderate"), ("predicted 3+ (strong) %", "percent_strong"),
    ("positivity threshold", "threshold"), ("2+ from", None), ("3+ from", None),
)


def score_row(region: str, score: MarkerScore) -> list[Any]:
    """A CSV / table row of one region's score, in CSV_COLUMNS order."""
    row: list[Any] = [region]
    for _, attr in CSV_COLUMNS[1:-2]:
        row.append(getattr(score, attr))
    return row + list(score.intensity_bins)


@dataclass
class ScoredRegion:
    """One region's annotation (`mupd.io.Region`), scores and cells, for the exports."""

    region: Any  # mupd.io.Region
    scores: list[MarkerScore]
    cells: Optional[CellReadout] = None

    @property
    def name(self) -> str:
        return self.region.name or "region"


def write_scores_csv(path: str | Path, regions: Sequence[ScoredRegion],
                     overwrite: bool = False) -> Path:
    """One row per region and marker (CSV_COLUMNS); atomic, never replaces a file unless asked."""
    from .io.atomic import atomic_output

    final = Path(path)
    with atomic_output(final, overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([header for header, _ in CSV_COLUMNS])
            for item in regions:
                for score in item.scores:
                    writer.writerow([_csv_value(v) for v in score_row(item.name, score)])
    return final


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def annotation_measurements(score: MarkerScore) -> dict[str, float]:
    """QuPath measurements of a region for one marker (QuPath's names, prefixed 'Predicted')."""
    p = f"Predicted {score.marker}"
    values = {f"{p}: Num Detections": score.n_cells, f"{p}: Mean level": score.mean_level,
            f"{p}: Positive %": score.percent_positive, f"{p}: H-score": score.h_score,
            f"{p}: 1+ %": score.percent_weak, f"{p}: 2+ %": score.percent_moderate,
            f"{p}: 3+ %": score.percent_strong, f"{p}: Positivity threshold": score.threshold}
    return {k: v for k, v in values.items() if v is not None}


def cell_detections(cells: CellReadout, score: MarkerScore) -> list[Any]:
    """One QuPath detection per cell, classified Positive / Negative for `score.marker`, with
    its predicted level and intensity class (0-3) as measurements."""
    from .io.geojson import Region

    levels = cells.levels[score.marker]
    classes = intensity_class(levels, score.threshold, score.intensity_bins)
    out = []
    for i in range(len(cells)):
        positive = bool(classes[i] > 0)
        out.append(Region(
            [(round(float(x), 2), round(float(y), 2)) for x, y in cells.outline(i)],
            classification="Positive" if positive else "Negative",
            color=POSITIVE_COLOR if positive else NEGATIVE_COLOR, object_type="detection",
            measurements={f"Predicted {score.marker}: Level": float(levels[i]),
                          f"Predicted {score.marker}: Intensity class": int(classes[i]),
                          "Cell: Area µm^2": float(cells.areas_um2[i])}))
    return out


def write_qupath_scores(path: str | Path, regions: Sequence[ScoredRegion], marker: str,
                        overwrite: bool = False) -> Path:
    """A QuPath GeoJSON for `marker`: each region an annotation carrying its scores as
    measurements, followed by its cells as Positive / Negative detections."""
    import dataclasses

    from .io.geojson import write_geojson

    features = []
    for item in regions:
        score = next((s for s in item.scores if s.marker == marker), None)
        if score is None:
            raise ConditionError(f"region {item.name!r} has no predicted {marker} score to export")
        measurements = {**(item.region.measurements or {}), **annotation_measurements(score)}
        features.append(dataclasses.replace(item.region, measurements=measurements))
        if item.cells is not None:
            features.extend(cell_detections(item.cells, score))
    return write_geojson(path, features, overwrite=overwrite)


def write_score_files(folder: str | Path, regions: Sequence[ScoredRegion],
                      overwrite: bool = False) -> list[Path]:
    """`scores.csv` and one `scores-<marker>.geojson` per marker into an existing `folder`."""
    from .regions.outputs import layer_file_stem

    folder = Path(folder)
    markers = list(dict.fromkeys(s.marker for item in regions for s in item.scores))
    if not markers:
        return []
    written = [write_scores_csv(folder / "scores.csv", regions, overwrite)]
    for marker in markers:
        written.append(write_qupath_scores(folder / f"scores-{layer_file_stem(marker)}.geojson",
                                           regions, marker, overwrite))
    return written
