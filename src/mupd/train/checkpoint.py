"""Crash-safe checkpoints: a checkpoint is either complete on disk or absent.

Accelerate writes the state (model, optimizer, scheduler, registered objects such as the EMA,
and the python/numpy/torch RNG states of every process) into a hidden temporary folder; the
main process adds `trainer_state.json` (step, data position), fsyncs every file, then renames
the folder into place. A SIGKILL at any moment leaves at worst a `.tmp-*` folder, which is
ignored and removed on the next start. Only the newest `keep` checkpoints are kept.

The temporary is named after the step, not made unique as `mupd.io.atomic`'s are: every process
of a distributed run writes its own files into that one folder, so all must know its name
without asking, and one run folder has one training run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from ..errors import MuPDError
from ..io.atomic import fsync_path, fsync_tree

STATE_FILE = "trainer_state.json"
PREFIX = "step-"


class CheckpointManager:
    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob(f"{PREFIX}*") if (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))

    def latest(self) -> Optional[Path]:
        found = self.checkpoints()
        return found[-1] if found else None

    def remove_partial(self) -> None:
        """Leftovers of a save that was killed half-way."""
        for tmp in self.root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def save(self, accelerator: Any, step: int, state: dict[str, Any]) -> Path:
        """Called on every process (accelerate writes per-process RNG files)."""
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{PREFIX}{step:08d}"
        if (final / STATE_FILE).is_file():  # e.g. cancelled right after a save: same state
            return final
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover without STATE_FILE
            os.replace(tmp, final)
            fsync_path(self.root)
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator: Any, path: Path) -> dict[str, Any]:
        """Restore everything accelerate registered; returns trainer_state.json."""
        state_file = Path(path) / STATE_FILE
        if not state_file.is_file():
            raise MuPDError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        accelerator.load_state(str(path))
        return json.loads(state_file.read_text())
