"""MuPDPipeline: the one object that generates and translates (its folder: `mupd.model_folder`).

Sampling integrates dx/dt = v from t = 1 (noise) to t = 0 with a scheduler (`mupd.schedulers`:
Euler or Heun steps); one Euler step is the one-step readout x_0 = noise - v(noise, 1), the
default for translation. Guidance is `mupd.guidance`, the starting noise `mupd.noise`, the
training objective `mupd.train.loss`, the gene readout `mupd.models.readout`.

The transformer predicts either v itself or (config `prediction: x0`) the clean latents x_0,
turned into v = (x_t - x_0) / t, so loss, guidance and samplers all work on v either way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .conditions import model_kwargs
from .data.captions import RESTAIN_PROMPT
from .errors import ConditionError, ModelError
from .guidance import check_guidance, guided_velocity
from .models.catalogue import StainCatalogue
from .models.codec import Codec, build_codec, marker_codec
from .models.configs import PREDICTIONS, model_config
from .models.readout import GeneReadout
from .models.rna import RNATokenizer
from .models.text import TextEncoder
from .models.transformer import MuPDTransformer
from .noise import tile_noise
from .paths import STAIN_CATALOGUE
from .progress import CancelToken, ProgressCallback, ProgressEvent
from .schedulers import SCHEDULERS, FlowMatchEulerScheduler, FlowMatchScheduler

#: x0 models: t is clamped to this when x0 is turned into a velocity (no division by ~0).
MIN_T = 0.05


class MuPDPipeline:
    """Transformer + codec + condition encoders + stain catalogue + gene panel + scheduler.

    `scheduler`: the sampler `generate` / `translate` use by default (swap it as in diffusers:
    `pipe.scheduler = FlowMatchHeunScheduler.from_config(pipe.scheduler.config)`); None: Euler
    on the config's `time_shift` (model configs, model folders saved before `scheduler/`).
    The schedule lives in the scheduler's config only: `time_shift` leaves `config`."""

    def __init__(self, transformer: MuPDTransformer, codec: Codec, catalogue: StainCatalogue,
                 rna_tokenizer: RNATokenizer, text_encoder: TextEncoder,
                 config: dict[str, Any], scheduler: Optional[FlowMatchScheduler] = None) -> None:
        self.transformer, self.codec = transformer, codec
        self.catalogue, self.rna_tokenizer, self.text_encoder = catalogue, rna_tokenizer, text_encoder
        self.config = {k: v for k, v in config.items() if k != "time_shift"}
        self.scheduler = scheduler if scheduler is not None else FlowMatchEulerScheduler(
            shift=float(config.get("time_shift", 1.0)))
        block = codec.downsample * transformer.config.patch_size
        if self.tile_size % block:
            raise ModelError(f"tile size {self.tile_size} px is not a multiple of {block} px "
                             f"(codec downsample x patch size)")
        if self.prediction not in PREDICTIONS:
            raise ModelError(f"model config prediction {self.prediction!r} unknown; use "
                             f"{' or '.join(PREDICTIONS)}")
        if codec.latent_channels != transformer.config.latent_channels:
            raise ModelError(f"codec gives {codec.latent_channels} latent channels, the transformer "
                             f"expects {transformer.config.latent_channels}")
        # None: the image codec also codes marker targets (every model before `marker_codec`)
        self.marker_codec = marker_codec(str(config.get("marker_codec", "codec")), codec)
        self.gene_readout = GeneReadout.from_config(config.get("gene_readout"))
        heads = int(transformer.config.get("readout_genes", 0))
        if heads != (len(self.gene_readout.genes) if self.gene_readout else 0):
            raise ModelError(f"the transformer's gene head has {heads} outputs but the config's "
                             f"gene_readout names {len(self.gene_readout.genes) if self.gene_readout else 0} genes")
        try:  # the generation guidance the model was validated with, for callers that set none
            self.default_guidance: dict[str, float] = check_guidance(config.get("guidance") or {}) or {}
        except ConditionError as exc:
            raise ModelError(f"model config guidance: {exc}") from None

    # -- construction and folders ---------------------------------------------------------
    @property
    def tile_size(self) -> int:
        return int(self.config["tile_size"])

    @property
    def prediction(self) -> str:
        return str(self.config.get("prediction", "velocity"))

    def as_velocity(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity from the transformer's output (`prediction`): itself, or from x0."""
        if self.prediction == "velocity":
            return out
        return (xt - out) / t.clamp(min=MIN_T).to(xt.dtype)[:, None, None, None]

    @property
    def mpp(self) -> float:
        return float(self.config["mpp"])

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device: torch.device | str) -> "MuPDPipeline":
        self.transformer.to(device)
        self.codec.to(device)
        self.text_encoder.to(device)
        return self

    @classmethod
    def from_config_name(cls, name: str = "tiny", **overrides: Any) -> "MuPDPipeline":
        """An untrained pipeline of a named config (`configs.model_config` overrides apply)."""
        config = model_config(name, **overrides)
        codec = build_codec(config["codec"])
        text_encoder = TextEncoder(config["text_encoder"], config["text_max_length"])
        panel = config["rna_panel"]
        group = int(config["rna_group_size"])
        if panel is None:
            tokenizer = RNATokenizer.default(group)
        elif isinstance(panel, (list, tuple)):
            tokenizer = RNATokenizer(panel, name="custom", group_size=group)
        else:
            tokenizer = RNATokenizer.from_file(panel, group_size=group)
        catalogue = StainCatalogue.load(config["catalogue"] or STAIN_CATALOGUE)
        config["text_dim"] = int(config["text_dim"] or text_encoder.hidden_size)
        readout = GeneReadout.from_config(config["gene_readout"])
        transformer = MuPDTransformer(latent_channels=codec.latent_channels,
                                      text_dim=config["text_dim"], num_genes=tokenizer.n_genes,
                                      rna_group_size=tokenizer.group_size,
                                      readout_genes=len(readout.genes) if readout else 0,
                                      **config["transformer"])
        return cls(transformer, codec, catalogue, tokenizer, text_encoder, config)

    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the whole model folder (`model_folder.save_model_folder`)."""
        from .model_folder import save_model_folder

        return save_model_folder(self, folder, overwrite)

    @classmethod
    def from_pretrained(cls, folder: str | Path, roots: Sequence[str | Path] = ()) -> "MuPDPipeline":
        """Load a model folder (`model_folder.load_model_folder`: it must refer only to itself
        and `roots`, and hold safetensors weights)."""
        from .model_folder import load_model_folder

        return load_model_folder(cls, folder, roots)

    # -- conditions -----------------------------------------------------------------------
    def stain_ids(self, stains: Sequence[str]) -> torch.Tensor:
        ids = [self.catalogue.index(s) for s in stains]
        limit = self.transformer.config.max_stains
        if max(ids) >= limit:
            raise ModelError(f"stain {stains[ids.index(max(ids))]!r} has id {max(ids)} but this model "
                             f"has room for {limit} stain tokens")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _check_tiles(self, images: Any, what: str) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        T = self.tile_size
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ConditionError(f"{what} must be RGB tiles (N, {T}, {T}, 3); got shape {images.shape}")
        if images.shape[1:3] != (T, T):
            raise ConditionError(f"{what} are {images.shape[1]}x{images.shape[2]} px; this model "
                                 f"works on {T}x{T} px tiles at {self.mpp} um/px (resample first)")
        if images.dtype != np.uint8:
            raise ConditionError(f"{what} must be uint8 RGB; got {images.dtype}")
        return images

    def _to_unit(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.codec.encode(images.float())

    def encode_text(self, texts: Optional[Sequence[Optional[str]]],
                    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if texts is None:
            return None
        return self.text_encoder.encode(list(texts), device=self.device)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], **kwargs: Any) -> Any:
        """One transformer pass under `cond`; bf16 autocast on CUDA."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            return self.transformer(x, t, **model_kwargs(cond), **kwargs)

    def _model_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """One transformer pass as a velocity (`guidance.Velocity`)."""
        return self.as_velocity(self._forward(x, t, cond).float(), x, t)

    # -- sampling -------------------------------------------------------------------------
    def _scheduler(self, sampler: Optional[str]) -> FlowMatchScheduler:
        """A fresh scheduler for one run (schedulers keep state): the pipeline's own, or the
        named sampler on the pipeline scheduler's config."""
        cls = type(self.scheduler) if sampler is None else SCHEDULERS[sampler]
        return cls.from_config(self.scheduler.config)

    @torch.no_grad()
    def _sample(self, noise: torch.Tensor, cond: dict[str, Any], steps: int,
                guidance: Optional[dict[str, float]], sampler: Optional[str],
                progress: Optional[ProgressCallback], cancel: Optional[CancelToken],
                done: int, total: int, start: float = 1.0) -> torch.Tensor:
        """Integrate from noise level `start` (1: pure noise; below it `noise` is a noised image)."""
        scheduler = self._scheduler(sampler)
        scheduler.set_timesteps(steps, start=start)
        x, finished = noise, 0
        for t in scheduler.timesteps:
            if cancel is not None and scheduler.state_in_first_order:
                cancel.raise_if_cancelled()
            v = guided_velocity(self._model_velocity, x, float(t), cond, guidance)
            x = scheduler.step(v, t, x).prev_sample
            if scheduler.state_in_first_order:  # a whole step done
                finished += 1
                if progress is not None:
                    progress(ProgressEvent("sample", done + finished, total, f"step {finished}/{steps}"))
        return x

    def _decode(self, latents: torch.Tensor, kind: str) -> np.ndarray:
        codec = self.marker_codec if kind == "marker" and self.marker_codec is not None else self.codec
        with torch.no_grad():
            images = codec.decode(latents).float().clamp(-1, 1)
        if kind == "marker":
            return ((images.mean(dim=1) + 1) / 2).cpu().numpy().astype(np.float32)
        return ((images + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)

    @torch.no_grad()
    def _read_genes(self, noise: torch.Tensor, cond: dict[str, Any], marker: str) -> np.ndarray:
        """A marker map from the gene head (`models.readout`): one pass at t = 1, as trained;
        steps and guidance do not apply to it."""
        _, tokens = self._forward(noise, torch.ones(noise.shape[0], device=self.device), cond,
                                  return_genes=True)
        maps = self.gene_readout.marker_maps(tokens.float(), marker, self.tile_size)
        return maps.cpu().numpy().astype(np.float32)

    @property
    def latent_step(self) -> int:
        """Image pixels per latent pixel: tiles placed on multiples of it can share one noise field."""
        return int(self.codec.downsample)

    def _noise(self, n: int, seed: int,
               positions: Optional[Sequence[tuple[int, int]]] = None) -> torch.Tensor:
        """`noise.tile_noise` in this model's latent shape: the same on every device and batch
        size; with `positions`, windows of one noise field over the tiles' shared frame."""
        return tile_noise(n, seed, self.codec.latent_channels, self.tile_size // self.codec.downsample,
                          self.latent_step, positions)

    def _check_run(self, steps: int, sampler: Optional[str], batch_size: int) -> None:
        if steps < 1:
            raise ConditionError(f"steps must be at least 1 (got {steps})")
        if sampler is not None and sampler not in SCHEDULERS:
            raise ConditionError(f"sampler {sampler!r} unknown; use {' or '.join(SCHEDULERS)}")
        if batch_size < 1:
            raise ConditionError(f"batch size must be at least 1 (got {batch_size})")

    def generate(self, text: Optional[str | Sequence[Optional[str]]] = None, rna: Any = None,
                 reference: Optional[np.ndarray] = None, stain: str = "H&E", num_images: int = 1,
                 steps: int = 20, guidance: Optional[dict[str, float]] = None, seed: int = 0,
                 sampler: Optional[str] = None, rna_normalized: bool = False, batch_size: int = 8,
                 progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> np.ndarray:
        """(N, T, T, 3) uint8 for an RGB stain, (N, T, T) float32 in [0, 1] for a marker.

        text: one prompt for all images or one per image; rna: one profile (dict, CSV/TSV path,
        one-row AnnData; raw counts unless `rna_normalized`); reference: one (T, T, 3) uint8 tile.
        sampler: None for the pipeline's `scheduler`, or "euler" / "heun" on its config."""
        self._check_run(steps, sampler, batch_size)
        if num_images < 1:
            raise ConditionError(f"num_images must be at least 1 (got {num_images})")
        guidance = check_guidance(guidance)
        target = self.catalogue.get(stain)
        texts = [text] * num_images if isinstance(text, str) or text is None else list(text)
        if len(texts) != num_images:
            raise ConditionError(f"{len(texts)} prompts for {num_images} images")
        text_tokens = self.encode_text(texts) if any(texts) else None
        rna_tokens = None
        if rna is not None:
            values, mask, _, _ = self.rna_tokenizer.align(rna, normalized=rna_normalized)
            rna_tokens = (torch.from_numpy(values).to(self.device)[None],
                          torch.from_numpy(mask).to(self.device)[None])
        ref_latents = None
        if reference is not None:
            tile = self._check_tiles(reference, "reference tile")[:1]
            ref_latents = self.encode_images(self._to_unit(tile))
        noise = self._noise(num_images, seed)
        out = []
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            cond: dict[str, Any] = {"stain": self.stain_ids([target.name] * n)}
            if text_tokens is not None:
                cond["text"] = (text_tokens[0][start:start + n], text_tokens[1][start:start + n])
            if rna_tokens is not None:
                cond["rna"] = (rna_tokens[0].expand(n, -1), rna_tokens[1].expand(n, -1))
            if ref_latents is not None:
                cond["reference"] = (ref_latents.expand(n, -1, -1, -1),
                                     torch.ones(n, dtype=torch.bool, device=self.device))
            x = self._sample(noise[start:start + n].to(self.device), cond, steps, guidance, sampler,
                             progress, cancel, done=start // batch_size * steps,
                             total=-(-num_images // batch_size) * steps)
            out.append(self._decode(x, target.kind))
        return np.concatenate(out)

    def translate(self, images: np.ndarray, stains: Sequence[str], steps: int = 1,
                  guidance: Optional[dict[str, float]] = None, seed: int = 0, batch_size: int = 8,
                  sampler: Optional[str] = None, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None,
                  positions: Optional[Sequence[tuple[int, int]]] = None,
                  strength: Optional[float] = None, prompt: Optional[str] = None,
                  ) -> dict[str, np.ndarray]:
        """H&E tiles (N, T, T, 3) uint8 -> {stain as given: (N, T, T, 3) uint8 for an RGB stain,
        (N, T, T) float32 in [0, 1] for a marker}. steps=1 is the one-step readout. A marker
        that the model's gene readout covers is read by that head in one pass, whatever `steps`.

        `positions`: each tile's (y, x) origin in pixels of one shared frame (multiples of
        `latent_step`); overlapping tiles then share their starting noise, so their predictions
        agree where they overlap (the output is dominated by that noise for a weak model).

        `strength` (RGB targets; SDEdit): the source latents are noised to t = strength and
        denoised under the target stain and `prompt` (default `RESTAIN_PROMPT`), so a frozen
        section keeps its structure and takes the look of the prompt; 0 returns the source
        through the codec, 1 ignores it."""
        self._check_run(steps, sampler, batch_size)
        guidance = check_guidance(guidance)
        tiles = self._check_tiles(images, "H&E tiles")
        if isinstance(stains, str):
            stains = [stains]
        targets = {s: self.catalogue.get(s) for s in stains}
        if not targets:
            raise ConditionError("no target stain given: name at least one stain or marker")
        if strength is not None:
            strength = check_image_to_image(list(targets.values()), strength)
        text = None if strength is None else self.encode_text([prompt or RESTAIN_PROMPT] * len(tiles))
        noise = self._noise(len(tiles), seed, positions)
        chunks = -(-len(tiles) // batch_size)
        out: dict[str, list[np.ndarray]] = {s: [] for s in targets}
        for c, start in enumerate(range(0, len(tiles), batch_size)):
            source = self.encode_images(self._to_unit(tiles[start:start + batch_size]))
            n = source.shape[0]
            for j, (name, target) in enumerate(targets.items()):
                cond: dict[str, Any] = {"stain": self.stain_ids([target.name] * n)}
                x, level = noise[start:start + n].to(self.device), 1.0
                if strength is None:
                    cond["source"] = source
                else:  # SDEdit: start from the source itself, noised to t = strength
                    cond["text"] = (text[0][start:start + n], text[1][start:start + n])
                    x, level = (1 - strength) * source + strength * x, strength
                done = (c * len(targets) + j) * steps
                if strength is None and self.gene_readout is not None and self.gene_readout.reads(name):
                    out[name].append(self._read_genes(x, cond, target.name))
                    continue
                if level > 0:
                    x = self._sample(x, cond, steps, guidance, sampler, progress, cancel, done,
                                     chunks * len(targets) * steps, start=level)
                out[name].append(self._decode(x, target.kind))
        return {name: np.concatenate(parts) for name, parts in out.items()}


def check_image_to_image(targets: Sequence[Any], strength: float) -> float:
    """The strength of an image-to-image run over these catalogue targets, or a clear error."""
    value = float(strength)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ConditionError(f"strength must be between 0 and 1 (got {strength})")
    markers = [t.name for t in targets if t.kind != "rgb"]
    if markers:
        raise ConditionError(f"strength (image-to-image) applies to RGB stains; {', '.join(markers)} "
                             "are marker maps, read from the H&E in one step: leave strength unset")
    return value
