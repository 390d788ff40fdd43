"""One PNG per task: source / generated / ground truth side by side, the strongest baseline
beside MuPD where there is one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ..data.sections import masked_box  # noqa: E402


def _thumbnail(path: str, size: int = 512) -> tuple[np.ndarray, float]:
    """A small RGB view of a section image and its scale from the file's full-size pixels."""
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        width, height = im.size
        scale = size / max(width, height)
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced size
        im = im.convert("RGB").resize((round(width * scale), round(height * scale)))
        return np.asarray(im), scale


def marker_figure(markers: dict[str, Any], image_paths: dict[str, str], out: Path,
                  marker: str = "HER2") -> Path:
    names = list(markers["markers"])
    j = names.index(marker) if marker in names else 0
    sections = markers["sections"]
    fig, axes = plt.subplots(len(sections), 4, figsize=(16, 4 * len(sections)), squeeze=False)
    for row, (name, sec) in enumerate(sections.items()):
        baseline = max((*markers.get("learned_baselines", ["ridge"]), "hematoxylin density"),
                       key=lambda k: sec["methods"][k]["mean_r"]["mean"] or -1.0)  # strongest here
        cols = [f"{name}: source H&E", f"measured {names[j]} ({markers['markers'][names[j]]}, log1p CPM)",
                f"best baseline: {baseline}", "MuPD"]
        for col, title in enumerate(cols):
            axes[row, col].set_title(title, fontsize=10)
        thumb, scale = _thumbnail(image_paths[name])
        box = masked_box(name)
        if box is not None:  # e.g. the annotation thumbnail pasted into A1
            x0, y0, x1, y1 = (round(v * scale) for v in box)
            thumb = thumb.copy()
            thumb[y0:y1, x0:x1] = 0
        xy = np.asarray(sec["spot_xy"]) * scale
        preds = markers["_predictions"][name]
        axes[row, 0].imshow(thumb)
        axes[row, 0].set_ylabel(f"{name} (held out)")
        for col, key in enumerate(("measured", baseline, "MuPD"), start=1):
            ax = axes[row, col]
            ax.imshow(thumb, alpha=0.35)
            if key in preds:
                values = preds[key][:, j]
                sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=18, cmap="magma")
                fig.colorbar(sc, ax=ax, fraction=0.04)
                if key != "measured":
                    r = sec["methods"][key]["r"][names[j]]["mean"]
                    ax.set_xlabel(f"r = {r:.3f}" if r is not None else "r undefined")
            else:
                ax.text(0.5, 0.5, "no model given", ha="center", transform=ax.transAxes)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    return _save(fig, out / "fig-markers.png")


def tile_grid_figure(rows: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """Rows of tiles, one labelled row per set (e.g. real / generated / unconditional)."""
    rows = {k: v for k, v in rows.items() if len(v)}
    ncols = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2 * ncols, 2.2 * len(rows)), squeeze=False)
    for r, (label, tiles) in enumerate(rows.items()):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(tiles):
                ax.imshow(tiles[c])
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def augmentation_figure(aug: dict[str, Any], path: Path) -> Path:
    labels = list(aug["balanced_accuracy"]) + ["all training tiles"]
    means = [aug["balanced_accuracy"][k]["mean"] for k in aug["balanced_accuracy"]] + [aug["all_training_tiles"]]
    stds = [aug["balanced_accuracy"][k]["std"] or 0 for k in aug["balanced_accuracy"]] + [0]
    examples = aug.get("_examples", {})
    fig, axes = plt.subplots(1, 1 + len(examples), figsize=(5 + 4 * len(examples), 4), squeeze=False)
    ax = axes[0, 0]
    ax.bar(range(len(labels)), means, yerr=stds, capsize=4, color=["#888", "#c2185b", "#444"][:len(labels)])
    ax.axhline(aug["chance"], ls="--", c="k", lw=1)
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_ylabel(f"balanced accuracy on held-out {aug['marker']} high/low")
    for a, (label, tiles) in zip(axes[0, 1:], examples.items()):
        a.imshow(np.concatenate(list(tiles), axis=1))
        a.set_title(label, fontsize=9)
        a.set_xticks([]), a.set_yticks([])
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
