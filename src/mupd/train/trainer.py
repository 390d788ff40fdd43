"""The one training loop (training from scratch and fine-tuning both run it).

Built on `accelerate`, so the same code runs on one CPU, one GPU, or several GPUs/nodes under
`accelerate launch` (DDP or FSDP from the launch config). What makes a run reproducible and
resumable exactly:
- the samples of step k are a pure function of (seed, k) (`BatchOrder`), and the noise of the
  loss comes from a generator seeded from (seed, micro-step, process), so neither depends on
  how many times the process was restarted;
- checkpoints hold model, optimizer, scheduler, EMA and all RNG states (`CheckpointManager`);
- the data loader has its own generator, so creating it does not draw from the global RNG.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import CancelledError, MuPDError
from ..progress import CancelToken, ProgressCallback, ProgressEvent, no_progress
from .batches import Sample, collate, to_device
from .checkpoint import CheckpointManager
from .config import CheckpointSection, OptimSection
from .order import BatchOrder

LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "samples_per_s", "wall_s"]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float  # mean loss of the last logged window
    first_loss: float  # mean loss of the first logged window (of this run folder)
    wall_seconds: float  # over all resumes
    samples_per_second: float
    checkpoint: Optional[Path]
    num_processes: int
    device: str


class _StepBatches(torch.utils.data.Dataset):
    """Item k is the collated micro-batch k of this process (lets workers prefetch)."""

    def __init__(self, samples: Sequence[Sample], order: BatchOrder, rna_tokenizer: Any) -> None:
        self.samples, self.order, self.rna_tokenizer = samples, order, rna_tokenizer

    def __getitem__(self, micro_step: int) -> dict[str, Any]:
        picked = [self.samples[i] for i in self.order.indices(micro_step)]
        return collate(picked, self.rna_tokenizer)


def step_generator(seed: int, micro_step: int, process: int, device: Any) -> torch.Generator:
    """The loss's noise/timesteps for one micro-batch, independent of restarts."""
    value = int(np.random.SeedSequence([seed, micro_step, process]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(value)


def make_accelerator(mixed_precision: str = "auto", compile: bool = False) -> Any:
    from accelerate import Accelerator

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    # The warmup schedule counts optimizer steps, not steps x processes.
    return Accelerator(mixed_precision=mixed_precision, step_scheduler_with_optimizer=False,
                       dynamo_backend="inductor" if compile else "no")


class Trainer:
    """Trains `objective.transformer` (its parameters that require grad, e.g. only LoRA weights)
    on `samples`, with `objective.training_loss(batch, model=, generator=)` as the loss; the
    objective is e.g. `loss.FlowMatchingObjective(pipeline)`.

    `module`: train this module instead of `objective.transformer` (e.g. the VAE's).
    """

    def __init__(self, objective: Any, samples: Sequence[Sample], optim: OptimSection,
                 checkpoint: CheckpointSection, run_dir: Path, *,
                 accelerator: Any = None, num_workers: int = 0, log_every: int = 10,
                 checkpoint_dir: Optional[Path] = None,
                 module: Optional[torch.nn.Module] = None) -> None:
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.objective, self.samples, self.optim = objective, samples, optim
        self.run_dir = Path(run_dir)
        self.log_every, self.num_workers = max(1, log_every), num_workers
        self.accelerator = accelerator or make_accelerator(optim.mixed_precision, optim.compile)
        acc = self.accelerator
        self.order = BatchOrder(len(samples), optim.batch_size, optim.seed,
                                acc.num_processes, acc.process_index)
        objective.to(acc.device)
        module = module if module is not None else objective.transformer
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=optim.learning_rate, betas=tuple(optim.betas),
                                      weight_decay=optim.weight_decay)
        scheduler = get_scheduler("constant_with_warmup", optimizer,
                                  num_warmup_steps=optim.warmup_steps)
        self.model, self.optimizer, self.scheduler = acc.prepare(module, optimizer, scheduler)
        self.params = [p for p in acc.unwrap_model(self.model).parameters() if p.requires_grad]
        self.ema = None
        if optim.ema_decay > 0:
            self.ema = EMAModel(self.params, decay=optim.ema_decay,
                                use_ema_warmup=optim.ema_warmup)
            acc.register_for_checkpointing(self.ema)
        self.checkpoints = CheckpointManager(checkpoint_dir or self.run_dir / "checkpoints",
                                             keep=checkpoint.keep)
        self.checkpoint_every = checkpoint.every
        self.log_path = self.run_dir / "train_log.csv"

    # -- state -----------------------------------------------------------------------------
    def _trainer_state(self, step: int, wall: float) -> dict[str, Any]:
        micro = step * self.optim.grad_accum_steps
        return {"data_position": self.order.position(micro), "micro_step": micro,
                "wall_seconds": wall, "seed": self.optim.seed,
                "global_batch": self.order.global_batch, "n_samples": self.order.n_samples}

    def save_checkpoint(self, step: int, wall: float) -> Path:
        return self.checkpoints.save(self.accelerator, step, self._trainer_state(step, wall))

    def _resume(self) -> tuple[int, float]:
        if self.accelerator.is_main_process:
            self.checkpoints.remove_partial()
        latest = self.checkpoints.latest()
        if latest is None:
            return 0, 0.0
        state = self.checkpoints.load(self.accelerator, latest)
        expected = (self.order.global_batch, self.order.n_samples, self.optim.seed)
        found = (state["global_batch"], state["n_samples"], state["seed"])
        if expected != found:
            raise MuPDError(f"checkpoint {latest} was made with (global batch, samples, seed) "
                            f"{found}, this run has {expected}: resume with the same settings")
        step = int(state["step"])
        if self.order.micro_step(state["data_position"]) != step * self.optim.grad_accum_steps:
            raise MuPDError(f"checkpoint {latest}: data position {state['data_position']} does "
                            f"not match step {step} (was grad_accum_steps changed?)")
        self._truncate_log(step)
        return step, float(state["wall_seconds"])

    def _truncate_log(self, step: int) -> None:
        """Rows logged after the checkpoint we resume from are about to be redone."""
        if not (self.accelerator.is_main_process and self.log_path.exists()):
            return
        with open(self.log_path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]
        self._write_log(rows, mode="w")

    def _write_log(self, rows: list[dict[str, Any]], mode: str = "a") -> None:
        new = mode == "w" or not self.log_path.exists()
        with open(self.log_path, mode, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    # -- loop ------------------------------------------------------------------------------
    def fit(self, resume: bool = False, progress: Optional[ProgressCallback] = None,
            cancel: Optional[CancelToken] = None) -> TrainResult:
        acc, optim = self.accelerator, self.optim
        progress = progress or no_progress
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        start, wall_before = self._resume() if resume else (0, 0.0)
        accum = optim.grad_accum_steps
        loader = torch.utils.data.DataLoader(
            _StepBatches(self.samples, self.order, getattr(self.objective, "rna_tokenizer", None)),
            batch_size=None, sampler=range(start * accum, optim.max_steps * accum),
            num_workers=self.num_workers, generator=torch.Generator().manual_seed(optim.seed))
        batches = iter(loader)
        self.model.train()
        t0 = time.perf_counter()
        window: list[float] = []
        last_loss = first_loss = math.nan
        last_ckpt = self.checkpoints.latest()
        for step in range(start, optim.max_steps):
            if cancel is not None and cancel.cancelled:
                path = self.save_checkpoint(step, wall_before + time.perf_counter() - t0)
                raise CancelledError(f"training cancelled at step {step}; state saved in {path} "
                                     f"(continue with --resume)")
            loss_sum = torch.zeros((), device=acc.device)
            for k in range(accum):
                micro = step * accum + k
                batch = to_device(next(batches), acc.device)
                gen = step_generator(optim.seed, micro, acc.process_index, acc.device)
                sync = contextlib.nullcontext() if k == accum - 1 else acc.no_sync(self.model)
                with sync, acc.autocast():
                    loss = self.objective.training_loss(batch, model=self.model, generator=gen)
                acc.backward(loss / accum)
                loss_sum += loss.detach().float()
            grad_norm = math.nan
            if optim.max_grad_norm > 0:
                grad_norm = float(acc.clip_grad_norm_(self.params, optim.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.params)
            loss_value = float(acc.gather(loss_sum / accum).mean())
            window.append(loss_value)
            done = step + 1
            lr = float(self.scheduler.get_last_lr()[0])
            elapsed = time.perf_counter() - t0
            if acc.is_main_process:  # one progress bar, not one per GPU
                progress(ProgressEvent("train", done, optim.max_steps,
                                       metrics={"loss": loss_value, "lr": lr}))
            if done % self.log_every == 0 or done == optim.max_steps:
                last_loss = float(np.mean(window))
                first_loss = last_loss if math.isnan(first_loss) else first_loss
                if acc.is_main_process:
                    rate = (done - start) * self.order.global_batch * accum / max(elapsed, 1e-9)
                    self._write_log([{"step": done, "loss": f"{last_loss:.6g}", "lr": f"{lr:.6g}",
                                      "grad_norm": f"{grad_norm:.6g}",
                                      "samples_per_s": f"{rate:.4g}",
                                      "wall_s": f"{wall_before + elapsed:.2f}"}])
                window = []
            if done % self.checkpoint_every == 0 or done == optim.max_steps:
                last_ckpt = self.save_checkpoint(done, wall_before + elapsed)
        elapsed = time.perf_counter() - t0
        steps_run = optim.max_steps - start
        rate = steps_run * self.order.global_batch * accum / max(elapsed, 1e-9)
        log = self._log_rows()
        if log:  # the log spans all resumes; a resume that only writes the model ran no steps
            first_loss = float(log[0]["loss"])
            if not steps_run:
                last_loss, rate = float(log[-1]["loss"]), float(log[-1]["samples_per_s"])
        return TrainResult(
            run_dir=self.run_dir, steps=optim.max_steps, final_loss=last_loss,
            first_loss=first_loss, wall_seconds=wall_before + elapsed, samples_per_second=rate,
            checkpoint=last_ckpt, num_processes=acc.num_processes, device=str(acc.device))

    def _log_rows(self) -> list[dict[str, str]]:
        if not self.log_path.exists():
            return []
        with open(self.log_path, newline="") as fh:
            return list(csv.DictReader(fh))

    def apply_ema(self) -> None:
        """Put the EMA weights into the model (done once, before the final save)."""
        if self.ema is not None:
            self.ema.copy_to(self.params)

    def unwrapped_model(self) -> Any:
        return self.accelerator.unwrap_model(self.model)
