"""The latent space: images in [-1, 1] (B, 3, H, W) <-> latents (B, C, H/d, W/d).

Two codecs behind one interface (`encode`, `decode`, `latent_channels`, `downsample`):
- `PixelCodec`: space-to-depth (pixel unshuffle) by `factor`; weight-free and exactly invertible,
  so a tiny model trains on a CPU without first needing a trained VAE.
- `VAECodec`: a local diffusers autoencoder folder, honouring its `scaling_factor` and
  `shift_factor`: latents = (z - shift) * scale. Either an `AutoencoderKL` (SD, SD3, FLUX
  style; encoding takes the posterior mode, so it is deterministic) or the pretrained `TAEF2`
  (`taef2.py`, bundled as `src/mupd/resources/models/taef2`), told apart by the folder's `_class_name`.
Marker targets are grey images: the map m in [0, 1] becomes 2m - 1 on all three channels, and
decoding averages the three channels back into one map in [0, 1]. They go through the image codec
or (model config `marker_codec: area`) through `AreaCodec`, a linear code beside it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ModelError
from .configs import MARKER_CODECS, SD_VAE_CONFIG

CODEC_FILE = "codec.json"
#: The project's own small VAE (4x down, 4 latent channels, 10.8 M parameters).
SMALL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [64, 128, 256], "layers_per_block": 1, "norm_num_groups": 32,
    "scaling_factor": 1.0, "shift_factor": 0.0,
}
#: VAE configs `mupd train-vae --config` knows: tiny (4x down, 4 ch, 2.7 M parameters, trains
#: on a CPU), small (above), sd (the SD-style 8x-down VAE of the base/xl model configs, 83.7 M).
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {**SMALL_VAE_CONFIG, "block_out_channels": [32, 64, 128]},
    "small": SMALL_VAE_CONFIG,
    "sd": {**SD_VAE_CONFIG, "shift_factor": 0.0},
}


def vae_config(name: str) -> dict[str, Any]:
    """A copy of the named VAE config (see VAE_CONFIGS)."""
    if name not in VAE_CONFIGS:
        raise ModelError(f"unknown VAE config {name!r}; choose one of {', '.join(VAE_CONFIGS)}")
    return copy.deepcopy(VAE_CONFIGS[name])


class PixelCodec(torch.nn.Module):
    def __init__(self, factor: int = 4) -> None:
        super().__init__()
        self.factor = int(factor)

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor ** 2

    @property
    def downsample(self) -> int:
        return self.factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.factor)

    def config(self) -> dict[str, Any]:
        return {"type": "pixel", "factor": self.factor}


class VAECodec(torch.nn.Module):
    def __init__(self, vae: Any, source: Optional[str] = None) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.source = source  # the folder it came from (None: built from a config)
        self.scale = float(vae.config.scaling_factor or 1.0)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        factor = getattr(self.vae, "downsample_factor", None)  # TAEF2
        return int(factor) if factor else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        out = self.vae.encode(images.to(dtype))
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
        return ((z - self.shift) * self.scale).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        z = latents.to(dtype) / self.scale + self.shift
        return self.vae.decode(z).sample.to(latents.dtype)

    def config(self) -> dict[str, Any]:
        return {"type": "vae", "source": self.source}


Codec = PixelCodec | VAECodec

class AreaCodec(torch.nn.Module):
    """Marker maps <-> latents by area averaging, beside a VAE that codes the stain images.

    A VAE trained on H&E erases marker levels: `vae-tiny` decodes uniform grey 0.0, 0.1 and 0.3
    all as about 0.41, and most marker values lie below 0.4. A marker map is a smooth field
    (spot-scale expression rendered over the tile), so its mean per latent cell keeps what is
    read from it, and the code is linear. The mean fills every latent channel, so the latents
    have the image codec's shape; decoding averages the channels (which also averages the
    sampler's per-channel error) and upsamples bilinearly."""

    def __init__(self, factor: int, channels: int) -> None:
        super().__init__()
        self.factor, self.channels = int(factor), int(channels)

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def downsample(self) -> int:
        return self.factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        grey = F.avg_pool2d(images.mean(dim=1, keepdim=True), self.factor)
        return grey.expand(-1, self.channels, -1, -1).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        grey = F.interpolate(latents.mean(dim=1, keepdim=True), scale_factor=self.factor,
                             mode="bilinear", align_corners=False)
        return grey.expand(-1, 3, -1, -1)

    def config(self) -> dict[str, Any]:
        return {"type": "area", "factor": self.factor, "channels": self.channels}


def marker_codec(kind: str, codec: Codec) -> Optional[AreaCodec]:
    """The marker codec `kind` (see MARKER_CODECS) beside `codec`; None: `codec` codes markers."""
    if kind not in MARKER_CODECS:
        raise ModelError(f"marker codec {kind!r} unknown; use {' or '.join(MARKER_CODECS)}")
    return AreaCodec(codec.downsample, codec.latent_channels) if kind == "area" else None


@torch.no_grad()
def encode_targets(codec: Codec, markers: Optional[AreaCodec], images: torch.Tensor,
                   is_marker: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """Latents of a batch that mixes stain images and marker maps, each through its codec."""
    flags = torch.as_tensor(is_marker, dtype=torch.bool, device=images.device)
    if markers is None or not bool(flags.any()):
        return codec.encode(images)
    if bool(flags.all()):
        return markers.encode(images)
    z_markers, z_images = markers.encode(images[flags]), codec.encode(images[~flags])
    out = z_images.new_empty((images.shape[0], *z_images.shape[1:]))
    out[flags], out[~flags] = z_markers.to(out.dtype), z_images
    return out


def _autoencoder_class(folder: Path) -> Any:
    """The diffusers class a codec folder names (`_class_name` of its config.json)."""
    from diffusers import AutoencoderKL

    from .taef2 import TAEF2

    classes = {"AutoencoderKL": AutoencoderKL, "TAEF2": TAEF2}
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"VAE folder {folder}: config.json is not a JSON object ({exc})") from None
    if name not in classes:
        raise ModelError(f"VAE folder {folder}: class {name!r} unknown; use one of "
                         f"{', '.join(classes)}")
    return classes[name]


def _load_vae(folder: Path) -> Any:
    if not (folder / "config.json").is_file():
        raise ModelError(f"VAE folder {folder} has no config.json (not a diffusers autoencoder)")
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"VAE folder {folder} has no .safetensors weights (pickle weights are "
                         f"refused: convert them to safetensors)")
    cls = _autoencoder_class(folder)
    try:
        return cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except Exception as exc:  # diffusers raises many kinds for a broken folder
        raise ModelError(f"cannot load the VAE in {folder}: {exc}") from None


def build_codec(spec: dict[str, Any]) -> Codec:
    """A codec from a config entry: {"type": "pixel", "factor": 4}, {"type": "vae", "path": DIR}
    (a local diffusers VAE folder) or {"type": "vae", "config": {...}} (fresh weights)."""
    kind = spec.get("type")
    if kind == "pixel":
        return PixelCodec(int(spec.get("factor", 4)))
    if kind == "vae":
        if spec.get("path"):
            folder = Path(spec["path"]).expanduser()
            if not folder.is_dir():
                raise ModelError(f"VAE folder {folder} does not exist")
            return VAECodec(_load_vae(folder), source=str(folder))
        from diffusers import AutoencoderKL

        return VAECodec(AutoencoderKL.from_config(spec.get("config") or SMALL_VAE_CONFIG))
    raise ModelError(f"codec type {kind!r} unknown; use 'pixel' or 'vae'")


def save_half_if_lossless(model: Any, folder: Path) -> None:
    """`save_pretrained` in float16 when every weight is exactly a float16 value (TAEF2 is
    published so: half the bytes, the same numbers), else as it is. Loading gives float32."""
    exact = all(torch.equal(p, p.half().to(p.dtype)) for p in model.state_dict().values()
                if p.is_floating_point())
    (copy.deepcopy(model).half() if exact else model).save_pretrained(folder, safe_serialization=True)


def save_codec(codec: Codec, folder: Path) -> None:
    """`codec.json`, plus the VAE itself (diffusers format, safetensors) for a VAE codec."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = codec.config()
    if isinstance(codec, VAECodec):
        save_half_if_lossless(codec.vae, folder / "vae")
        spec = {"type": "vae", "path": "vae", "source": codec.source}
    (folder / CODEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")


def load_codec(folder: Path) -> Codec:
    path = folder / CODEC_FILE
    if not path.is_file():
        raise ModelError(f"model folder {folder.parent} lacks {folder.name}/{CODEC_FILE}")
    spec = json.loads(path.read_text())
    if spec.get("type") == "vae":
        vae = _load_vae(folder / spec.get("path", "vae"))
        return VAECodec(vae, source=spec.get("source"))
    return build_codec(spec)


def codec_fingerprint(codec: Codec) -> str:
    """A hash of everything that decides a codec's latents (config, scale/shift and every
    weight), so cached latents are tied to the exact codec that made them."""
    import hashlib

    digest = hashlib.sha256(json.dumps(codec.config(), sort_keys=True).encode())
    if isinstance(codec, VAECodec):
        digest.update(json.dumps(dict(codec.vae.config), sort_keys=True, default=str).encode())
        digest.update(f"{codec.scale!r} {codec.shift!r}".encode())
        for name, tensor in sorted(codec.vae.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
