"""Held-out evaluation of MuPD against baselines (`mupd eval`; docs/evaluation.md).

metrics: Pearson (undefined stays undefined), Frechet distance, block bootstrap, mean ± std.
features: the named handcrafted feature space. baselines: training mean, ridge, logistic.
heldout / spots: HER2ST sections and spot tables on the patient-level split.
markers, generation, augment: the tasks. report, figures: quality.md, results.json, PNGs.
run: `run_evaluation(model, out, EvalSettings(...))`, the one entry point.
"""
