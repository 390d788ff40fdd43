"""`mupd generate`: synthetic tiles from text and/or an RNA profile, plus a mosaic PNG."""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from ..engine.api import GenerateRequest
from ..errors import ConditionError
from ..mosaic import mosaic
from . import request_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate tiles from a text prompt and/or an RNA profile")
    p.add_argument("--text", type=request_arg(GenerateRequest, "text", str), default=None,
                   help='clinical text, e.g. "HER2-positive carcinoma"')
    p.add_argument("--rna", default=None, help="expression profile: CSV/TSV (gene, value) or .h5ad")
    p.add_argument("--rna-normalized", action="store_true",
                   help="values are already log-normalised (default: raw counts, CPM + log1p)")
    p.add_argument("--stain", default="H&E")
    p.add_argument("-n", "--num-images", type=request_arg(GenerateRequest, "num_images", int), default=4)
    p.add_argument("--steps", type=request_arg(GenerateRequest, "steps", int), default=20)
    p.add_argument("--guidance", nargs="*", default=[], metavar="MODALITY=SCALE",
                   help="per-modality guidance, e.g. text=3 rna=2")
    p.add_argument("--seed", type=request_arg(GenerateRequest, "seed", int), default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output folder for tiles and mosaic.png")
    p.set_defaults(func=run)


def parse_guidance(items: list[str]) -> dict[str, float]:
    guidance = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            guidance[key.strip()] = float(value)
        except ValueError:
            raise ConditionError(f"guidance {item!r} is not MODALITY=SCALE (e.g. text=3)") from None
        if not sep:
            raise ConditionError(f"guidance {item!r} is not MODALITY=SCALE (e.g. text=3)")
    return guidance


def run(args: argparse.Namespace) -> int:
    from ..engine.local import LocalEngine
    from ..models.rna import read_profile
    from ..regions.outputs import check_output_folder

    if args.text is None and args.rna is None:
        print("note: no text and no RNA given: unconditional samples")
    out = check_output_folder(args.out, remedy="choose another --out")  # before compute
    rna = read_profile(args.rna) if args.rna else None
    engine = LocalEngine(args.model, device=args.device)
    result = engine.generate(GenerateRequest(
        text=args.text, rna=rna, rna_normalized=args.rna_normalized, stain=args.stain,
        num_images=args.num_images, steps=args.steps, guidance=parse_guidance(args.guidance),
        seed=args.seed))
    if result.missing_genes:
        more = "..." if len(result.missing_genes) > 10 else ""
        print(f"warning: {len(result.missing_genes)} panel genes missing from the profile "
              f"(masked): {', '.join(result.missing_genes[:10])}{more}")
    out.mkdir(parents=True, exist_ok=True)
    images = result.images
    if images.dtype != np.uint8:  # a marker map in [0, 1]
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    for i, tile in enumerate(images):
        Image.fromarray(tile).save(out / f"tile-{i:03d}.png")
    Image.fromarray(mosaic(images)).save(out / "mosaic.png")
    print(f"{len(images)} tiles in {result.seconds:.1f} s -> {out}/mosaic.png")
    return 0
