"""The one-step translation readout is trained, x0 prediction, and a short run tells stains and
sources apart (the bundled model once predicted the same map for every marker and every tile:
its training never reached t = 1, the only timestep where the source must carry the answer)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mupd.errors import ModelError
from mupd.pipeline import MuPDPipeline
from mupd.train.loss import FlowMatchingObjective

T = 32


def small(**overrides) -> MuPDPipeline:
    torch.manual_seed(0)
    return MuPDPipeline.from_config_name("tiny", tile_size=T, hidden_size=48, depth=2, num_heads=2,
                                         cond_dim=48, **overrides)


class Recorder(torch.nn.Module):
    """Stands in for the transformer: records timesteps, outputs a constant."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(float(value)))
        self.config = SimpleNamespace(max_stains=64)
        self.seen: list[torch.Tensor] = []

    def forward(self, sample, timestep, **kwargs):
        self.seen.append(timestep.detach().clone())
        return torch.zeros_like(sample) + self.value


def grey(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, 3, T, T)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_translation_samples_are_trained_at_the_readout(fraction):
    pipe = small(readout_fraction=fraction)
    model = Recorder()
    x = grey(np.linspace(-0.8, 0.8, 8))
    present = torch.tensor([True, False] * 4)
    for batch in ({"target": x, "stain": ["Ki67"] * 8, "source": x},
                  {"target": x, "stain": ["Ki67", "H&E"] * 4, "source": x, "source_present": present},
                  {"target": x, "stain": ["H&E"] * 8}):
        FlowMatchingObjective(pipe).training_loss(batch, model=model, generator=torch.Generator().manual_seed(1))
    translate, mixed, generate = model.seen
    assert bool((translate == 1).all()) == (fraction == 1.0)
    assert not bool((translate == 1).any()) or fraction > 0
    assert bool((mixed[present] == 1).all()) == (fraction == 1.0)
    assert not bool((mixed[~present] == 1).any())  # generation samples keep logit-normal t
    assert not bool((generate == 1).any())


def test_x0_prediction_readout_and_sampling_return_the_predicted_map():
    pipe = small(prediction="x0")
    pipe.transformer = Recorder(0.2)  # predicts x0 = 0.2 everywhere -> marker 0.6
    tiles = np.full((2, T, T, 3), 128, np.uint8)
    for steps in (1, 3):
        maps = pipe.translate(tiles, ["Ki67"], steps=steps)["Ki67"]
        np.testing.assert_allclose(maps, 0.6, atol=1e-5)
    velocity = small()
    velocity.transformer = Recorder(0.2)  # a velocity of 0.2: readout noise - 0.2, not 0.6
    assert abs(float(velocity.translate(tiles, ["Ki67"])["Ki67"].mean()) - 0.6) > 0.05
    with pytest.raises(ModelError, match="prediction 'eps' unknown"):
        small(prediction="eps")


def test_short_run_learns_marker_from_stain_and_source():
    """Target: one value per tile, from the source's brightness, inverted for one stain."""
    pipe = small(prediction="x0", readout_fraction=1.0)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    level = rng.uniform(0.1, 0.9, 64)
    tiles = np.clip(level[:, None, None, None] * 255 + rng.normal(0, 20, (64, T, T, 3)), 0, 255)
    tiles = tiles.astype(np.uint8)
    truth = {"Ki67": level, "CD45": 1 - level}
    optimizer = torch.optim.AdamW(pipe.transformer.parameters(), lr=2e-3)
    for _ in range(120):
        idx = rng.choice(48, 8)  # tiles 48..63 are never trained on
        stains = rng.choice(list(truth), 8)
        target = grey([2 * truth[s][i] - 1 for s, i in zip(stains, idx)])
        source = torch.from_numpy(tiles[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
        loss = FlowMatchingObjective(pipe).training_loss(
            {"target": target, "stain": list(stains), "source": source}, generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = pipe.translate(tiles[48:], list(truth), steps=1)
    for stain, values in truth.items():
        pred = out[stain].mean(axis=(1, 2))
        assert np.corrcoef(pred, values[48:])[0, 1] > 0.8, stain
    assert out["Ki67"].mean() != pytest.approx(out["CD45"].mean(), abs=0.01)


def test_source_guidance_is_image_cfg_on_the_translation_source():
    """guidance={"source": w}: 1 is the plain model, 0 the model with the source hidden, and the
    one-step readout moves linearly in w between and beyond them (before clipping to [0, 1])."""
    from skimage import data

    from mupd.paths import DEFAULT_MODEL
    from mupd.pipeline import MuPDPipeline

    if not DEFAULT_MODEL.is_dir():
        pytest.skip(f"bundled model {DEFAULT_MODEL} is absent")
    pipe = MuPDPipeline.from_pretrained(DEFAULT_MODEL)
    t = pipe.tile_size
    tiles = data.immunohistochemistry()[None, :t, :t]  # a real tissue tile (any RGB works here)

    def ki67(guidance):
        return pipe.translate(tiles, ["Ki67"], guidance=guidance, seed=3)["Ki67"][0]

    plain, one, zero, half = ki67(None), ki67({"source": 1.0}), ki67({"source": 0.0}), ki67({"source": 0.5})
    np.testing.assert_array_equal(plain, one)
    assert not np.allclose(zero, plain, atol=1e-3)  # hiding the source changes the answer
    inside = (plain > 0.05) & (plain < 0.95) & (zero > 0.05) & (zero < 0.95)
    assert inside.mean() > 0.5
    linear = np.abs(half - (plain + zero) / 2)[inside] < 2e-3
    assert linear.mean() > 0.999, linear.mean()  # a few pixels touch the codec's clipping
    with pytest.raises(Exception, match="unknown modality 'sauce'"):
        pipe.translate(tiles, ["Ki67"], guidance={"sauce": 2.0})


def test_marker_loss_counts_only_measured_pixels():
    """A marker map is measured inside spot footprints only: with `target_valid`, what the map
    holds outside them does not change the loss, an all-True mask is the plain loss, and a
    tile whose marker was never measured adds nothing."""
    pipe = small(prediction="x0", readout_fraction=1.0)
    rng = np.random.default_rng(0)
    source = torch.from_numpy(rng.uniform(-1, 1, (4, 3, T, T)).astype(np.float32))
    target = grey([0.2, -0.4, 0.6, 0.0]).clone()
    valid = torch.zeros(4, 1, T, T)
    valid[:, :, 8:24, 8:24] = 1  # the footprint: whole 4 px codec cells
    valid[3] = 0  # never measured

    def loss(target, valid=None):
        batch = {"target": target, "stain": ["Ki67"] * 4, "source": source}
        if valid is not None:
            batch["target_valid"] = valid
        return FlowMatchingObjective(pipe).training_loss(
            batch, generator=torch.Generator().manual_seed(5)).item()

    outside = target.clone()
    outside[..., :8, :] = 1.0  # change the map outside the footprint only
    outside[3] = -1.0
    assert loss(target, valid) == pytest.approx(loss(outside, valid), rel=1e-6)
    assert loss(target) != pytest.approx(loss(outside), rel=1e-3)  # unmasked, it does change
    assert loss(target, torch.ones(4, 1, T, T)) == pytest.approx(loss(target), rel=1e-6)
    with pytest.raises(Exception, match="target mask of shape"):
        loss(target, torch.ones(4, 1, T // 2, T // 2))
