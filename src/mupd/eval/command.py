"""`mupd eval`: the held-out quality report (quality.md, results.json, figures)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on held-out HER2ST patients and write a report")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="model folder to evaluate")
    what.add_argument("--baselines-only", action="store_true",
                      help="no model: measure the baselines, floors and scorer ceilings only")
    p.add_argument("--out", default="benchmarks/results", help="report folder")
    p.add_argument("--data", default=None,
                   help="data root holding st/her2st (default: ../shared/data beside the checkout)")
    p.add_argument("--quick", action="store_true", help="reduced run (fewer spots and tiles) in minutes")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--encoder", default=None,
                   help="transformers image model folder for a second feature space (local path)")
    p.add_argument("--steps", type=int, default=None, help="generation sampling steps")
    p.add_argument("--rna-tiles", type=int, default=None,
                   help="tiles per RNA->H&E set for FD / FID / KID (default: half the held-out B4 "
                        "tiles, 141; --quick: 8)")
    p.add_argument("--markers", nargs="+", default=None,
                   help="score only these catalogue markers (default: every marker with a gene)")
    p.add_argument("--prompt-template", default=None,
                   help="text->H&E prompt with {marker} and {level} (high/low); match the training "
                        "captions (default: 'H&E breast cancer tissue, {marker}-{level}')")
    p.add_argument("--tasks", nargs="+", choices=("markers", "rna", "text", "augment"), default=None,
                   help="run only these tasks (default: all four; a partial report says so)")
    p.add_argument("--stain-norm", choices=("none", "macenko", "reinhard"), default="none",
                   help="the model reads the tiles normalised per section onto the training stain "
                        "(baselines read them as they are)")
    p.add_argument("--validate", default=None, metavar="SECTION",
                   help="score this patient-C section instead of the held-out test (for a model whose "
                        "recipe left it out, e.g. resources/configs/mupd-tiny-val.yaml and C6): choose "
                        "settings here, never on B4 / A1")
    p.add_argument("--guidance", nargs="+", default=None, metavar="MODALITY=W",
                   help="guidance scales, e.g. source=1.5 rna=2 text=2 (default: the model as trained)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing quality.md")
    p.set_defaults(func=run)


def default_data_root() -> Path:
    """`../shared/data` beside a checkout (src/mupd/eval/command.py -> the checkout's parent)."""
    return Path(__file__).resolve().parents[4] / "shared" / "data"


def run(args: argparse.Namespace) -> int:
    from ..errors import ConditionError, DataError
    from ..console import ConsoleProgress
    from ..commands.generate import parse_guidance
    from .run import EvalSettings, run_evaluation

    data = Path(args.data) if args.data else default_data_root()
    if not (data / "st" / "her2st").is_dir():
        raise DataError(f"no HER2ST data under {data}; pass --data DIR (the folder holding st/her2st)")
    settings = EvalSettings(data_root=data, seeds=tuple(args.seeds), quick=args.quick,
                            encoder=args.encoder, overwrite=args.overwrite,
                            markers=tuple(args.markers) if args.markers else None,
                            stain_norm=args.stain_norm, validate=args.validate,
                            guidance=parse_guidance(args.guidance) if args.guidance else None)
    if args.tasks:
        settings.tasks = tuple(dict.fromkeys(args.tasks))
    if args.prompt_template is not None:
        if "{marker}" not in args.prompt_template or "{level}" not in args.prompt_template:
            raise ConditionError(f"prompt template {args.prompt_template!r} needs {{marker}} and {{level}}")
        settings.prompt = args.prompt_template
    if args.steps is not None:
        settings.steps = args.steps
    if args.rna_tiles is not None:
        if args.rna_tiles < 2:
            raise ConditionError(f"--rna-tiles {args.rna_tiles}: need >= 2 tiles per set")
        settings.rna_tiles = args.rna_tiles
    bar = ConsoleProgress()
    results = run_evaluation(None if args.baselines_only else args.model, args.out, settings, progress=bar)
    bar.close()
    print(f"report in {results['seconds']} s -> {Path(args.out) / 'quality.md'}")
    return 0
