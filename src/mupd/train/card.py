"""MODEL_CARD.md for a trained or fine-tuned model folder, from one template.

Training fills in what it knows (data, split, command, config, hardware, time, losses);
the metrics section is left for `mupd eval` to fill.
"""

from __future__ import annotations

import json
import os
import platform
import string
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

TEMPLATE = string.Template("""# $name

MuPD model ($how), written by `mupd` on $date.

## Data
$data

- split / patients: $split
- samples: $n_samples training tiles of ${tile_size}x${tile_size} px at $mpp um/px
- targets: $targets

## Training
- command: `$command`
- base: $base
- steps: $steps (batch $global_batch = $batch_size x $processes process(es) x $accum accumulation)
- final weights: $weights
- wall time: $wall
- hardware: $hardware
- loss: first logged $first_loss, final $final_loss (training loss of the flow-matching objective;
  not a quality metric)

<details><summary>config</summary>

```json
$config
```
</details>

## Metrics
To be filled by `mupd eval` on held-out patients. Until then this model is unevaluated.

## Intended use and limits
Research use only; virtual stains are not a diagnosis. A stain learned from a small folder
reflects that folder's lab, scanner and tissue.
""")


def hardware_summary(device: str, num_processes: int) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        return f"{num_processes} x {gpu} (torch {torch.__version__})"
    return (f"{num_processes} process(es) on CPU, {os.cpu_count()} cores, {platform.processor() or platform.machine()} "
            f"(torch {torch.__version__})")


def write_model_card(folder: Path, *, how: str, data: str, split: str, command: str, base: str,
                     config: dict[str, Any], result: Any, optim: Any, n_samples: int,
                     tile_size: int, mpp: float, targets: list[str], weights: str) -> Path:
    """`result` is a TrainResult, `optim` the OptimSection the run used."""
    minutes, seconds = divmod(int(result.wall_seconds), 60)
    text = TEMPLATE.substitute(
        name=folder.name, how=how, date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        data=data, split=split, n_samples=n_samples, tile_size=tile_size, mpp=mpp,
        targets=", ".join(targets), command=command, base=base, steps=result.steps,
        global_batch=optim.batch_size * result.num_processes * optim.grad_accum_steps,
        batch_size=optim.batch_size, processes=result.num_processes, accum=optim.grad_accum_steps,
        weights=weights, wall=f"{minutes} min {seconds} s",
        hardware=hardware_summary(result.device, result.num_processes),
        first_loss=f"{result.first_loss:.4f}", final_loss=f"{result.final_loss:.4f}",
        config=json.dumps(config, indent=2, default=str))
    path = folder / "MODEL_CARD.md"
    path.write_text(text)
    return path
