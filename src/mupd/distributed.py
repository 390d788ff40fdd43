"""Whole-slide staining over many processes (GPUs, nodes) with torch.distributed.

Every process derives the same tile plan, runs its share of the tile batches (round robin),
and the fixed-point blending sums are reduced onto rank 0 in row strips, which normalises
them and writes the pyramid. Integer sums make the output bit-identical to a single-process
run whatever the number of processes.

Launch one process per device, e.g. on 2 nodes x 8 GPUs (see docs/remote.md):

    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \\
        --main_process_ip HOST --main_process_port 29500 -m mupd.distributed SLIDE \\
        --stains HER2 Ki67 --out out/

A cohort (`mupd stain FOLDER`, launched the same way with `-m mupd.cli stain`) shares out whole
slides instead, through `join_launch`, `shard` and `Launch.wait_for_all` (see mupd.cohort).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import MuPDError
from .progress import ProgressCallback
from .regions.blend import RegionSums
from .regions.outputs import write_translation
from .regions.translate import RegionTranslator

#: Bytes of one reduced strip per sum array (bounds the memory the reduction needs).
STRIP_BYTES = 64 * 2**20


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised (a plain run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Launch:
    """This process's place in a launch (`join_launch`)."""

    rank: int
    world: int
    device: Any
    _waiting: Any = None  # the process group `wait_for_all` waits on

    def wait_for_all(self) -> None:
        """Wait for every process, however long the slowest takes (a no-op in a plain run).

        On a gloo group of its own with a long timeout: processes that finish their share of a
        cohort hours before the others then wait on the CPU, not in an NCCL collective that its
        watchdog aborts after the default 10 minutes."""
        import torch.distributed as dist

        if self._waiting is not None:
            dist.barrier(group=self._waiting)


def join_launch(cpu: bool = False, wait_timeout: timedelta = timedelta(days=7)) -> Launch:
    """Join the process group that `accelerate launch` / `torchrun` describe in the environment;
    a plain run is rank 0 of 1.

    `cpu`: gloo and the CPU even where CUDA exists. Without CUDA it is forced: accelerate's
    PartialState() under torchrun on a CPU-only host joins the group yet reports one process.
    `wait_timeout`: how long `Launch.wait_for_all` may wait (its group is made now, while every
    process is here)."""
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=cpu or not torch.cuda.is_available())
    rank, world = rank_and_world()
    waiting = dist.new_group(backend="gloo", timeout=wait_timeout) if world > 1 else None
    return Launch(rank, world, state.device, waiting)


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's share of a slide's tile batches or of a cohort's slides: round robin, so a
    slide's tissue-dense areas spread over all ranks, and the share follows from the list alone
    (a cohort's processes agree on theirs without talking)."""
    return list(items[rank::world_size])


def reduce_sums(sums: RegionSums, device: Any = "cpu") -> None:
    """Sum every process's partial sums onto rank 0, strip by strip (in place on rank 0)."""
    import torch
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return
    for array in sums.arrays():
        row_bytes = max(1, int(np.prod(array.shape[1:])) * 8)
        rows = max(1, STRIP_BYTES // row_bytes)
        for r0 in range(0, array.shape[0], rows):
            strip = torch.from_numpy(np.ascontiguousarray(array[r0 : r0 + rows])).to(device)
            dist.reduce(strip, dst=0, op=dist.ReduceOp.SUM)
            if rank == 0:
                array[r0 : r0 + rows] = strip.cpu().numpy()
    skipped = torch.tensor([sums.n_skipped], dtype=torch.int64, device=device)
    dist.reduce(skipped, dst=0, op=dist.ReduceOp.SUM)
    if rank == 0:
        sums.n_skipped = int(skipped.item())


def _agree(ok: bool, message: str, device: Any) -> None:
    """Raise on every rank if any rank failed a check (so none waits forever in a collective)."""
    import torch
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        if not ok:
            raise MuPDError(message)
        return
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    if int(flag.item()):
        raise MuPDError(message if not ok else "another process failed its checks; see its error")


def translate_distributed(
    pipeline: Any,
    slide: Any,
    stains: Sequence[str],
    out: Optional[str | Path],
    box: Optional[tuple[int, int, int, int]] = None,
    polygon: Optional[Sequence[tuple[float, float]]] = None,
    steps: int = 1,
    guidance: Optional[dict[str, float]] = None,
    seed: int = 0,
    render_brightfield: bool = True,
    tissue_only: bool = True,
    batch_size: int = 8,
    overwrite: bool = False,
    device: Any = "cpu",
    progress: Optional[ProgressCallback] = None,
) -> Any:
    """This process's part of a distributed translation (a plain run without torch.distributed).

    Rank 0 returns the RegionTranslation (written to `out` when given); other ranks return None.
    `device` is where the reduction's tensors live (the GPU for NCCL, "cpu" for gloo).
    """
    rank, world = rank_and_world()
    start = time.perf_counter()
    refusal = ""
    if rank == 0 and out is not None and Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        refusal = f"output folder {out} already exists and is not empty; choose another or pass --overwrite"
    _agree(not refusal, refusal, device)
    translator = RegionTranslator(pipeline, batch_size=batch_size, tissue_only=tissue_only)
    plan = translator.plan(slide, stains, box=box, polygon=polygon)
    sums = translator.new_sums(plan, render_brightfield)
    try:
        failure = ""
        try:
            translator.accumulate(slide, plan, shard(plan.batches, rank, world), sums, steps=steps,
                                  guidance=guidance, seed=seed,
                                  render_brightfield=render_brightfield, progress=progress)
        except Exception as exc:  # tell the other ranks before they wait in the reduction
            failure = f"rank {rank}: {type(exc).__name__}: {exc}"
        _agree(not failure, failure, device)
        reduce_sums(sums, device)
        if rank != 0:
            shutil.rmtree(sums.workdir, ignore_errors=True)
            return None
        result = translator.finish(plan, sums, start)
    except BaseException:
        shutil.rmtree(sums.workdir, ignore_errors=True)
        raise
    if out is not None:
        write_translation(result, out, source=str(slide.path), overwrite=overwrite)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point for `accelerate launch -m mupd.distributed` / `torchrun -m mupd.distributed`."""
    parser = argparse.ArgumentParser(prog="mupd.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("slide")
    parser.add_argument("--stains", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--box", nargs=4, type=int, metavar=("X", "Y", "W", "H"))
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--mpp", type=float, default=None)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-render", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from accelerate import PartialState

    from .io import open_slide
    from .paths import DEFAULT_MODEL
    from .pipeline import MuPDPipeline

    state = PartialState()  # reads the launcher's env; gloo on CPU, NCCL on GPUs
    device = state.device if state.backend == "nccl" else "cpu"
    try:
        pipeline = MuPDPipeline.from_pretrained(args.model or DEFAULT_MODEL).to(state.device)
        with open_slide(args.slide, mpp=args.mpp) as slide:
            bar = None
            if state.is_main_process:
                from .console import ConsoleProgress

                bar = ConsoleProgress()
            result = translate_distributed(
                pipeline, slide, args.stains, args.out, box=tuple(args.box) if args.box else None,
                steps=args.steps, seed=args.seed, render_brightfield=not args.no_render,
                batch_size=args.batch_size, overwrite=args.overwrite, device=device, progress=bar)
            if bar is not None:
                bar.close()
    except MuPDError as exc:
        print(f"mupd.distributed (rank {state.process_index}): error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(f"{result.n_tiles} tiles ({result.n_skipped} background) on {state.num_processes} "
              f"processes in {result.seconds:.1f} s -> {args.out}")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
