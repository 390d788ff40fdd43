"""Which samples each step sees: a pure function of (seed, step), so resuming is exact.

Each epoch is a fresh permutation drawn from (seed, epoch); a global batch is a slice of it and
each process takes its share. Nothing is iterated statefully, so the data position in a
checkpoint is just (epoch, index) of the next micro-batch, and workers may prefetch freely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class BatchOrder:
    n_samples: int
    batch_size: int  # per process
    seed: int = 0
    num_processes: int = 1
    process_index: int = 0

    def __post_init__(self) -> None:
        if self.n_samples < self.global_batch:
            raise DataError(f"{self.n_samples} training samples cannot fill one batch of "
                            f"{self.global_batch} ({self.batch_size} x {self.num_processes} "
                            f"processes); lower the batch size or add data")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def batches_per_epoch(self) -> int:
        return self.n_samples // self.global_batch  # the ragged tail is dropped each epoch

    def position(self, micro_step: int) -> dict[str, int]:
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        return {"epoch": epoch, "index": index}

    def micro_step(self, position: dict[str, int]) -> int:
        return position["epoch"] * self.batches_per_epoch + position["index"]

    def indices(self, micro_step: int) -> list[int]:
        """This process's sample indices for one micro-batch."""
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_samples)
        start = index * self.global_batch + self.process_index * self.batch_size
        return perm[start : start + self.batch_size].tolist()
