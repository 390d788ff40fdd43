"""Stain / geometry augmentation baked into the latent cache (mupd.train.augment)."""

from __future__ import annotations

import numpy as np
import pytest

from mupd.models.codec import AreaCodec, build_codec
from mupd.paths import RESOURCES
from mupd.train.augment import AugmentSection, View, view_of
from mupd.train.batches import Sample, collate
from mupd.train.config import TrainConfigError, config_from_dict


def _he(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(40, 230, (32, 32, 3), dtype=np.uint8)


def test_views_are_deterministic_and_view_zero_is_the_tile():
    section = AugmentSection(views=4, hed=0.1, brightness=0.05, contrast=0.1, dihedral=True, seed=3)
    assert view_of(section, "spot-1", 0) == View()
    assert view_of(None, "spot-1", 2) == View()
    assert view_of(section, "spot-1", 2) == view_of(section, "spot-1", 2)
    views = {view_of(section, f"spot-{i}", v) for i in range(8) for v in range(1, 4)}
    assert len(views) == 24  # every (sample, view) draws its own parameters
    assert len({(v.rotations, v.flip) for v in views}) > 4  # the dihedral group is used
    he = _he()
    np.testing.assert_array_equal(View().apply(he), he)


def test_a_view_turns_source_and_marker_together_and_colours_only_the_he():
    section = AugmentSection(views=3, hed=0.2, brightness=0.1, contrast=0.2, dihedral=True)
    view = next(view_of(section, "r", v) for v in range(1, 50) if view_of(section, "r", v).rotations)
    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    turned = view.apply(ramp)  # a marker map: geometry only, values kept
    np.testing.assert_array_equal(np.sort(turned.ravel()), np.sort(ramp.ravel()))
    assert not np.array_equal(turned, ramp)
    he = _he()
    out = view.apply(he)
    assert out.dtype == np.uint8 and out.shape == he.shape
    # the colour change is a jitter, not a new image
    assert np.abs(View(rotations=view.rotations, flip=view.flip).apply(he).astype(int)
                  - out.astype(int)).mean() < 40


def test_latent_cache_holds_every_view_and_turns_the_mask(tmp_path):
    from mupd.train.latents import LatentSamples, build_latent_cache

    codec = build_codec({"type": "vae", "path": str(RESOURCES / "models" / "vae-tiny")})
    markers = AreaCodec(codec.downsample, codec.latent_channels)
    he = _he()
    level = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    valid = np.zeros((32, 32), bool)
    valid[:, :8] = True
    samples = [Sample(target=he, stain="H&E", name="t1"),
               Sample(target=level, stain="HER2", source=he, name="t1", target_valid=valid)]
    section = AugmentSection(views=3, hed=0.1, dihedral=True, seed=1)
    folder = build_latent_cache(samples, codec, tmp_path / "a", [tmp_path], {}, markers=markers,
                                augment=section)
    plain = build_latent_cache(samples, codec, tmp_path / "b", [tmp_path], {}, markers=markers)
    assert folder.name != plain.name
    cached = LatentSamples(samples, folder)
    assert len(cached) == 6 and len(LatentSamples(samples, plain)) == 2
    x = collate([Sample(target=he, stain="H&E")])["target"]
    np.testing.assert_allclose(cached[0].latents["target"], codec.encode(x)[0].numpy(), atol=1e-5)
    for v in (1, 2):
        view = view_of(section, "t1", v)
        turned = collate([Sample(target=view.apply(he), stain="H&E")])["target"]
        np.testing.assert_allclose(cached[2 * v].latents["target"], codec.encode(turned)[0].numpy(),
                                   atol=1e-5)
        # the record's H&E source is the same view as its generation target
        np.testing.assert_array_equal(cached[2 * v + 1].latents["source"], cached[2 * v].latents["target"])
        np.testing.assert_array_equal(cached[2 * v + 1].target_valid, view.geometry(valid))
        expected = markers.encode(collate([Sample(target=view.apply(level), stain="HER2")])["target"])
        np.testing.assert_allclose(cached[2 * v + 1].latents["target"], expected[0].numpy(), atol=1e-6)


def test_config_checks_the_augment_section():
    base = {"output": "runs/x", "data": {"store": "s"}}
    assert config_from_dict(base).data.augment.views == 1
    config = config_from_dict({**base, "data": {"store": "s", "augment": {"views": 3, "hed": 0.1}}})
    assert config.data.augment.views == 3 and config.data.augment.hed == 0.1
    with pytest.raises(TrainConfigError, match="augment.views must be at least 1"):
        config_from_dict({**base, "data": {"store": "s", "augment": {"views": 0}}})
    with pytest.raises(TrainConfigError, match="augment.hed must be in"):
        config_from_dict({**base, "data": {"store": "s", "augment": {"hed": 1.5}}})
    with pytest.raises(TrainConfigError, match="unknown key"):
        config_from_dict({**base, "data": {"store": "s", "augment": {"rotate": True}}})
