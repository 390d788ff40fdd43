"""Captions per tile: read from a user's CSV/JSONL, or derived from HER2ST metadata.

Derived captions are not written by a pathologist. They state what is known about a HER2ST
spot: organ (breast), disease (HER2-positive carcinoma, the cohort's inclusion criterion),
stain (H&E), the spot's HER2 level (ERBB2) and immune level (mean of the immune markers CD45,
CD3, CD8, CD68 = PTPRC, CD3E, CD8A, CD68: single immune genes are 0 in most spots, their mean
is not) as training-spot tertiles of normalised expression (low / intermediate / high), and the pathologist's region label where the
section has a labels file (A1 B1 C1 D1 E1 F1 G2 H1 J1). Tertile cuts come from training
patients only and are stored with the data so held-out stores use the same words.

With `extra_markers` > 0 (`mupd data her2st --caption-markers N`) a caption also names N other
catalogue markers with their tertile ("ER-low, Ki67-high, CD8-intermediate"), drawn per spot
from a generator seeded by the spot id (the same words for the same spot in every build), so
that prompts such as "Ki67-high" have training words. Off by default: the bundled model's
captions name HER2 and the immune level only, and a warm start on captions naming three more
markers was worse on text and markers (docs/training.md, 2026-12-06).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import DataError

#: How derived captions are described in a store's attributes (they are not a pathologist's).
DERIVED_CAPTIONS = ("derived from HER2ST metadata: cohort (breast, HER2-positive), stain, "
                    "training-tertile HER2 and immune expression levels, region label")
#: Image-to-image (`MuPDPipeline.translate(..., strength=)`) prompt when none is given: the
#: caption of the FFPE training slides (resources/configs/slide-captions.csv): frozen -> FFPE.
RESTAIN_PROMPT = "H&E, FFPE section"
#: Immune markers averaged into the immune score of a spot.
IMMUNE_MARKERS = ("CD45", "CD3", "CD8", "CD68")
_IMMUNE = {"low": "immune-poor", "intermediate": "moderate immune infiltrate", "high": "immune-rich"}


def read_captions(path: Path) -> dict[str, str]:
    """key -> caption from a CSV (columns `file` or `key`, and `caption` or `text`) or a JSONL
    file (one object per line with the same fields)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            table = pd.DataFrame([json.loads(line) for line in path.read_text().splitlines()
                                  if line.strip()])
        else:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read captions from {path}: {exc}") from None
    key = next((c for c in ("file", "key") if c in table.columns), None)
    text = next((c for c in ("caption", "text") if c in table.columns), None)
    if key is None or text is None:
        raise DataError(f"captions file {path} needs a 'file' (or 'key') and a 'caption' (or "
                        f"'text') column; it has {list(table.columns)}")
    duplicated = table[key][table[key].duplicated()].tolist()
    if duplicated:
        raise DataError(f"captions file {path} lists {duplicated[:5]} more than once")
    empty = table[key][table[text].astype(str).str.strip() == ""].tolist()
    if empty:
        raise DataError(f"captions file {path} has empty captions for {empty[:5]}")
    return dict(zip(table[key].astype(str), table[text].astype(str)))


def caption_scores(levels: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per spot: every marker's level (`names`), and `immune` (mean of the measured immune
    markers)."""
    levels, names = np.asarray(levels, dtype=float), list(names)
    immune = levels[:, [names.index(m) for m in IMMUNE_MARKERS]]
    counted = np.isfinite(immune).sum(axis=1)
    mean = np.divide(np.nansum(immune, axis=1), counted, out=np.full(len(levels), np.nan),
                     where=counted > 0)
    return {**{m: levels[:, i] for i, m in enumerate(names)}, "immune": mean}


def fit_caption_cuts(levels: np.ndarray, names: Sequence[str]) -> dict[str, list[float]]:
    """Tertile cuts (33.3 and 66.7th percentiles) of the caption scores over training spots.
    HER2 and the immune score must be measured; another marker no training spot measured gets
    no cut and is never named."""
    cuts = {}
    for score, column in caption_scores(levels, names).items():
        column = column[np.isfinite(column)]
        if column.size == 0:
            if score in ("HER2", "immune"):
                raise DataError(f"no training spot measured the {score} genes; cannot fit caption cuts")
            continue
        cuts[score] = [float(q) for q in np.percentile(column, [100 / 3, 200 / 3])]
    return cuts


def level_word(value: float, cuts: Sequence[float]) -> Optional[str]:
    if not np.isfinite(value):
        return None
    return "low" if value <= cuts[0] else ("high" if value > cuts[1] else "intermediate")


def her2st_caption(her2: Optional[str], immune: Optional[str], label: Optional[str] = None,
                   others: Sequence[tuple[str, str]] = ()) -> str:
    """e.g. "H&E, breast, HER2-positive carcinoma, HER2-high, immune-rich, ER-low, Ki67-high,
    region: invasive cancer" (`others`: (marker, level word) pairs)."""
    parts = ["H&E", "breast", "HER2-positive carcinoma"]
    if her2:
        parts.append(f"HER2-{her2}")
    if immune:
        parts.append(_IMMUNE[immune])
    parts += [f"{marker}-{level}" for marker, level in others]
    if isinstance(label, str) and label and label != "undetermined":
        parts.append(f"region: {label}")
    return ", ".join(parts)


def her2st_captions(levels: np.ndarray, names: Sequence[str], cuts: dict[str, Sequence[float]],
                    spots: Sequence[str], labels: Optional[Sequence[Optional[str]]] = None,
                    extra_markers: int = 0) -> list[str]:
    """One derived caption per spot from its marker levels (spots, M), its id (which
    `extra_markers` other markers it names) and optional region label. Only markers with a cut
    are named (a reference fitted before 2026-12-06 has cuts for HER2 and immune only)."""
    scores = caption_scores(levels, names)
    her2 = [level_word(v, cuts["HER2"]) for v in scores["HER2"]]
    immune = [level_word(v, cuts["immune"]) for v in scores["immune"]]
    labels = list(labels) if labels is not None else [None] * len(her2)
    others = [m for m in names if m != "HER2" and m in cuts]
    captions = []
    for i, (h, im, lab) in enumerate(zip(her2, immune, labels)):
        measured = [m for m in others if np.isfinite(scores[m][i])]
        rng = np.random.default_rng(zlib.crc32(str(spots[i]).encode()))
        picked = sorted(rng.choice(len(measured), size=min(extra_markers, len(measured)),
                                   replace=False)) if measured and extra_markers > 0 else []
        named = [measured[j] for j in picked]
        captions.append(her2st_caption(h, im, lab, [(m, level_word(scores[m][i], cuts[m]))
                                                     for m in named]))
    return captions
