"""TAEF2: the pretrained tiny autoencoder distilled from the FLUX.2 VAE (8x down, 32 channels).

A latent space learned from millions of natural images beats one trained here on a CPU: on
held-out H&E it reconstructs better than the project's `vae-tiny` (4x down) at 4x fewer latent
cells (`benchmarks/bench_codec.py`). The layer layout follows the published state dict (keys are
`nn.Sequential` indices), so the MIT-licensed weights load as they are; the class is a diffusers
`ModelMixin`/`ConfigMixin`, saved and loaded as `config.json` + safetensors like any diffusers
model. `encode`/`decode` take and give images in [-1, 1], as `AutoencoderKL` does, and return
diffusers' output types, so `codec.VAECodec` drives either.

Conversion of the original pickles (once, `weights_only=True`, never at run time):
    python -m mupd.models.taef2 ENCODER.pth DECODER.pth OUT_FOLDER
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class _Block(nn.Module):
    """Three 3x3 convs beside an identity skip; with `pool`, a pointwise bottleneck branch
    (1x1 up, GroupNorm, ReLU, 1x1 down) is first added to the input."""

    def __init__(self, channels: int, pool: bool) -> None:
        super().__init__()
        if pool:
            self.pool = nn.Sequential(
                nn.Conv2d(channels, 4 * channels, 1, bias=False), nn.GroupNorm(4, 4 * channels),
                nn.ReLU(), nn.Conv2d(4 * channels, channels, 1, bias=False))
        self.has_pool = pool
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_pool:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class _SoftClamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * torch.tanh(x / 3)


def _encoder(width: int, latent: int, stages: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), _Block(width, False)]
    for stage in range(stages):
        layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False))
        layers += [_Block(width, stage == stages - 1) for _ in range(3)]
    layers.append(nn.Conv2d(width, latent, 3, padding=1))
    return nn.Sequential(*layers)


def _decoder(width: int, latent: int, stages: int) -> nn.Sequential:
    layers: list[nn.Module] = [_SoftClamp(), nn.Conv2d(latent, width, 3, padding=1), nn.ReLU()]
    for stage in range(stages):
        layers += [_Block(width, stage == 0) for _ in range(3)]
        layers += [nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1, bias=False)]
    layers += [_Block(width, False), nn.Conv2d(width, 3, 3, padding=1)]
    return nn.Sequential(*layers)


class TAEF2(ModelMixin, ConfigMixin):
    """Tiny autoencoder: `encoder` and `decoder` as in the published weights."""

    @register_to_config
    def __init__(self, latent_channels: int = 32, width: int = 64, stages: int = 3,
                 scaling_factor: float = 1.0, shift_factor: float = 0.0) -> None:
        super().__init__()
        self.encoder = _encoder(width, latent_channels, stages)
        self.decoder = _decoder(width, latent_channels, stages)

    @property
    def downsample_factor(self) -> int:
        return 2 ** int(self.config.stages)

    def encode(self, images: torch.Tensor) -> AutoencoderTinyOutput:
        """Raw (unscaled) latents of images in [-1, 1]."""
        return AutoencoderTinyOutput(latents=self.encoder(images.add(1).div(2)))

    def decode(self, latents: torch.Tensor) -> DecoderOutput:
        """Images in [-1, 1] from raw latents."""
        return DecoderOutput(sample=self.decoder(latents).clamp(0, 1).mul(2).sub(1))


def convert(encoder_pth: Path, decoder_pth: Path, out: Path,
            scaling_factor: Optional[float] = None) -> TAEF2:
    """Load the published state dicts (tensors only: `weights_only=True`) into `TAEF2` and save
    it as a diffusers folder (float16, as published); every tensor must match, none left over."""
    model = TAEF2(scaling_factor=scaling_factor or 1.0)
    for half, path in (("encoder", encoder_pth), ("decoder", decoder_pth)):
        state = torch.load(path, map_location="cpu", weights_only=True)
        getattr(model, half).load_state_dict(state, strict=True)
    from .codec import save_half_if_lossless

    save_half_if_lossless(model, out)
    return model


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=convert.__doc__)
    parser.add_argument("encoder", type=Path)
    parser.add_argument("decoder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--scaling-factor", type=float, default=None,
                        help="latent scale (1 / std of the raw latents on H&E)")
    args = parser.parse_args(argv)
    convert(args.encoder, args.decoder, args.out, args.scaling_factor)


if __name__ == "__main__":
    main()
