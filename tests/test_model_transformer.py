"""MuPDTransformer: shapes for every modality combination and config, and the DCA contracts
(scale 0 = model without the stream; absent modality skipped per sample, never padded)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mupd.models.attention import MODALITIES
from mupd.models.configs import CONFIGS, model_config
from mupd.models.transformer import MuPDTransformer

LAT, CH, GENES, TEXT_DIM = 8, 12, 20, 16


def small_model(seed: int = 0, pooled: bool = False) -> MuPDTransformer:
    """A small transformer whose zero-initialised layers (adaLN-Zero gates, cross-attention and
    final projections) are randomised, so every condition reaches the output."""
    torch.manual_seed(seed)
    model = MuPDTransformer(latent_channels=CH, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                            text_dim=TEXT_DIM, num_genes=GENES, rna_group_size=4, cond_dim=24,
                            reference_grid=2, pooled_conditioning=pooled)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return model.eval()


def conditions(b: int, modalities, gen: torch.Generator) -> dict:
    kw: dict = {}
    if "text" in modalities:
        kw["text"] = torch.randn(b, 5, TEXT_DIM, generator=gen)
        kw["text_mask"] = torch.ones(b, 5, dtype=torch.bool)
    if "rna" in modalities:
        kw["rna_values"] = torch.randn(b, GENES, generator=gen)
        kw["rna_mask"] = torch.rand(b, GENES, generator=gen) > 0.3
    if "reference" in modalities:
        kw["reference"] = torch.randn(b, CH, LAT, LAT, generator=gen)
    return kw


def inputs(b: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, CH, LAT, LAT, generator=gen), torch.rand(b, generator=gen),
            torch.tensor([0, 3, 1, 2][:b]), gen)


COMBINATIONS = [c for r in range(len(MODALITIES) + 1) for c in itertools.combinations(MODALITIES, r)]


@pytest.mark.parametrize("with_source", [False, True])
@pytest.mark.parametrize("modalities", COMBINATIONS, ids=lambda c: "+".join(c) or "none")
def test_every_modality_combination_gives_velocity_of_latent_shape(modalities, with_source):
    model = small_model()
    x, t, stain, gen = inputs(3)
    source = torch.randn(3, CH, LAT, LAT, generator=gen) if with_source else None
    kw = conditions(3, modalities, gen)
    out = model(x, t, stain, source=source, **kw)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    bare = model(x, t, stain, source=source)
    assert torch.equal(out, bare) == (not modalities)  # each condition changes the velocity


def test_bfloat16_weights_give_bfloat16_velocity():
    model = small_model().to(torch.bfloat16)
    x, t, stain, gen = inputs(2)
    out = model(x.bfloat16(), t, stain, **conditions(2, MODALITIES, gen))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("pooled", [False, True], ids=["dca", "dca+pooled"])
@pytest.mark.parametrize("modality", MODALITIES)
def test_scale_zero_is_exactly_the_model_without_that_stream(modality, pooled):
    model = small_model(pooled=pooled)
    x, t, stain, gen = inputs(3)
    kw = conditions(3, MODALITIES, gen)
    without = {k: v for k, v in kw.items() if not k.startswith(modality)}
    zero = model(x, t, stain, scales={modality: 0.0}, **kw)
    assert torch.equal(zero, model(x, t, stain, **without))
    assert not torch.allclose(zero, model(x, t, stain, scales={modality: 0.5}, **kw))
    assert not torch.allclose(zero, model(x, t, stain, **kw))


@pytest.mark.parametrize("pooled", [False, True], ids=["dca", "dca+pooled"])
def test_a_sample_without_a_modality_is_unaffected_by_its_batch_mates(pooled):
    """Skipping, not padding: sample 1 has no text and no RNA; computed alone (where the
    streams are not run at all) it must equal its row of the mixed batch."""
    model = small_model(pooled=pooled)
    x, t, stain, gen = inputs(3)
    kw = conditions(3, ("text", "rna"), gen)
    kw["text_mask"][1] = False
    kw["rna_mask"][1] = False
    mixed = model(x, t, stain, **kw)
    alone = model(x[1:2], t[1:2], stain[1:2])
    torch.testing.assert_close(mixed[1:2], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooled", [False, True], ids=["dca", "dca+pooled"])
def test_padding_tokens_and_unmeasured_genes_do_not_leak(pooled):
    model = small_model(pooled=pooled)
    x, t, stain, gen = inputs(2)
    kw = conditions(2, ("text", "rna"), gen)
    base = model(x, t, stain, **kw)
    padded = dict(kw, text=torch.cat([kw["text"], torch.randn(2, 3, TEXT_DIM, generator=gen)], 1),
                  text_mask=torch.cat([kw["text_mask"], torch.zeros(2, 3, dtype=torch.bool)], 1))
    torch.testing.assert_close(model(x, t, stain, **padded), base, rtol=1e-5, atol=1e-6)
    noisy = kw["rna_values"].clone()
    noisy[~kw["rna_mask"]] = 1e3  # values of genes marked missing must not matter
    assert torch.equal(model(x, t, stain, **dict(kw, rna_values=noisy)), base)


def test_pooled_conditions_reach_the_tile_without_cross_attention():
    """The pooled path alone (every cross-attention output projection zeroed) still makes the
    velocity depend on the RNA and on the text; without it the same model ignores them."""
    x, t, stain, gen = inputs(2)
    kw = conditions(2, ("text", "rna"), gen)
    for pooled in (False, True):
        model = small_model(pooled=pooled)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "cross_out" in name:
                    p.zero_()
        assert torch.equal(model(x, t, stain, **kw), model(x, t, stain)) != pooled


def test_fresh_model_is_adaln_zero():
    """Zero-initialised final layer and gates: a fresh model predicts zero velocity, which is
    what makes the untrained loss the plain E||noise - x0||^2."""
    torch.manual_seed(0)
    model = MuPDTransformer(latent_channels=CH, hidden_size=32, depth=1, num_heads=2,
                            text_dim=TEXT_DIM, num_genes=GENES, rna_group_size=4)
    x, t, stain, gen = inputs(2)
    assert not model(x, t, stain, **conditions(2, MODALITIES, gen)).any()


def test_transformer_save_load_round_trip(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path / "t")
    assert (tmp_path / "t" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = MuPDTransformer.from_pretrained(tmp_path / "t", use_safetensors=True).eval()
    x, t, stain, gen = inputs(2)
    kw = conditions(2, MODALITIES, gen)
    assert torch.equal(model(x, t, stain, **kw), loaded(x, t, stain, **kw))


# -- the config family ---------------------------------------------------------------------
EXPECTED_PARAMS = {"tiny": (2e6, 10e6), "base": (0.1e9, 0.3e9), "xl": (0.6e9, 0.8e9)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_family_sizes_and_forward_on_meta(name):
    config = model_config(name)
    latent_channels = 48 if config["codec"]["type"] == "pixel" else 4
    down = config["codec"].get("factor", 8)
    with torch.device("meta"):
        model = MuPDTransformer(latent_channels=latent_channels, text_dim=384, num_genes=785,
                                rna_group_size=config["rna_group_size"], **config["transformer"])
        lat = config["tile_size"] // down
        x = torch.randn(2, latent_channels, lat, lat)
        out = model(x, torch.rand(2), torch.zeros(2, dtype=torch.long), source=x,
                    text=torch.randn(2, 7, 384), text_mask=torch.ones(2, 7, dtype=torch.bool),
                    rna_values=torch.randn(2, 785), rna_mask=torch.ones(2, 785, dtype=torch.bool),
                    reference=x)
    assert out.shape == x.shape
    low, high = EXPECTED_PARAMS[name]
    assert low < sum(p.numel() for p in model.parameters()) < high


def test_tiny_transformer_forward_on_cpu_at_its_tile_size():
    config = model_config("tiny")
    torch.manual_seed(0)
    model = MuPDTransformer(latent_channels=48, text_dim=384, num_genes=64, **config["transformer"])
    lat = config["tile_size"] // config["codec"]["factor"]
    with torch.no_grad():
        out = model(torch.randn(2, 48, lat, lat), torch.rand(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 48, lat, lat)
