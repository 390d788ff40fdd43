"""`mupd data ...`: build patch stores (HER2ST, Visium / .h5ad spots, slide tiles) and check
stain-pair folders or serial-section landmarks, all through the `mupd.data` functions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build training / evaluation patch stores, check pair data")
    kinds = p.add_subparsers(dest="kind", required=True)

    def store_args(q: argparse.ArgumentParser, tile: int = 128, mpp: float = 1.0,
                   required: bool = True) -> None:
        q.add_argument("--out", required=required, help="store folder to create")
        q.add_argument("--tile", type=int, default=tile, help=f"tile size in px (default {tile})")
        q.add_argument("--mpp", type=float, default=mpp, help=f"tile um/px (default {mpp})")
        q.add_argument("--overwrite", action="store_true", help="replace an existing store")

    h = kinds.add_parser("her2st", help="HER2ST spot-centred tiles + RNA + marker maps + captions")
    h.add_argument("--root", required=True, help="data folder holding st/her2st "
                   "(e.g. ../shared/data)")
    h.add_argument("--sections", nargs="+", required=True, help="e.g. C2 C3 C4 C5 C6, or B4 A1")
    h.add_argument("--reference", default=None, help="JSON of marker scales and caption cuts fitted "
                   "on training sections (required for stores of held-out patients A and B)")
    h.add_argument("--max-spots", type=int, default=None, help="seeded sample of spots per section")
    h.add_argument("--caption-markers", type=int, default=0, help="other catalogue markers each "
                   "derived caption names with its tertile level (default 0: HER2 and immune only)")
    store_args(h)
    h.set_defaults(func=run_her2st)

    s = kinds.add_parser("spots", help="Visium spaceranger folder or .h5ad + image -> spot store")
    s.add_argument("source", help="spaceranger folder, or an .h5ad with obsm['spatial']")
    s.add_argument("--image", default=None, help="H&E image the .h5ad coordinates refer to")
    s.add_argument("--image-mpp", type=float, default=None, help="um/px of that image "
                   "(default: from the .h5ad scalefactors)")
    s.add_argument("--patient", default=None, help="patient id for splits (default: the name)")
    s.add_argument("--reference", default=None, help="marker scales JSON from a training store")
    s.add_argument("--captions", default=None, help="CSV / JSONL of captions keyed by spot barcode")
    s.add_argument("--max-spots", type=int, default=None, help="seeded sample of spots")
    store_args(s)
    s.set_defaults(func=run_spots)

    w = kinds.add_parser("slide", help="tissue tiles of a slide (H&E only)")
    w.add_argument("slide", help="slide or image file")
    w.add_argument("--patient", required=True, help="patient id for splits")
    w.add_argument("--slide-mpp", type=float, default=None, help="um/px if the file has none")
    w.add_argument("--overlap", type=int, default=0)
    w.add_argument("--max-tiles", type=int, default=None, help="stop after this many tissue tiles")
    w.add_argument("--captions", default=None, help="CSV / JSONL of captions keyed by slide "
                   "file name (or stem); the slide's caption goes to all its tiles")
    w.add_argument("--append", action="store_true", help="add to an existing store")
    store_args(w)
    w.set_defaults(func=run_slide)

    def pair_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--stain", default="IHC", help="name of the paired stain (default IHC)")
        q.add_argument("--image-mpp", type=float, default=None, help="um/px of the pair images "
                       "(needed with --out)")
        q.add_argument("--patient", default=None, help="patient id (default: each H&E file's stem)")
        q.add_argument("--max-tiles", type=int, default=None, help="stop after this many tiles")
        store_args(q, required=False)

    r = kinds.add_parser("pairs", help="match pair files by name; with --out, tile them into a store")
    r.add_argument("source", help="H&E folder, or a BCI / MIST root when no target is given")
    r.add_argument("target", nargs="?", default=None, help="IHC folder")
    r.add_argument("--split", default=None, help="train / test sub-folder of a BCI or MIST root")
    pair_args(r)
    r.set_defaults(func=run_pairs)

    g = kinds.add_parser("register", help="landmark registration of a serial-section pair; with "
                         "--images, warp the IHC section onto the H&E one (--warp, --out)")
    g.add_argument("fixed", help="landmarks of the H&E section (.csv or .pts)")
    g.add_argument("moving", help="landmarks of the IHC section")
    g.add_argument("--kind", default="affine", choices=["affine", "similarity", "tps"])
    g.add_argument("--images", nargs=2, default=None, metavar=("HE_IMAGE", "IHC_IMAGE"),
                   help="the two section images the landmarks refer to")
    g.add_argument("--warp", default=None, help="write the IHC image registered onto the H&E grid")
    pair_args(g)
    g.set_defaults(func=run_register)


def _reference(path: str | None) -> dict | None:
    return json.loads(Path(path).read_text()) if path else None


def _finish(path: Path, reference: dict, fitted_here: bool) -> None:
    from .store import PatchStore, describe

    if fitted_here:
        ref_path = Path(f"{path}.reference.json")
        ref_path.write_text(json.dumps(reference, indent=1))
        print(f"marker scales and caption cuts fitted on {reference['fitted_on']} -> {ref_path}")
    print(describe(PatchStore(path)))


def run_her2st(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from .build import build_her2st_store
    from .splits import HER2ST_HELDOUT

    root = Path(args.root)
    held = sorted({s[0] for s in args.sections} & set(HER2ST_HELDOUT))
    if held and not args.reference:
        raise DataError(f"sections of held-out patients {held} need --reference from a training "
                        "store (scales and caption cuts must not be fitted on held-out data)")
    path, used = build_her2st_store(root, Path(args.out), args.sections, tile_size=args.tile,
                                    mpp=args.mpp, reference=_reference(args.reference),
                                    max_spots=args.max_spots, overwrite=args.overwrite,
                                    caption_markers=args.caption_markers)
    _finish(path, used, args.reference is None)
    return 0


def run_spots(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from .build import build_spot_store
    from .captions import read_captions
    from .spatial import read_spatial_h5ad, read_visium

    source = Path(args.source)
    if source.suffix == ".h5ad":
        if not args.image:
            raise DataError(f"{source}: pass --image, the H&E its obsm['spatial'] coordinates refer to")
        table = read_spatial_h5ad(source, Path(args.image), mpp=args.image_mpp, patient=args.patient)
    else:
        table = read_visium(source, patient=args.patient)
    captions = read_captions(Path(args.captions)) if args.captions else None
    path, used = build_spot_store([table], Path(args.out), args.tile, args.mpp,
                                  reference=_reference(args.reference), captions=captions,
                                  max_spots=args.max_spots, overwrite=args.overwrite)
    _finish(path, used, args.reference is None)
    return 0


def run_slide(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..io import open_slide
    from .build import build_slide_store
    from .captions import read_captions
    from .store import PatchStore, describe

    caption = None
    if args.captions:
        captions, name = read_captions(Path(args.captions)), Path(args.slide).name
        caption = captions.get(name, captions.get(Path(args.slide).stem))
        if caption is None:
            raise DataError(f"captions file {args.captions} has no entry for slide {name}")
    with open_slide(args.slide, mpp=args.slide_mpp) as slide:
        path = build_slide_store(slide, Path(args.out), args.mpp, args.tile, args.patient,
                                 overlap=args.overlap, max_tiles=args.max_tiles, caption=caption,
                                 overwrite=args.overwrite, append=args.append)
    print(describe(PatchStore(path)))
    return 0


def _pair_store(args: argparse.Namespace, pairs: list, registration=None) -> None:
    from ..errors import DataError
    from .build import build_pair_store
    from .store import PatchStore, describe

    if args.image_mpp is None:
        raise DataError("--out needs --image-mpp, the um/px of the pair images")
    path = build_pair_store(pairs, Path(args.out), args.stain, args.image_mpp, args.mpp, args.tile,
                            patient=args.patient, registration=registration,
                            max_tiles=args.max_tiles, overwrite=args.overwrite)
    print(describe(PatchStore(path)))


def run_pairs(args: argparse.Namespace) -> int:
    from .pairs import match_pair_folders, pair_folders

    source, target = ((Path(args.source), Path(args.target)) if args.target
                      else pair_folders(Path(args.source), split=args.split))
    report = match_pair_folders(source, target)
    print(report.summary())
    if args.out:
        _pair_store(args, report.pairs)
    return 0


def run_register(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from ..errors import DataError
    from .crops import load_rgb
    from .pairs import read_landmarks, register_landmarks

    reg = register_landmarks(read_landmarks(Path(args.fixed)), read_landmarks(Path(args.moving)),
                             args.kind)
    print(json.dumps({"kind": reg.kind, "landmarks": reg.n_landmarks,
                      "residual_before_px": round(reg.residual_before, 2),
                      "residual_after_px": round(reg.residual_after, 2),
                      "residual_leave_one_out_px": round(reg.residual_loo, 2)}))
    if (args.warp or args.out) and not args.images:
        raise DataError("--warp and --out need --images HE_IMAGE IHC_IMAGE")
    if args.warp:
        fixed, moving = args.images
        warped, _ = reg.warp(np.asarray(load_rgb(moving)), np.asarray(load_rgb(fixed)).shape[:2])
        Image.fromarray(warped).save(args.warp)
        print(f"{moving} registered onto {fixed} -> {args.warp}")
    if args.out:
        _pair_store(args, [tuple(Path(p) for p in args.images)], registration=reg)
    return 0
