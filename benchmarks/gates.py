"""The model issue's gates (a)-(g) and the shipping comparison, from two `mupd eval` results.

    .venv/bin/python benchmarks/gates.py CANDIDATE/results.json [BUNDLED/results.json ...]

A model evaluated in parts (`mupd eval --tasks`, e.g. markers one day and generation the next)
is given as several results files; their tasks are joined, their settings must agree.

Prints one markdown table: each gate's value for both models, whether it is met, and which model
is better by more than the seed spread (the larger of the two seed stds; ties otherwise). Both
results must come from the same evaluation (same tiles, feature spaces and markers): checked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

DENSITY = "hematoxylin density"
#: The task sections of a results file (`mupd eval --tasks` writes the ones it ran).
TASK_KEYS = ("markers", "rna_to_he", "text_to_he", "augmentation")


def _mean_partial(method: dict[str, Any]) -> float:
    values = [v for v in method["partial_r_given_depth"].values() if v is not None]
    return sum(values) / len(values)


def _value(v: Any) -> float:
    return float(v["mean"]) if isinstance(v, dict) else float(v)


def gates(r: dict[str, Any]) -> dict[str, tuple[float, Optional[float], bool, bool]]:
    """name -> (value, seed std or None, met, higher is better); the gates of the tasks the
    report ran (`mupd eval --tasks`), the others left out."""
    out: dict[str, tuple[float, Optional[float], bool, bool]] = {}
    if "markers" in r:
        b4, a1 = (r["markers"]["sections"][s]["methods"] for s in ("B4", "A1"))
        diff = r["markers"]["sections"]["B4"]["mupd_minus_baseline_mean_r_ci95"][DENSITY]
        mu = b4["MuPD"]["mean_r"]
        out["(a) B4 mean r (vs density; diff CI > 0)"] = (mu["mean"], mu["std"], diff[0] > 0, True)
        out["(b) B4 mean partial r given depth (> density's)"] = (
            _mean_partial(b4["MuPD"]), None, _mean_partial(b4["MuPD"]) > _mean_partial(b4[DENSITY]), True)
        out["(c) A1 mean r (>= 0.15)"] = (a1["MuPD"]["mean_r"]["mean"], a1["MuPD"]["mean_r"]["std"],
                                          a1["MuPD"]["mean_r"]["mean"] >= 0.15, True)
    if "rna_to_he" in r:
        align = r["rna_to_he"]["alignment"]["MuPD (RNA)"]
        fid = r["rna_to_he"]["fd"]["inception"]
        ratio = fid["MuPD (RNA)"]["mean"] / fid["MuPD (unconditional)"]["mean"]
        out["(d) RNA alignment (>= 0.10)"] = (align["mean"], align["std"], align["mean"] >= 0.10, True)
        out["(e) Inception FID RNA / unconditional (<= 0.77)"] = (ratio, None, ratio <= 0.77, False)
    if "text_to_he" in r:
        text = sorted((a["prompt_agreement_mean"]["mean"] for a in r["text_to_he"]["attributes"].values()),
                      reverse=True)
        out["(f) text agreement, 2nd best attribute (>= 0.6)"] = (text[1], None, text[1] >= 0.6, True)
    if "augmentation" in r:
        aug = r["augmentation"]["balanced_accuracy"]
        real, synth = aug["real few-shot"], aug["real few-shot + MuPD synthetic"]
        out["(g) augmentation gain (> seed std)"] = (synth["mean"] - real["mean"], real["std"],
                                                     synth["mean"] - real["mean"] > real["std"], True)
    if "rna_to_he" in r:
        fid = r["rna_to_he"]["fd"]["inception"]
        out["Inception FID, RNA-conditioned"] = (fid["MuPD (RNA)"]["mean"], fid["MuPD (RNA)"]["std"], True, False)
    if "markers" in r:
        out["B4 hematoxylin density mean r (baseline, same run)"] = (
            _value(r["markers"]["sections"]["B4"]["methods"][DENSITY]["mean_r"]), None, True, True)
    return out


def _same_evaluation(a: dict[str, Any], b: dict[str, Any]) -> None:
    keys = ("markers", "rna_tiles", "n_tiles", "steps", "prompt", "seeds")
    sa, sb = a["settings"], b["settings"]
    differ = [k for k in keys if sa.get(k) != sb.get(k)]
    if differ or a["tile_size"] != b["tile_size"] or a["mpp"] != b["mpp"]:
        raise SystemExit(f"not the same evaluation: settings {differ} or tile geometry differ")


def _load(paths: list[Path]) -> dict[str, Any]:
    """One model's results from one or more partial reports of the same evaluation."""
    parts = [json.loads(p.read_text()) for p in paths]
    merged = dict(parts[0])
    for part in parts[1:]:
        _same_evaluation(merged, part)
        if Path(part["model"]).name != Path(merged["model"]).name:  # the folder may have moved
            raise SystemExit(f"reports of two models joined: {merged['model']} and {part['model']}")
        merged.update({k: v for k, v in part.items() if k in TASK_KEYS})
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("candidate", type=Path)
    parser.add_argument("bundled", type=Path, nargs="*", help="omit: the candidate's gates alone")
    args = parser.parse_args()
    cand = json.loads(args.candidate.read_text())
    if not args.bundled:
        print("| gate | value | met |\n|---|---|---|")
        for name, (v, s, met, _) in gates(cand).items():
            print(f"| {name} | {v:.3f}" + (f" ± {s:.3f}" if s is not None else "") +
                  f" | {'yes' if met else 'no'} |")
        return
    base = _load(args.bundled)
    _same_evaluation(cand, base)
    gc, gb = gates(cand), gates(base)
    fmt = lambda v, s: f"{v:.3f}" + (f" ± {s:.3f}" if s is not None else "")  # noqa: E731
    print(f"| gate | candidate ({cand['model']}) | met | bundled ({base['model']}) | met | better |")
    print("|---|---|---|---|---|---|")
    wins = losses = 0
    for name, (v, s, met, higher) in gc.items():
        if name not in gb:
            continue
        bv, bs, bmet, _ = gb[name]
        spread = max(s or 0.0, bs or 0.0)
        better = "tie"
        if not name.startswith("B4 hematoxylin"):
            if (v - bv if higher else bv - v) > spread:
                better, wins = "candidate", wins + name.startswith("(")
            elif (bv - v if higher else v - bv) > spread:
                better, losses = "bundled", losses + name.startswith("(")
        print(f"| {name} | {fmt(v, s)} | {'yes' if met else 'no'} | {fmt(bv, bs)} | "
              f"{'yes' if bmet else 'no'} | {better} |")
    measured = [n[1] for n in gc if n.startswith("(") and n in gb]
    print(f"\nCandidate better on {wins} of ({', '.join(measured)}), worse on {losses} (by more than "
          "the seed spread)." + ("" if len(measured) == 7 else " A partial evaluation: the other gates "
                                  "were not measured."))


if __name__ == "__main__":
    main()
