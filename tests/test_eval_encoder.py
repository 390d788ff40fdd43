"""A user-supplied transformers image encoder, loaded from a local folder only."""

import numpy as np
import pytest
from skimage import data

from mupd.errors import ModelError
from mupd.eval.encoder import ImageEncoder
from mupd.eval.metrics import frechet_distance


def save_tiny_vit(folder):
    """A randomly initialised 1-layer ViT in transformers' folder layout (no hub involved)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64)
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    return save_tiny_vit(tmp_path_factory.mktemp("vit"))


def test_encoder_embeds_real_tiles_and_feeds_frechet_distance(vit_folder):
    ihc = data.immunohistochemistry()
    tiles = np.stack([ihc[y:y + 64, x:x + 64] for y in range(0, 256, 64) for x in range(0, 256, 64)])
    encoder = ImageEncoder(vit_folder, batch_size=5)
    emb = encoder(tiles)
    assert emb.shape == (16, 32) and np.isfinite(emb).all()
    assert not np.allclose(emb[0], emb[1])  # different tiles, different embeddings
    assert frechet_distance(emb[:8], emb[8:]) >= 0


def test_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        ImageEncoder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=str(tmp_path)):
        ImageEncoder(tmp_path)
