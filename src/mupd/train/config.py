"""Training configuration: one YAML/JSON file, checked section by section before anything runs.

A typo in a key is the most common way to waste a GPU night, so unknown keys, wrong types and
out-of-range values stop loading with a message naming the file, section and key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..errors import MuPDError
from .augment import AugmentSection


class TrainConfigError(MuPDError):
    """A training config that cannot be used as written."""


TASKS = ("generate", "translate", "both")
CONDITIONS = ("text", "rna", "reference")


@dataclass
class ModelSection:
    """Start from a named config (fresh weights) or from a model folder (`base` wins)."""

    name: str = "tiny"
    base: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)  # config-name keyword overrides


@dataclass
class DataSection:
    store: str = ""  # PatchStore folder
    task: str = "generate"  # generate: H&E from text/RNA; translate: H&E source -> target stains;
    # both: every tile once as an H&E generation sample and once per marker target
    targets: list[str] = field(default_factory=lambda: ["H&E"])  # stains/markers to learn
    conditions: list[str] = field(default_factory=lambda: ["text", "rna"])
    patients: list[str] = field(default_factory=list)  # train on these only (empty: all allowed)
    exclude_patients: list[str] = field(default_factory=list)  # held out, never read (any store)
    # More patch stores of H&E tiles (e.g. `mupd data slide` of every usable slide), added as
    # generation samples: text-conditioned where the store has captions, else unconditional.
    # `patients` selects rows of `store` only; `exclude_patients` applies to these too.
    generate_stores: list[str] = field(default_factory=list)
    num_workers: int = 0
    # Stain / geometry augmentation, baked into the latent cache (mupd.train.augment)
    augment: AugmentSection = field(default_factory=AugmentSection)

    def check(self) -> None:
        if not self.store:
            raise TrainConfigError("data.store is required (a patch store folder)")
        if self.task not in TASKS:
            raise TrainConfigError(f"data.task {self.task!r} is not one of {', '.join(TASKS)}")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise TrainConfigError(f"data.conditions {bad} unknown; choose from {', '.join(CONDITIONS)}")
        if not self.targets:
            raise TrainConfigError("data.targets is empty: name at least one stain to learn")
        if self.store in self.generate_stores:
            raise TrainConfigError(f"data.generate_stores repeats data.store {self.store!r}")
        try:
            self.augment.check()
        except MuPDError as exc:
            raise TrainConfigError(str(exc)) from None
        both = set(self.patients) & set(self.exclude_patients)
        if both:
            raise TrainConfigError(f"patients {sorted(both)} are both included and excluded")


@dataclass
class OptimSection:
    max_steps: int = 1000
    batch_size: int = 8  # per process
    grad_accum_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999  # 0 disables EMA
    ema_warmup: bool = True  # decay ramps up (1 - (1+step)^-2/3), so short runs are not all base
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, none on CPU; or "no" / "bf16" / "fp16"
    compile: bool = False  # torch.compile the transformer (inductor), worth it on GPUs
    seed: int = 0

    def check(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise TrainConfigError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.ema_decay < 1:
            raise TrainConfigError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")
        if len(self.betas) != 2:
            raise TrainConfigError(f"optim.betas must be two numbers, got {self.betas}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise TrainConfigError("optim.warmup_steps and optim.max_grad_norm must be >= 0")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise TrainConfigError(f"optim.mixed_precision {self.mixed_precision!r}: use auto/no/bf16/fp16")


@dataclass
class CheckpointSection:
    every: int = 500  # optimizer steps between checkpoints
    keep: int = 3  # newest checkpoints kept on disk

    def check(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise TrainConfigError(f"checkpoint.every and checkpoint.keep must be >= 1 "
                                   f"(got {self.every}, {self.keep})")


@dataclass
class TrainConfig:
    output: str = ""  # run folder: checkpoints/, train_log.csv, model/ (the final model folder)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log_every: int = 10

    def check(self) -> None:
        if not self.output:
            raise TrainConfigError("output is required (the run folder)")
        self.data.check()
        self.optim.check()
        self.checkpoint.check()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check one value against a dataclass field's type hint (the few types configs use)."""
    origin = typing.get_origin(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise TrainConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint)
                       and not (hint is int and isinstance(value, bool))):
        return value
    raise TrainConfigError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{where} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise TrainConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                               f"known keys: {', '.join(known)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()})


def config_from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validated TrainConfig from plain data; `source` names the file in error messages."""
    config = _build(TrainConfig, raw, source)
    try:
        config.check()
    except TrainConfigError as exc:
        raise TrainConfigError(f"{source}: {exc}") from None
    return config


def load_config(path: Union[str, Path]) -> TrainConfig:
    """Read a YAML or JSON training config (JSON is valid YAML)."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"training config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"training config {path} is not valid YAML/JSON: {exc}") from None
    return config_from_dict(raw or {}, source=str(path))


def dump_config(config: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(config.to_dict(), indent=2))
