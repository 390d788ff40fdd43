"""The target stains and markers a model can produce.

A stain's position in the catalogue is its token id in the transformer's stain embedding, so
the catalogue travels with the weights (`catalogue.json` in the model folder) and names are
only ever appended (fine-tuning registers new stains; existing ids never move).

A marker may say where in a cell its stain sits (`compartment`: nuclear, membranous,
cytoplasmic, or diffuse when unknown) and from which predicted intensity a cell counts as
positive (`positivity_threshold`), and where its weak / moderate / strong bins of the H-score
start (`intensity_bins`: the moderate and strong edges; weak starts at the threshold). All are
optional, so catalogues written before them load unchanged, and `compartment_of` /
`threshold_of` / `intensity_bins_of` give the defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import ConditionError, ModelError
from ..paths import STAIN_CATALOGUE

KINDS = ("rgb", "marker")
#: Where a marker's stain sits in a cell; "diffuse": not known, the map is rendered as predicted.
COMPARTMENTS = ("nuclear", "membranous", "cytoplasmic", "diffuse")
DEFAULT_COMPARTMENT = "diffuse"
#: Predicted intensity (marker map units, [0, 1]) from which a cell counts as positive.
DEFAULT_POSITIVITY_THRESHOLD = 0.3
#: Predicted intensity from which a positive cell is moderate (2+) and strong (3+); below the
#: first edge and at or above the threshold it is weak (1+). Used by the H-score (mupd.scores).
DEFAULT_INTENSITY_BINS = (0.5, 0.7)


@dataclass(frozen=True)
class StainTarget:
    """One target: kind "rgb" is a brightfield image, kind "marker" one intensity map in [0, 1]."""

    name: str
    kind: str
    aliases: tuple[str, ...] = ()
    gene: Optional[str] = None
    colormap: Optional[str] = None
    description: str = ""
    compartment: Optional[str] = None  # one of COMPARTMENTS; None: not given (DEFAULT_COMPARTMENT)
    positivity_threshold: Optional[float] = None  # None: not given (DEFAULT_POSITIVITY_THRESHOLD)
    intensity_bins: Optional[tuple[float, float]] = None  # None: not given (DEFAULT_INTENSITY_BINS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        if self.intensity_bins is not None:
            d["intensity_bins"] = list(self.intensity_bins)
        return {k: v for k, v in d.items() if v is not None}


@dataclass
class StainCatalogue:
    targets: list[StainTarget] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path = STAIN_CATALOGUE) -> "StainCatalogue":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read stain catalogue {path}: {exc}") from None
        entries = raw["targets"] if isinstance(raw, dict) else raw
        catalogue = cls()
        for entry in entries:
            catalogue.register(**{k: v for k, v in entry.items() if k != "index"})
        return catalogue

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"targets": self.to_list()}, indent=1) + "\n")

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(t.to_dict(), index=i) for i, t in enumerate(self.targets)]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self) -> Iterator[StainTarget]:
        return iter(self.targets)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def _find(self, name: str) -> Optional[int]:
        key = name.strip().lower()
        for i, t in enumerate(self.targets):
            if key == t.name.lower() or key in (a.lower() for a in t.aliases):
                return i
        return None

    def index(self, name: str) -> int:
        """Token id of `name` (a name or alias, any case)."""
        i = self._find(str(name))
        if i is None:
            raise ConditionError(f"unknown stain {name!r}; this model knows: {', '.join(self.names)}")
        return i

    def get(self, name: str) -> StainTarget:
        return self.targets[self.index(name)]

    def register(self, name: str, kind: str, aliases: tuple[str, ...] | list[str] = (),
                 gene: Optional[str] = None, colormap: Optional[str] = None,
                 description: str = "", compartment: Optional[str] = None,
                 positivity_threshold: Optional[float] = None,
                 intensity_bins: Optional[Any] = None) -> StainTarget:
        """Append a new target (its id is the next free one); a clash with a known name is refused."""
        if kind not in KINDS:
            raise ConditionError(f"stain {name!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if compartment is not None and compartment not in COMPARTMENTS:
            raise ConditionError(f"stain {name!r}: compartment {compartment!r} is not one of "
                                 f"{', '.join(COMPARTMENTS)}")
        if positivity_threshold is not None:
            try:
                positivity_threshold = float(positivity_threshold)
            except (TypeError, ValueError):
                positivity_threshold = float("nan")
            if not 0.0 <= positivity_threshold <= 1.0:
                raise ConditionError(f"stain {name!r}: positivity_threshold must be a number in "
                                     f"[0, 1] (marker intensity), got {positivity_threshold}")
        if intensity_bins is not None:
            intensity_bins = check_intensity_bins(
                intensity_bins, DEFAULT_POSITIVITY_THRESHOLD if positivity_threshold is None
                else positivity_threshold, f"stain {name!r}")
        for label in (name, *aliases):
            if self._find(label) is not None:
                raise ConditionError(f"stain name {label!r} is already taken by "
                                     f"{self.get(label).name!r}")
        target = StainTarget(name=name, kind=kind, aliases=tuple(aliases), gene=gene,
                             colormap=colormap, description=description, compartment=compartment,
                             positivity_threshold=positivity_threshold,
                             intensity_bins=intensity_bins)
        self.targets.append(target)
        return target


def compartment_of(target: Any) -> str:
    """A target's compartment: its own, else the bundled catalogue's for the same name (a model
    folder's catalogue may predate the field), else DEFAULT_COMPARTMENT."""
    return _attribute(target, "compartment") or DEFAULT_COMPARTMENT


def threshold_of(target: Any) -> float:
    """A target's positivity threshold, with the same fallbacks as `compartment_of`."""
    value = _attribute(target, "positivity_threshold")
    return DEFAULT_POSITIVITY_THRESHOLD if value is None else float(value)


def intensity_bins_of(target: Any) -> tuple[float, float]:
    """A target's (moderate, strong) H-score bin edges, with the same fallbacks as `compartment_of`."""
    value = _attribute(target, "intensity_bins")
    return DEFAULT_INTENSITY_BINS if value is None else (float(value[0]), float(value[1]))


def check_intensity_bins(bins: Any, threshold: float, where: str) -> tuple[float, float]:
    """(moderate, strong) edges as floats, refused unless threshold < moderate < strong <= 1."""
    try:
        moderate, strong = (float(v) for v in bins)
    except (TypeError, ValueError):
        moderate = strong = float("nan")
    if not threshold < moderate < strong <= 1.0:
        raise ConditionError(f"{where}: intensity_bins must be two increasing marker intensities "
                             f"[moderate, strong] above the positivity threshold {threshold:g} and "
                             f"at most 1, got {bins!r}")
    return moderate, strong


def _attribute(target: Any, field_name: str) -> Any:
    value = getattr(target, field_name, None)
    if value is None:
        name = getattr(target, "name", target)
        bundled = _bundled()
        if isinstance(name, str) and name in bundled:
            value = getattr(bundled.get(name), field_name, None)
    return value


_BUNDLED: Optional[StainCatalogue] = None


def _bundled() -> StainCatalogue:
    global _BUNDLED
    if _BUNDLED is None:
        _BUNDLED = StainCatalogue.load()
    return _BUNDLED
