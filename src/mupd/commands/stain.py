"""`mupd stain`: virtual IHC / mIF of a region or a whole slide, written as OME-Zarr (+ OME-TIFF).

With markers rendered as IHC (the default), each output folder also holds the region's
predicted scores (`scores.csv`, `scores-<marker>.geojson` for QuPath: see `mupd.scores`); with
`--geojson`, `--out` itself gets the same two kinds of file for all the annotations together,
under their names and classes.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

from ..data.captions import RESTAIN_PROMPT
from ..engine.api import TranslateRequest
from ..errors import RegionError
from ..stain_norm import METHODS as STAIN_NORM_METHODS
from . import request_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stain", help="translate a slide region (or the whole slide) into stains")
    p.add_argument("slide", help="slide file (SVS, TIFF, OME-TIFF, QPTIFF, JPEG, OME-Zarr)")
    p.add_argument("--stains", nargs="+", required=True, help="target stains/markers, e.g. HER2 Ki67")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--box", nargs=4, type=int, metavar=("X", "Y", "W", "H"),
                       help="region in level-0 pixels (default: the whole slide)")
    where.add_argument("--geojson", help="QuPath GeoJSON: each annotation is translated (holes "
                       "kept); scores of all of them land in --out")
    p.add_argument("--out", required=True, help="output folder (one OME-Zarr per stain); must not "
                   "exist or be empty")
    p.add_argument("--ome-tiff", action="store_true", help="also write a pyramidal OME-TIFF per stain")
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--mpp", type=request_arg(TranslateRequest, "slide_mpp", float), default=None,
                   help="slide um/px when the file has none")
    p.add_argument("--steps", type=request_arg(TranslateRequest, "steps", int), default=1,
                   help="sampling steps (1: one-step readout)")
    p.add_argument("--seed", type=request_arg(TranslateRequest, "seed", int), default=0)
    p.add_argument("--no-render", action="store_true", help="skip the brightfield DAB rendering")
    p.add_argument("--stain-norm", choices=("none", *STAIN_NORM_METHODS), default="none",
                   help="map the slide's H&E stain onto the training data's before the model "
                   "reads it (estimated once over the region)")
    p.add_argument("--strength", type=request_arg(TranslateRequest, "strength", float), default=None,
                   help="image-to-image for RGB stains, e.g. --stains H&E-FFPE --strength 0.5: "
                   "0 keeps the source, 1 ignores it")
    p.add_argument("--prompt", default=None,
                   help=f"with --strength: the look to take (default {RESTAIN_PROMPT!r})")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine.api import TranslateRequest
    from ..engine.local import LocalEngine
    from ..io import read_geojson
    from ..scores import ScoredRegion, write_score_files
    from ..slides import check_output_folder
    from .console import ConsoleProgress

    check_output_folder(args.out, remedy="choose another --out (mupd stain never replaces or "
                        "deletes files)")  # before loading the model or reading a pixel

    if args.geojson:
        regions = read_geojson(args.geojson)
        if not regions:
            raise RegionError(f"{args.geojson} holds no annotation to translate")
        targets = [(f"{args.out}/region-{i:03d}", r) for i, r in enumerate(regions)]
    else:
        targets = [(args.out, None)]
    engine = LocalEngine(args.model, device=args.device)
    scored = []
    for out, region in targets:
        bar = ConsoleProgress()
        result = engine.translate(
            TranslateRequest(slide_path=args.slide, stains=args.stains,
                             box=tuple(args.box) if args.box else None,
                             polygon=region.polygon if region else None,
                             holes=region.holes if region else [],
                             steps=args.steps, seed=args.seed, slide_mpp=args.mpp,
                             render_brightfield=not args.no_render, output_path=out,
                             ome_tiff=args.ome_tiff, stain_norm=args.stain_norm,
                             strength=args.strength, prompt=args.prompt),
            progress=bar,
        )
        bar.close()
        names = ", ".join(l.name for l in result.layers)
        print(f"{result.n_tiles} tiles in {result.seconds:.1f} s -> {result.output_path} ({names})")
        for s in result.scores:
            print(f"  predicted {s.marker}: {s.n_cells} cells, mean level {_fmt(s.mean_level, 3)}, "
                  f"{_fmt(s.percent_positive, 1)}% positive, H-score {_fmt(s.h_score, 0)}")
        if region is not None and result.scores:
            scored.append(ScoredRegion(dataclasses.replace(region, name=region.name or Path(out).name),
                                       result.scores, result.cells))
    if scored:
        for path in write_score_files(args.out, scored):
            print(f"scores of {len(scored)} region(s) -> {path}")
    return 0


def _fmt(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
