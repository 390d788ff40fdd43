"""quality.md, results.json and the figures from one results dict (undefined numbers stay
undefined: NaN becomes "undefined" in the tables and null in the JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .figures import augmentation_figure, marker_figure, tile_grid_figure


def fmt(value: Any) -> str:
    """A MeanStd dict, a float or None as table text."""
    if isinstance(value, dict):
        if not value.get("n"):
            return "undefined"
        if value["n"] == 1:
            return f"{value['mean']:.3f}"
        return f"{value['mean']:.3f} ± {value['std']:.3f}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined"
    return f"{value:.3f}"


def ci(interval: Any) -> str:
    """ ' [lo, hi]' for a defined interval, '' otherwise."""
    if not interval or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in interval):
        return ""
    return f" [{interval[0]:.2f}, {interval[1]:.2f}]"


def public(results: Any) -> Any:
    """Results without private (`_`) keys and with NaN as None, for JSON."""
    if isinstance(results, dict):
        return {k: public(v) for k, v in results.items() if not str(k).startswith("_")}
    if isinstance(results, (list, tuple)):
        return [public(v) for v in results]
    if isinstance(results, (float, np.floating)):
        return None if math.isnan(results) else float(results)
    if isinstance(results, np.integer):
        return int(results)
    return results


def write_report(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(public(results), indent=1))
    figures = _figures(results, out)
    (out / "quality.md").write_text(render_markdown(results, figures))
    return out / "quality.md"


def _scored(r: dict[str, Any]) -> str:
    """What the report scores, in words: "held-out B4" or "validation C6"."""
    return f"{'validation' if r['split'].get('validation') else 'held-out'} {r['split']['primary_heldout']}"


def _figures(results: dict[str, Any], out: Path) -> dict[str, str]:
    paths = {}
    if "markers" in results:
        m = results["markers"]
        paths["markers"] = marker_figure(m, m["_image_paths"], out)
    rna = results.get("rna_to_he", {}).get("_examples")
    if rna is not None:
        paths["rna_to_he"] = tile_grid_figure(
            {"ground truth: real tile of the spot": rna.get("real (same spots)", []),
             "MuPD from the spot's RNA": rna.get("MuPD (RNA)", []),
             "MuPD unconditional (baseline)": rna.get("MuPD (unconditional)", [])},
            f"RNA -> H&E on {_scored(results)} spots", out / "fig-rna-to-he.png")
    text = results.get("text_to_he", {}).get("_examples")
    if text:
        paths["text_to_he"] = tile_grid_figure(dict(text), f"text -> H&E: real {_scored(results)} tiles "
                                               "of each class, MuPD tiles for its prompt\n"
                                               f"({results['text_to_he']['prompt_template']})",
                                               out / "fig-text-to-he.png")
    if "augmentation" in results:
        paths["augmentation"] = augmentation_figure(results["augmentation"], out / "fig-augmentation.png")
    return {k: Path(v).name for k, v in paths.items()}


def render_markdown(r: dict[str, Any], figures: dict[str, str]) -> str:
    has_model = r["model"] is not None
    seeds = ", ".join(map(str, r["seeds"]))
    lines = [
        "# MuPD validation report (a training patient's left-out section, not a held-out test)"
        if r["split"].get("validation") else "# MuPD quality report",
        "",
        f"- Model: `{r['model']}`" if has_model else "- Model: none (baselines, floors and scorer ceilings only)",
        f"- Run: {'QUICK (reduced spots/tiles: smoke numbers, not results)' if r['quick'] else 'full'}; "
        f"{r['seconds']} s",
        f"- Split: {r['split']['rule']}. Train sections {', '.join(r['split']['train'])}; "
        f"scored {', '.join(r['split']['heldout'])} (primary {r['split']['primary_heldout']}).",
        f"- Tiles: {r['tile_size']} px at {r['mpp']} um/px, centred on spots; each section is resampled "
        "from its own mpp (measured from the 200 um spot pitch) to this one.",
        f"- Seeds: {seeds}. Mean ± std over seeds; deterministic methods (ridge, training mean, "
        "scorers on real tiles) are fitted once and shown without ± .",
        f"- Feature spaces: handcrafted ({len(r['feature_extractor']['handcrafted'])} features, "
        "named in `mupd/eval/features.py` and in results.json)"
        + (f"; {r['feature_extractor']['inception']} (FID, KID)" if r['feature_extractor'].get('inception') else "")
        + (f"; {r['feature_extractor']['efficientnet']} (ridge baseline)"
           if r['feature_extractor'].get('efficientnet') else "")
        + (f"; encoder `{r['feature_extractor']['encoder']}`." if r['feature_extractor']['encoder'] else
           "; no encoder given (`--encoder DIR` adds one)."),
        "",
    ]
    if r.get("stain_norm"):
        lines[-1:-1] = [f"- Stain normalisation: the model read every tile after `{r['stain_norm']}` "
                        "normalisation onto the training stain, fitted per section "
                        "(`mupd.stain_norm`); the baselines read the tiles as they are."]
    if r.get("guidance"):
        lines[-1:-1] = ["- Guidance: " + ", ".join(f"{k} {w:g}" for k, w in r["guidance"].items())
                        + " on every translate / generate call (1 = the model as trained)."]
    if r.get("tasks") and len(r["tasks"]) < 4:
        lines[-1:-1] = [f"- Tasks: {', '.join(r['tasks'])} only (a partial report)."]
    lines += _summary_md(r, has_model)
    for key, part in (("markers", _markers_md), ("rna_to_he", _rna_md), ("text_to_he", _text_md),
                      ("augmentation", _augment_md)):
        if key in r:
            lines += part(r[key], has_model, _scored(r))
    lines += ["## Figures", ""] + [f"![{k}]({v})" for k, v in figures.items()] + [""]
    return "\n".join(lines)


def _summary_md(r: dict[str, Any], has_model: bool) -> list[str]:
    """The headline numbers, each beside the strongest baseline for it."""
    lines = ["## Summary", ""]
    for name, sec in r.get("markers", {}).get("sections", {}).items():
        methods = sec["methods"]
        baselines = {k: methods[k]["mean_r"]["mean"] for k in (*_learned(r["markers"]), "hematoxylin density")}
        best = max(baselines, key=lambda k: -1.0 if baselines[k] is None else baselines[k])
        text = (f"- {name} marker staining, spot-level mean r over markers: best baseline {best} "
                f"{fmt(methods[best]['mean_r'])}")
        if has_model:
            text += f"; MuPD {fmt(methods['MuPD']['mean_r'])} over {methods['MuPD']['n_seeds']} seeds"
            lo_hi = sec.get("mupd_minus_baseline_mean_r_ci95", {}).get(best)
            if lo_hi and None not in lo_hi:
                text += f" (MuPD minus {best}: [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}])"
        lines.append(text + ".")
    g = r.get("rna_to_he", {"fd": {}})
    if "handcrafted" in g["fd"]:
        lines.append(f"- RNA->H&E, {g['n_per_set']} tiles per set, FD (handcrafted): "
                     + "; ".join(f"{k} {fmt(v)}" for k, v in g["fd"]["handcrafted"].items()) + ".")
    if "inception" in g["fd"]:
        lines.append(f"- RNA->H&E, {g['n_per_set']} tiles per set, FID / KID x 10^3 (Inception): "
                     + "; ".join(f"{k} {fmt(v)} / {fmt_kid(g['kid']['inception'][k])}"
                                 for k, v in g["fd"]["inception"].items()) + ".")
    aug = r.get("augmentation", {}).get("balanced_accuracy")
    if aug:
        lines.append("- Augmentation balanced accuracy: " + "; ".join(f"{k} {fmt(v)}" for k, v in aug.items()) + ".")
    return lines + [""]


def _learned(m: dict[str, Any]) -> list[str]:
    """The learned (ridge) baselines of a marker result, handcrafted ridge first."""
    return list(m.get("learned_baselines", ["ridge"]))


def fmt_kid(value: Any) -> str:
    """KID (a MeanStd dict) x 10^3, the usual scale (a raw KID floor rounds to 0.000)."""
    if isinstance(value, dict) and value.get("n"):
        value = {**value, "mean": value["mean"] * 1e3, "std": value["std"] * 1e3}
    return fmt(value)


def _markers_md(m: dict[str, Any], has_model: bool, scored: str) -> list[str]:
    learned = _learned(m)
    methods = (["MuPD"] if has_model else []) + learned + ["hematoxylin density", "training-mean"]
    cnn = [k for k in learned if k != "ridge"]
    lines = [
        f"## 1. Virtual marker staining ({scored} spots)",
        "",
        "Spot level: Pearson r per marker between the prediction (MuPD: marker map averaged over "
        "the 100 um spot footprint) and log1p(CPM) of the marker's gene. The training-mean "
        "predictor is constant, so its r is **undefined** (not 0); its MSE is given instead. "
        "Hematoxylin density (untrained: the tile's mean hematoxylin optical density, one number "
        "for every marker) is the cellularity baseline a marker prediction has to beat. "
        "MSE is in log1p(CPM) units (MuPD's [0, 1] intensities mapped by a per-marker linear fit on "
        f"{m['calibration_spots']} training spots). Ridge (on the handcrafted features"
        + (f"; {', '.join(cnn)}: on ImageNet EfficientNet-Lite0 global-pooled features, fitted the "
           "same way" if cnn else "")
        + f"): {m['n_train_spots']} training spots, penalty per marker by cross-validation grouped "
        "by section (GroupKFold), inside patient C only.",
        "",
    ]
    for name, sec in m["sections"].items():
        lines += [f"### {name}: {sec['n_spots']} spots, source {sec['source_mpp']} um/px", ""]
        if sec["absent_genes"]:
            lines += [f"Genes with no counts in {name} (measured 0, r undefined): "
                      f"{', '.join(sec['absent_genes'])}.", ""]
        partial = [k for k in methods if "partial_r_given_depth" in sec["methods"][k]]
        lines += ["| marker (gene) | " + " | ".join(f"r {k}" for k in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for marker, gene in m["markers"].items():
            lines.append(f"| {marker} ({gene}) | " + " | ".join(
                fmt(sec["methods"][k]["r"][marker]) + ci(sec["methods"][k].get("r_ci95", {}).get(marker))
                for k in methods) + " |")
        lines.append("| **mean over markers** | " + " | ".join(
            fmt(sec["methods"][k]["mean_r"]) + ci(sec["methods"][k].get("mean_r_ci95")) for k in methods) + " |")
        lines.append(f"| **slide level r** ({sec['slide_level_points']} points) | "
                     + " | ".join(fmt(sec["methods"][k]["slide_r"]) for k in methods) + " |")
        lines += ["", "| marker | r measured vs log depth | "
                  + " | ".join(f"partial r {k} given depth" for k in partial) + " | "
                  + " | ".join(f"MSE {k}" for k in methods) + " |",
                  "|---|---|" + "---|" * (len(partial) + len(methods))]
        for marker in m["markers"]:
            cells = [fmt(sec["measured_r_with_log_depth"][marker])]
            cells += [fmt(sec["methods"][k]["partial_r_given_depth"][marker]) for k in partial]
            cells += [fmt(sec["methods"][k]["mse"][marker]) for k in methods]
            lines.append(f"| {marker} | " + " | ".join(cells) + " |")
        lines.append("")
        block = [k for k in methods if "block_r" in sec["methods"][k]]
        lines += [f"Block level ({sec['n_blocks']} blocks of 600 um, pooled counts):", "",
                  "| marker | " + " | ".join(f"block r {k}" for k in block) + " |",
                  "|---|" + "---|" * len(block)]
        for marker in m["markers"]:
            lines.append(f"| {marker} | " + " | ".join(fmt(sec["methods"][k]["block_r"][marker]) for k in block) + " |")
        lines.append("| **mean** | " + " | ".join(fmt(sec["methods"][k]["block_mean_r"]) for k in block) + " |")
        lines.append("")
        for baseline, (lo, hi) in sec.get("mupd_minus_baseline_mean_r_ci95", {}).items():
            if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
                lines += [f"MuPD minus {baseline}, mean r over markers: undefined.", ""]
                continue
            verdict = "MuPD better" if lo > 0 else f"{baseline} better" if hi < 0 else "no clear difference"
            lines += [f"MuPD minus {baseline}, mean r over markers: 95% interval [{lo:.3f}, {hi:.3f}] "
                      f"({verdict}).", ""]
    lines += [
        "Depth check: spot depth follows cellularity, which the image shows; the last columns give "
        "the measurement's r with log spot depth and each method's partial r with log depth "
        "regressed out. A method whose r vanishes there predicts cellularity, not the marker.",
        "",
        "Brackets: 95% block-bootstrap interval (whole 3x3-spot, 600 um blocks resampled; "
        "MuPD's from its prediction averaged over seeds).",
        "",
        "Slide level (our definition): per scored section, Pearson r across the markers between "
        "the predicted and measured deviation of the section from the training patient (mean "
        "prediction on the section minus on training spots, vs pseudo-bulk log1p CPM of the "
        "section minus of the training spots, both over the training std of the gene). It rests "
        "on as many points as markers, for one section, so it is coarse.",
        "",
        f"Context only, not like-for-like: the MuPD paper reports mIF patch-level r "
        f"{m['paper_context']['patch_level_r']} and slide-level r {m['paper_context']['slide_level_r']} "
        "on its own data (protein mIF, not spot RNA).",
        "",
    ]
    return lines


def _rna_md(g: dict[str, Any], has_model: bool, scored: str) -> list[str]:
    spaces = list(g["fd"])
    kids = g.get("kid", {})
    columns = [(s, kind) for s in spaces for kind in (("fd", "kid") if s in kids else ("fd",))]
    header = [("KID x 10^3" if kind == "kid" else "FID" if s == "inception" else "FD") + f" {s}"
              for s, kind in columns]
    n_seeds = len(g["seeds"])
    lines = [
        f"## 2. RNA -> H&E ({scored})",
        "",
        f"Distances to one half of the real held-out tiles: **{g['n_per_set']} tiles per set** "
        f"(two disjoint halves of {g.get('n_heldout_tiles', 'the')} {scored} tiles, redrawn per "
        f"seed, mean ± std over {n_seeds} seeds); the other half is the real-vs-real floor. Lower is "
        "better; a generator cannot be expected to go below the floor.",
        "",
    ]
    names = g.get("feature_spaces", {})
    for s in spaces:
        if names.get(s):
            lines.append(f"- {s}: {names[s]}")
    if "inception" in spaces:
        lines += ["", "FID at this n is biased upward: its bias falls as 1/n with a large constant in "
                  "2048 dimensions (and n < 2048 leaves the covariances singular), so even the "
                  "real-vs-real floor is far from 0. Compare it only at equal n and against the "
                  "floor, never with published FIDs (n = 10-50k). KID, unbiased (cubic polynomial "
                  "kernel, Binkowski et al. 2018), is given beside it: its floor is about 0."]
    lines += [
        "",
        "| set vs real half | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for key in g["fd"][spaces[0]]:
        lines.append(f"| {key} | " + " | ".join(fmt_kid(kids[s][key]) if kind == "kid" else fmt(g["fd"][s][key])
                                                for s, kind in columns) + " |")
    lines += [
        "",
        "RNA alignment: mean over marker genes of the Pearson r between the ridge H&E->RNA "
        "scorer's prediction from a tile and the RNA that tile belongs to (generated: the RNA it "
        "was conditioned on).",
        "",
        "| tiles | alignment r |", "|---|---|",
    ] + [f"| {k} | {fmt(v)} |" for k, v in g["alignment"].items()] + [""]
    if not has_model:
        lines += ["No model given: only the real-vs-real floor and the scorer on real tiles.", ""]
    return lines


def _text_md(t: dict[str, Any], has_model: bool, scored: str) -> list[str]:
    lines = [
        "## 3. Text -> H&E",
        "",
        f"Prompts: `{t['prompt_template']}` with level high / low; {t['n_per_prompt']} tiles per "
        "prompt and seed. A logistic scorer per attribute (trained on training tiles, labels: gene "
        "above / below its section median) classifies each generated tile; agreement is the "
        "fraction classified as prompted (chance 0.5). The scorer's balanced accuracy on " + scored + " "
        "real tiles bounds what this measurement can see.",
        "",
        f"| attribute (gene) | scorer on real {scored} tiles | agreement high | agreement low | mean |",
        "|---|---|---|---|---|",
    ]
    for marker, e in t["attributes"].items():
        agree = e.get("prompt_agreement", {})
        cells = [fmt(v) if has_model else "not run (no model)"
                 for v in (agree.get("high"), agree.get("low"), e.get("prompt_agreement_mean"))]
        lines.append(f"| {marker} ({e['gene']}) | {fmt(e['scorer_heldout_balanced_accuracy'])} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def _augment_md(a: dict[str, Any], has_model: bool, scored: str) -> list[str]:
    lines = [
        "## 4. Synthetic augmentation",
        "",
        f"{a['marker']} ({a['gene']}) high vs low (section-wise top vs bottom third), "
        f"{a['shots_per_class']} real training tiles per class, plus {a['synthetic_per_class']} "
        f"MuPD tiles per class generated from other training spots' RNA. Balanced accuracy on "
        f"{a['n_test']} {scored} spots, chance {a['chance']}.",
        "",
        "| classifier | balanced accuracy |", "|---|---|",
    ] + [f"| {k} | {fmt(v)} |" for k, v in a["balanced_accuracy"].items()]
    lines.append(f"| all {a['n_all_training_tiles']} labelled training tiles (reference) | "
                 f"{fmt(a['all_training_tiles'])} |")
    return lines + [""]
