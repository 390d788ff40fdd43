"""A PNG grid of samples from a model folder, for eyes rather than numbers (docs/samples.png).

Rows: text -> H&E (one row per prompt, the training-caption vocabulary) and unconditional; RNA -> H&E (the real
tile of a held-out spot, then tiles generated from that spot's raw RNA profile); H&E -> marker
(held-out source tile, then predicted and measured map per marker). Measured maps are the
spot's log1p(CPM) of the marker gene divided by the training store's per-marker scale (the
scale the training targets used), painted over the 100 um spot footprint; predicted maps are
the one-step readout. Held-out spots come from HER2ST section B4 (patient B, never trained on).

    .venv/bin/python benchmarks/sample_grid.py --model src/mupd/resources/models/mupd-tiny --out docs/samples.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("H&E, breast, HER2-positive carcinoma, HER2-high, immune-poor",
           "H&E, breast, HER2-positive carcinoma, HER2-low, immune-rich",
           "H&E, breast, HER2-positive carcinoma, HER2-intermediate, moderate immune infiltrate",
           "H&E, frozen section, primary tumour",  # slide captions of the all-slides store
           None)  # unconditional
MARKERS = ("HER2", "Ki67", "CD45")


def pick_spots(depth_order: np.ndarray, n: int) -> list[int]:
    """n spots spread from the lowest to the highest of an ordering (quantiles)."""
    return [int(depth_order[round(q * (len(depth_order) - 1))]) for q in np.linspace(0.1, 0.9, n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "src/mupd/resources/models/mupd-tiny"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data"),
                        help="data root holding st/her2st")
    parser.add_argument("--reference", default=str(ROOT / "stores/her2st-C.reference.json"),
                        help="the training store's reference (per-marker target scales)")
    parser.add_argument("--section", default="B4", help="held-out HER2ST section")
    parser.add_argument("--out", default=str(ROOT / "docs/samples.png"))
    parser.add_argument("--steps", type=int, default=20, help="generation sampling steps")
    parser.add_argument("--per-row", type=int, default=6, help="generated tiles per row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mupd.data.sections import footprint_mask
    from mupd.eval.markers import marker_targets
    from mupd.eval.spots import build_spot_table
    from mupd.pipeline import MuPDPipeline

    pipe = MuPDPipeline.from_pretrained(args.model)
    genes = marker_targets(pipe.catalogue.to_list())
    scales = json.loads(Path(args.reference).read_text())["scales"]
    table = build_spot_table(Path(args.data), [args.section], [genes[m] for m in MARKERS],
                             pipe.tile_size, pipe.mpp, max_spots=60, seed=args.seed)
    cellularity = np.argsort(table.tiles.mean(axis=(1, 2, 3)))[::-1]  # pale -> dense tissue
    rna_spots = pick_spots(cellularity, 2)
    stain_spots = pick_spots(cellularity, 3)
    mask = footprint_mask(pipe.tile_size, pipe.mpp)

    k = args.per_row
    guidance = pipe.default_guidance or None  # the scales a user of the model gets by default
    rows: list[tuple[str, list[tuple[np.ndarray, str]]]] = []
    for prompt in PROMPTS:
        tiles = pipe.generate(text=prompt, num_images=k, steps=args.steps, seed=args.seed,
                              guidance=guidance)
        label = "unconditional" if prompt is None else \
            f"text: {prompt.split('carcinoma, ')[-1].removeprefix('H&E, ')}"
        rows.append((label, [(t, "") for t in tiles]))
    for i in rna_spots:
        profile = table.profiles([i])[0]
        tiles = pipe.generate(rna=profile, num_images=k - 1, steps=args.steps, seed=args.seed,
                              guidance=guidance)
        rows.append((f"RNA of {args.section} spot {table.spot_ids[i]}",
                     [(table.tiles[i], "real tile")] + [(t, "generated") for t in tiles]))
    maps = pipe.translate(table.tiles[stain_spots], list(MARKERS), steps=1, seed=args.seed)
    for j, i in enumerate(stain_spots):
        cells: list[tuple[np.ndarray, str]] = [(table.tiles[i], f"{args.section} {table.spot_ids[i]}")]
        for m in MARKERS:
            value = float(table.expression.iloc[i][genes[m]])
            measured = np.where(mask, np.clip(value / scales[m], 0, 1), np.nan)
            pred = maps[m][j]
            cells += [(pred, f"{m} pred {pred[mask].mean():.2f}"),
                      (measured, f"{m} meas {value / scales[m]:.2f}")]
        rows.append(("H&E -> markers", cells))

    ncols = max(len(cells) for _, cells in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.6 * ncols, 1.75 * len(rows)), squeeze=False)
    for r, (label, cells) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            image, title = cells[c]
            if image.ndim == 2:
                ax.imshow(image, cmap="magma", vmin=0, vmax=1)
            else:
                ax.imshow(image)
            ax.set_title(title, fontsize=7)
        axes[r][0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(f"{Path(args.model).name}: text->H&E, RNA->H&E ({args.steps} Euler steps, "
                 f"guidance {', '.join(f'{m} {w:g}' for m, w in (guidance or {}).items()) or 'none'}), "
                 f"H&E->markers (one-step readout) on held-out {args.section}; markers 0-1 "
                 f"= log1p CPM / training scale", fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
