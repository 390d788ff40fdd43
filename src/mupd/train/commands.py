"""`mupd train` and `mupd finetune`: thin shells over `train()` and `run_finetune()`."""

from __future__ import annotations

import argparse
import shlex
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML/JSON config "
                                     "(several GPUs/nodes: `accelerate launch -m mupd.cli train ...`)")
    p.add_argument("--config", required=True, help="training config (see docs/training.md)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in the config's output folder")
    p.add_argument("--max-steps", type=int, default=None, help="override optim.max_steps")
    p.set_defaults(func=run_train)

    f = sub.add_parser("finetune", help="fine-tune a model folder on your own data (LoRA or full)")
    f.add_argument("--base", default=None, help="model folder to start from (default: bundled)")
    f.add_argument("--data", required=True,
                   help="HE/ + <STAIN>/ pairs, images + captions.csv, or one .h5ad + image")
    f.add_argument("--out", required=True, help="output model folder (must be new or empty)")
    f.add_argument("--method", choices=["lora", "full"], default="lora")
    f.add_argument("--steps", type=int, default=200)
    f.add_argument("--lr", type=float, default=1e-4)
    f.add_argument("--batch-size", type=int, default=4)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=run_finetune_command)


def _command_line() -> str:
    return "mupd " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run_train(args: argparse.Namespace) -> int:
    from ..commands.console import ConsoleProgress
    from .config import load_config
    from .run import train

    config = load_config(args.config)
    if args.max_steps is not None:
        config.optim.max_steps = args.max_steps
        config.check()
    bar = ConsoleProgress()
    try:
        result = train(config, resume=args.resume, progress=bar, command=_command_line())
    finally:
        bar.close()
    print(f"{result.steps} steps, loss {result.first_loss:.4f} -> {result.final_loss:.4f}, "
          f"{result.samples_per_second:.1f} samples/s -> {result.run_dir / 'model'}")
    return 0


def run_finetune_command(args: argparse.Namespace) -> int:
    from ..commands.console import ConsoleProgress
    from ..engine.api import FinetuneRequest
    from .finetune import run_finetune

    request = FinetuneRequest(data_dir=args.data, output_dir=args.out, base_model=args.base,
                              method=args.method, steps=args.steps, learning_rate=args.lr,
                              batch_size=args.batch_size, seed=args.seed)
    bar = ConsoleProgress()
    try:
        out = run_finetune(request, progress=bar, command=_command_line())
    finally:
        bar.close()
    print(f"fine-tuned model -> {out}")
    return 0
