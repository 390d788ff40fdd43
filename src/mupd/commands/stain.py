"""`mupd stain`: virtual IHC / mIF of a region or a whole slide, written as OME-Zarr (+ OME-TIFF);
of a whole cohort (a folder or list of slides: `mupd.cohort`), resumable and sharded.

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
    p.add_argument("slides", nargs="+", metavar="SLIDE",
                   help="slide file (SVS, TIFF, OME-TIFF, QPTIFF, JPEG, OME-Zarr); several slides, a "
                   "folder of slides or a .txt list of them stain a cohort: one folder per slide "
                   "under --out and a cohort.csv table, resumed by a rerun, shared out over the "
                   "processes of `accelerate launch` / `torchrun` (docs/slides.md)")
    p.add_argument("--stains", nargs="+", required=True, help="target stains/markers, e.g. HER2 Ki67")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--box", nargs=4, type=int, metavar=("X", "Y", "W", "H"),
                       help="region in level-0 pixels (default: the whole slide)")
    where.add_argument("--geojson", help="QuPath GeoJSON: each annotation is translated (holes "
                       "kept); scores of all of them land in --out")
    p.add_argument("--out", required=True, help="output folder (one OME-Zarr per stain); must not "
                   "exist or be empty (a cohort's: new, empty, or the same cohort's to resume)")
    p.add_argument("--ome-tiff", action="store_true", help="also write a pyramidal OME-TIFF per stain")
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--mpp", type=request_arg(TranslateRequest, "slide_mpp", float), default=None,
                   help="slide um/px when the file has none (one slide: overrides the file's; a "
                   "cohort: only for the slides whose files state none)")
    p.add_argument("--steps", type=request_arg(TranslateRequest, "steps", int), default=1,
                   help="sampling steps (1: one-step readout)")
    p.add_argument("--seed", type=request_arg(TranslateRequest, "seed", int), default=0)
    p.add_argument("--no-render", action="store_true", help="skip the brightfield DAB rendering")
    p.add_argument("--stain-norm", choices=("none", *STAIN_NORM_METHODS), default="none",
                   help="map the slide's H&E stain onto the training data's before the model "
                   "reads it (estimated once over the region)")
    p.add_argument("--ihc-look", metavar="IHC_IMAGE", default=None,
                   help="an IHC image of your lab: the DAB renderings take its counterstain and DAB "
                   "strength (measured once; its central 2048 px are read)")
    p.add_argument("--ihc-look-mpp", type=float, default=None, metavar="MPP",
                   help="um/px of --ihc-look when its file states none")
    p.add_argument("--strength", type=request_arg(TranslateRequest, "strength", float), default=None,
                   help="image-to-image for RGB stains, e.g. --stains H&E-FFPE --strength 0.5: "
                   "0 keeps the source, 1 ignores it")
    p.add_argument("--prompt", default=None,
                   help=f"with --strength: the look to take (default {RESTAIN_PROMPT!r})")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cohort import is_cohort
    from ..render import read_ihc_look

    args.look = None if args.ihc_look is None else read_ihc_look(args.ihc_look, args.ihc_look_mpp)
    if is_cohort(args.slides):
        return run_cohort(args)
    return run_slide(args, args.slides[0])


def run_slide(args: argparse.Namespace, slide: str) -> int:
    from ..engine.api import TranslateRequest
    from ..engine.local import LocalEngine
    from ..io import read_geojson
    from ..scores import ScoredRegion, write_score_files
    from ..regions.outputs import check_output_folder
    from ..console import ConsoleProgress

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
            TranslateRequest(slide_path=slide, stains=args.stains,
                             box=tuple(args.box) if args.box else None,
                             polygon=region.polygon if region else None,
                             holes=region.holes if region else [],
                             steps=args.steps, seed=args.seed, slide_mpp=args.mpp,
                             render_brightfield=not args.no_render, output_path=out,
                             ome_tiff=args.ome_tiff, stain_norm=args.stain_norm,
                             strength=args.strength, prompt=args.prompt,
                             ihc_look=None if args.look is None else args.look.to_dict()),
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


def run_cohort(args: argparse.Namespace) -> int:
    """Exit code 0 when every slide is finished, 1 when some failed (the table says why)."""
    from ..cohort import (TABLE, CohortSettings, check_cohort_output, claim_output, find_slides,
                          read_rows, stain_cohort, write_table)
    from ..distributed import join_launch, shard
    from ..engine.local import LocalEngine
    from ..console import CohortBars, console_line

    if args.box or args.geojson:
        raise RegionError("--box and --geojson pick a region of one slide; a cohort is stained "
                          "whole (run `mupd stain SLIDE --box ...` per slide for regions)")
    out = Path(args.out)
    skipped: list[str] = []  # before joining the launch or loading the model: inputs and --out
    slides = find_slides(args.slides, skipped.append)  # every process sees the same files
    check_cohort_output(out)
    launch = join_launch(cpu=args.device == "cpu")
    tag = f"[rank {launch.rank}/{launch.world}] " if launch.world > 1 else ""

    def log(message: str) -> None:
        console_line(tag + message)

    for line in skipped if launch.rank == 0 else []:
        log(line)
    device = args.device if args.device != "auto" or launch.world == 1 else str(launch.device)
    engine = LocalEngine(args.model, device=device)
    settings = CohortSettings.of(engine.pipeline, engine.info().model_path, args.stains,
                                 steps=args.steps, seed=args.seed,
                                 render_brightfield=not args.no_render, ome_tiff=args.ome_tiff,
                                 stain_norm=args.stain_norm, strength=args.strength,
                                 prompt=args.prompt, ihc_look=args.look)
    claim_output(out, settings, write=launch.rank == 0)
    log(f"{len(slides)} slides, {len(shard(slides, launch.rank, launch.world))} for this "
        f"process -> {out}")
    bars = CohortBars(tag)
    try:
        counts = stain_cohort(engine.pipeline, slides, out, settings, launch.rank, launch.world,
                              fallback_mpp=args.mpp, progress=bars, log=log)
    finally:
        bars.close()
    log(f"{counts['done']} stained, {counts['skipped']} finished earlier, {counts['failed']} failed")
    launch.wait_for_all()
    if launch.rank == 0:  # the complete table, once every process has finished
        write_table(out, slides, settings.markers)
    launch.wait_for_all()  # then all exit together, with one code
    mine = {s.name for s in slides}
    status = [r["status"] for r in read_rows(out, slides) if r["output"] in mine]
    bad = len(status) - status.count("done")
    if launch.rank == 0:
        log(f"cohort: {status.count('done')} of {len(status)} slides finished"
            f"{f', {bad} failed or missing' if bad else ''} -> {out / TABLE}")
    return 1 if bad else 0
