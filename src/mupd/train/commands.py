"""`mupd train`, `mupd train-vae` and `mupd finetune`: thin shells over `train()`, `train_vae()`
and `run_finetune()`."""

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

    v = sub.add_parser("train-vae", help="train the project's VAE (a diffusers AutoencoderKL) on "
                                          "the H&E tiles of patch stores, for VAE-codec models")
    v.add_argument("--store", action="append", required=True,
                   help="patch store folder (repeat for several stores of one tile size)")
    v.add_argument("--out", required=True, help="run folder; the VAE lands in OUT/vae")
    v.add_argument("--config", default="tiny", help="VAE config: tiny (4x down, 2.7 M), "
                                                     "small (4x, 10.8 M) or sd (8x, 83.7 M)")
    v.add_argument("--steps", type=int, default=2000)
    v.add_argument("--batch-size", type=int, default=16, help="per process")
    v.add_argument("--lr", type=float, default=1e-4)
    v.add_argument("--kl-weight", type=float, default=1e-6)
    v.add_argument("--crop", type=int, default=0,
                   help="train on random crops of this many px (0: whole tiles); cheaper per step")
    v.add_argument("--ema-decay", type=float, default=0.999, help="0: save the last step")
    v.add_argument("--exclude-patients", nargs="*", default=[], help="held-out patients: never read")
    v.add_argument("--patients", nargs="*", default=[], help="train only on these patients")
    v.add_argument("--checkpoint-every", type=int, default=500)
    v.add_argument("--mixed-precision", default="auto", help="auto / no / bf16 / fp16")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--resume", action="store_true", help="continue the run in OUT")
    v.set_defaults(func=run_train_vae)

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
    from ..console import ConsoleProgress
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


def run_train_vae(args: argparse.Namespace) -> int:
    from ..console import ConsoleProgress
    from .config import CheckpointSection, OptimSection
    from .vae import train_vae

    optim = OptimSection(max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                         ema_decay=args.ema_decay, mixed_precision=args.mixed_precision,
                         seed=args.seed)
    checkpoint = CheckpointSection(every=args.checkpoint_every)
    optim.check()
    checkpoint.check()
    bar = ConsoleProgress()
    try:
        result = train_vae(args.store, args.out, args.config, optim, checkpoint,
                           kl_weight=args.kl_weight, crop=args.crop, patients=args.patients,
                           exclude_patients=args.exclude_patients, resume=args.resume,
                           progress=bar, command=_command_line())
    finally:
        bar.close()
    print(f"{result.steps} steps, loss {result.first_loss:.4f} -> {result.final_loss:.4f}, "
          f"{result.seconds_per_step:.3f} s/step, reconstruction MAE {result.train_tile_mae:.2f} "
          f"grey levels on training tiles, scaling {result.scaling_factor:.4g} shift "
          f"{result.shift_factor:.4g} -> {result.vae_dir}")
    return 0


def run_finetune_command(args: argparse.Namespace) -> int:
    from ..console import ConsoleProgress
    from ..requests import FinetuneRequest
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
