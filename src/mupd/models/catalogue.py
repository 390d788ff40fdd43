"""The target stains and markers a model can produce.

A stain's position in the catalogue is its token id in the transformer's stain embedding, so
the catalogue travels with the weights (`catalogue.json` in the model folder) and names are
only ever appended (fine-tuning registers new stains; existing ids never move).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import ConditionError, ModelError
from ..paths import STAIN_CATALOGUE

KINDS = ("rgb", "marker")


@dataclass(frozen=True)
class StainTarget:
    """One target: kind "rgb" is a brightfield image, kind "marker" one intensity map in [0, 1]."""

    name: str
    kind: str
    aliases: tuple[str, ...] = ()
    gene: Optional[str] = None
    colormap: Optional[str] = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
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
                 description: str = "") -> StainTarget:
        """Append a new target (its id is the next free one); a clash with a known name is refused."""
        if kind not in KINDS:
            raise ConditionError(f"stain {name!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
        for label in (name, *aliases):
            if self._find(label) is not None:
                raise ConditionError(f"stain name {label!r} is already taken by "
                                     f"{self.get(label).name!r}")
        target = StainTarget(name=name, kind=kind, aliases=tuple(aliases), gene=gene,
                             colormap=colormap, description=description)
        self.targets.append(target)
        return target
