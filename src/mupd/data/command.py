"""`mupd data her2st`: build patch stores from the HER2ST folder (patient-level, reference from
the training sections only)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build training / evaluation patch stores")
    kinds = p.add_subparsers(dest="kind", required=True)
    h = kinds.add_parser("her2st", help="spot-centred tiles + RNA + marker maps + captions")
    h.add_argument("--root", required=True, help="data folder holding st/her2st (e.g. ../shared/data)")
    h.add_argument("--sections", nargs="+", required=True, help="e.g. C2 C3 C4 C5 C6")
    h.add_argument("--out", required=True, help="store folder to create")
    h.add_argument("--reference", default=None,
                   help="JSON of marker scales/cuts fitted on training sections (for held-out stores)")
    h.add_argument("--tile", type=int, default=128)
    h.add_argument("--mpp", type=float, default=1.0)
    h.add_argument("--max-spots", type=int, default=None)
    h.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .her2st import build_her2st_store
    from .store import PatchStore, describe

    reference = json.loads(Path(args.reference).read_text()) if args.reference else None
    path, used = build_her2st_store(Path(args.root), Path(args.out), args.sections,
                                    tile_size=args.tile, mpp=args.mpp, reference=reference,
                                    max_spots=args.max_spots)
    if reference is None:
        ref_path = Path(f"{path}.reference.json")
        ref_path.write_text(json.dumps(used, indent=1))
        print(f"marker scales and caption cuts fitted on {args.sections} -> {ref_path}")
    print(describe(PatchStore(path)))
    return 0
