"""RNA profiles -> values aligned to the model's gene panel (the input of the RNA stream).

The panel is a list of gene symbols saved with the model (`rna_panel.json`). Symbols are matched
case-insensitively (mouse `Erbb2` = human `ERBB2`); genes of the panel that a profile lacks are
masked and reported, never silently zero-filled. Raw counts are normalised as CPM + log1p over
all genes of the profile (the library size is the profile's total, not the panel's). The
transformer turns the aligned values into gene-set tokens: consecutive groups of `group_size`
panel genes, one token each; a group with no measured gene is left out of attention.
"""

from __future__ import annotations

import json
import numbers
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConditionError, ModelError
from ..paths import RESOURCES

DEFAULT_PANEL = RESOURCES / "rna_panels" / "markers-housekeeping.json"


class MissingGenesWarning(UserWarning):
    """Some panel genes are absent from a profile (they are masked)."""


def _list(names: Sequence[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_profile(pairs: Iterable[tuple[Any, Any]], source: str = "RNA profile") -> dict[str, float]:
    """gene -> value: the one check every profile passes, whatever it came from.

    Each value must be a finite number (NaN / inf would reach the model as garbage) and each gene
    appear once, symbols compared as `align` matches them (any case): a dict or table would
    otherwise keep one of `ERBB2` / `Erbb2` silently."""
    genes: list[str] = []
    values: list[float] = []
    for gene, value in pairs:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ConditionError(f"{source}: expression of gene {gene} is not a number: {value!r}")
        genes.append(str(gene))
        values.append(float(value))
    keys = Counter(g.strip().upper() for g in genes)
    twice = list(dict.fromkeys(g for g in genes if keys[g.strip().upper()] > 1))
    if twice:
        raise ConditionError(f"{source} lists gene(s) more than once (symbols match in any case): "
                             f"{_list(twice)}")
    bad = [g for g, v in zip(genes, values) if not np.isfinite(v)]
    if bad:
        raise ConditionError(f"{source} has NaN/infinite expression for gene(s) {_list(bad)}")
    return dict(zip(genes, values))


def profile_from_request(rna: Any) -> dict[str, float]:
    """The `rna` field of a request from elsewhere (a server's client): only gene -> number.

    Never `read_profile`, which takes a string as a file to open: on a server that reads files
    outside every allowed folder and echoes their first line in its error."""
    if not isinstance(rna, Mapping):
        raise ConditionError(f"rna must be a JSON object mapping gene symbol -> number, not a "
                             f"{type(rna).__name__}; send the profile's values, not a file name")
    return check_profile(rna.items(), "rna")


def _read_h5ad(path: Path) -> list[tuple[str, float]]:
    """One spot as is; several spots summed into one pseudo-bulk profile (raw counts add up)."""
    import anndata

    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:  # any reader failure is a bad file to the user
        raise ConditionError(f"cannot read RNA profile {path}: {exc}") from None
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ConditionError(f"RNA profile {path} holds no spots or no genes "
                             f"({adata.n_obs} x {adata.n_vars})")
    x = adata.X.sum(axis=0) if adata.n_obs > 1 else adata.X
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=float).ravel()
    return list(zip(map(str, adata.var_names), x.tolist()))


def _read_table(path: Path) -> list[tuple[str, float]]:
    import pandas as pd

    if not path.is_file():
        raise ConditionError(f"RNA profile file {path} does not exist")
    if path.suffix.lower() == ".h5ad":
        return _read_h5ad(path)
    try:
        table = pd.read_csv(path, sep=None, engine="python")
    except Exception as exc:  # any parser failure is a bad file to the user
        raise ConditionError(f"cannot read RNA profile {path}: {exc}") from None
    if table.shape[1] != 2:
        raise ConditionError(f"RNA profile {path} must have two columns (gene, value); "
                             f"found {list(table.columns)}")
    values = pd.to_numeric(table.iloc[:, 1], errors="coerce")
    return list(zip(table.iloc[:, 0].astype(str), values.astype(float).tolist()))


def read_profile(profile: Any) -> dict[str, float]:
    """A gene -> value dict from a dict, a CSV/TSV or .h5ad path, a pandas Series, or a one-row AnnData.

    A str is a local file path (the CLI, the plugin); a server takes `profile_from_request`."""
    if isinstance(profile, (str, Path)):
        return check_profile(_read_table(Path(profile)), f"RNA profile {profile}")
    if isinstance(profile, Mapping):
        return check_profile(profile.items())
    if hasattr(profile, "var_names") and hasattr(profile, "X"):  # AnnData (row view)
        if profile.n_obs != 1:
            raise ConditionError(f"an AnnData RNA profile must be one row (spot); got {profile.n_obs}")
        x = profile.X.toarray() if hasattr(profile.X, "toarray") else np.asarray(profile.X)
        return check_profile(zip(map(str, profile.var_names), np.asarray(x, dtype=float).ravel().tolist()))
    if hasattr(profile, "index") and hasattr(profile, "to_numpy") and getattr(profile, "ndim", 0) == 1:
        return check_profile(zip(map(str, profile.index), profile.to_numpy(dtype=float).tolist()))
    raise ConditionError(f"cannot read an RNA profile from a {type(profile).__name__}; give a dict "
                         f"gene -> value, a CSV/TSV (gene, value) file or a one-row AnnData")


class RNATokenizer:
    """Aligns RNA profiles to a fixed gene panel."""

    def __init__(self, genes: Sequence[str], name: str = "custom", group_size: int = 8) -> None:
        genes = [str(g) for g in genes]
        if not genes:
            raise ModelError(f"gene panel {name!r} is empty")
        keys = [g.upper() for g in genes]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ModelError(f"gene panel {name!r} lists genes twice: {', '.join(dupes[:10])}")
        self.genes, self.name, self.group_size = genes, name, int(group_size)
        self._position = {k: i for i, k in enumerate(keys)}

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_groups(self) -> int:
        return -(-self.n_genes // self.group_size)

    # -- panels on disk -------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, group_size: int = 8) -> "RNATokenizer":
        """A panel from `rna_panel.json`, a .npy of symbols (e.g. the HER2ST 785), or a .txt list."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"gene panel file {path} does not exist")
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
            return cls(raw["genes"], name=raw.get("name", path.stem),
                       group_size=raw.get("group_size", group_size))
        if path.suffix == ".npy":
            genes = np.load(path, allow_pickle=False).astype(str).tolist()
        else:
            genes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return cls(genes, name=path.stem, group_size=group_size)

    @classmethod
    def default(cls, group_size: int = 8) -> "RNATokenizer":
        return cls.from_file(DEFAULT_PANEL, group_size=group_size)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"name": self.name, "group_size": self.group_size,
                                          "genes": self.genes}, indent=0) + "\n")

    # -- alignment ------------------------------------------------------------------------
    def align(self, profile: Any, normalized: bool = False, warn: bool = True
              ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """(values float32 (G,), mask bool (G,), used genes, missing genes) for one profile."""
        raw = read_profile(profile)
        values = np.array(list(raw.values()), dtype=np.float64)
        negative = [g for g, v in zip(raw, values) if v < 0]
        if negative:
            raise ConditionError(f"RNA profile has negative expression for gene(s) "
                                 f"{', '.join(negative[:10])}" + ("" if normalized else
                                 " (raw counts cannot be negative)"))
        if normalized:
            huge = [g for g, v in zip(raw, values) if v > np.finfo(np.float32).max]
            if huge:  # they would reach the model as inf
                raise ConditionError(f"RNA profile has normalised expression beyond float32 for "
                                     f"gene(s) {_list(huge)}")
        else:
            with np.errstate(over="ignore"):
                total = values.sum()
            if not np.isfinite(total):  # every CPM would be 0: a profile of silent zeros
                raise ConditionError("RNA profile of raw counts sums to more than the largest float "
                                     "(values near 1e308 are not counts)")
            if total <= 0:
                raise ConditionError("RNA profile of raw counts sums to zero: nothing was measured")
            values = np.log1p(values / total * 1e6)
        out = np.zeros(self.n_genes, dtype=np.float32)
        mask = np.zeros(self.n_genes, dtype=bool)
        for gene, v in zip(raw, values):
            i = self._position.get(gene.strip().upper())
            if i is not None:
                out[i], mask[i] = v, True
        if not mask.any():
            raise ConditionError(
                f"none of the {len(raw)} genes of the RNA profile (e.g. {', '.join(list(raw)[:5])}) "
                f"is in the model's gene panel {self.name!r}, which expects e.g. "
                f"{', '.join(self.genes[:8])}")
        used = [g for g, m in zip(self.genes, mask) if m]
        missing = [g for g, m in zip(self.genes, mask) if not m]
        if missing and warn:
            warnings.warn(f"{len(missing)} of {self.n_genes} genes of panel {self.name!r} are not in "
                          f"the RNA profile and are masked: {', '.join(missing[:10])}"
                          + (" ..." if len(missing) > 10 else ""), MissingGenesWarning, stacklevel=2)
        return out, mask, used, missing
