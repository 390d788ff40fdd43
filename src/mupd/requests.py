"""The request fields' limits and the fine-tune request: plain data the engine and `train` share.

`mupd.train` builds and runs a FinetuneRequest and `mupd.engine` serves one, so it lives here,
below both, and `train` never imports `engine`. A `bounded` field carries its range, which the
wire and the CLI check once at the boundary (`engine.wire.check_value`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

#: Most sampling steps one request may ask for (`mupd serve`, `mupd stain/generate --steps`):
#: work and memory grow with steps, so an unbounded count lets one request take the host.
MAX_STEPS = 1000
#: Seeds are 0..2**63-1: torch's generator takes no more (a larger one was a 500, not a 4xx).
MAX_SEED = 2**63 - 1
#: Micrometres per pixel a request may state for a slide or an upload.
MPP_RANGE = (1e-4, 1e4)


def bounded(default: Any, low: float, high: float) -> Any:
    """A dataclass field whose number the wire and the CLI refuse outside low..high (see
    `wire.check_value`): the range lives with the field, checked once at the boundary."""
    return field(default=default, metadata={"range": (low, high)})


@dataclass
class FinetuneRequest:
    data_dir: str
    output_dir: str
    base_model: Optional[str] = None  # None: the engine's current model
    method: str = "lora"  # "lora" or "full"
    steps: int = bounded(200, 1, 10**7)
    learning_rate: float = 1e-4
    batch_size: int = bounded(4, 1, 4096)
    seed: int = bounded(0, 0, MAX_SEED)
