"""`model.base` with new transformer options: a warm start that keeps every trained weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mupd.errors import ModelError
from mupd.pipeline import MuPDPipeline
from mupd.train.config import ModelSection
from mupd.train.run import load_pipeline


@pytest.fixture
def base(tmp_path):
    """A small trained-looking model folder: zero-initialised layers randomised, so text and RNA
    reach the output through cross-attention."""
    pipe = MuPDPipeline.from_config_name("tiny", tile_size=32, hidden_size=48, depth=1, num_heads=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return pipe.save_pretrained(tmp_path / "base")


def _sample(pipe):
    rna = {g: float(i % 7) for i, g in enumerate(pipe.rna_tokenizer.genes)}
    return pipe.generate(text="HER2-high carcinoma", rna=rna, num_images=2, steps=2, seed=1,
                         guidance={"text": 2.0, "rna": 2.0})


def test_pooled_conditioning_is_added_to_a_trained_model_without_changing_it(base, tmp_path):
    before = _sample(MuPDPipeline.from_pretrained(base))
    warm = load_pipeline(ModelSection(base=str(base), overrides={"pooled_conditioning": True}))
    assert warm.transformer.pooled is not None and warm.transformer.config.pooled_conditioning
    np.testing.assert_array_equal(_sample(warm), before)  # zero output layers: the base, exactly
    # ...and the new path learns: its output layer gets a gradient from the first step
    x = torch.randn(2, warm.transformer.config.latent_channels, 8, 8)
    text, mask = warm.text_encoder.encode(["HER2-high carcinoma"] * 2)
    out = warm.transformer(x, torch.rand(2), torch.zeros(2, dtype=torch.long), text=text, text_mask=mask)
    out.square().mean().backward()
    assert warm.transformer.pooled["text"][-1].weight.grad.abs().sum() > 0
    again = MuPDPipeline.from_pretrained(warm.save_pretrained(tmp_path / "warm"))
    assert again.transformer.pooled is not None  # the option is saved with the weights


@pytest.mark.parametrize("overrides, named", [
    ({"hidden_size": 64}, "hidden_size"), ({"marker_codec": "area"}, "marker_codec")])
def test_other_overrides_of_a_trained_model_are_refused_not_ignored(base, overrides, named):
    with pytest.raises(ModelError, match=f"{named} cannot change a trained model"):
        load_pipeline(ModelSection(base=str(base), overrides=overrides))
