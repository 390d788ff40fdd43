"""The flow-matching training objective of a MuPDPipeline (the pipeline itself only samples).

Objective: the linear interpolant x_t = (1 - t) x_0 + t * noise, the model predicting the
velocity v = noise - x_0 (an x0 model's output turned into v by `MuPDPipeline.as_velocity`),
training timesteps logit-normal (t = sigmoid(N(0, 1))), except that a `readout_fraction` of
translation samples is trained at t = 1 (the one-step readout, which logit-normal timesteps
would almost never reach), and each token modality (text, RNA, reference) dropped per sample
with the config's probability so that one model also gives the unconditional velocity for
guidance.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..conditions import model_kwargs
from ..errors import ConditionError
from ..models.attention import MODALITIES
from ..models.codec import encode_targets
from ..data.sections import footprint_mask
from ..models.configs import READOUT_FRACTION
from ..models.readout import gene_loss, spot_weights


class FlowMatchingObjective:
    """What `Trainer` trains: `pipeline.transformer` under this loss (`to`, `training_loss`,
    `rna_tokenizer`, as `VAEObjective` and the tests' stand-ins)."""

    #: `training_loss` takes latents cached once before training (mupd.train.latents) in place
    #: of "target" / "source" pixels: "target_latents" / "source_latents".
    LATENT_BATCHES = True

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self._weights: Optional[torch.Tensor] = None

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def rna_tokenizer(self) -> Any:
        return self.pipeline.rna_tokenizer

    def to(self, device: torch.device | str) -> "FlowMatchingObjective":
        self.pipeline.to(device)
        return self

    def training_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """The clean latents x0 of a batch: cached ones as given, else the target pixels encoded
        (marker maps through the marker codec, when the model has one)."""
        pipe = self.pipeline
        n = len(batch["target_latents"] if batch.get("target_latents") is not None else batch["target"])
        if len(batch["stain"]) != n:
            raise ConditionError(f"{len(batch['stain'])} stain names for {n} targets")
        if batch.get("target_latents") is not None:
            x0 = batch["target_latents"].to(pipe.device).float()
            lat = pipe.tile_size // pipe.codec.downsample
            if x0.ndim != 4 or x0.shape[1:] != (pipe.codec.latent_channels, lat, lat):
                raise ConditionError(f"cached training latents of shape {tuple(x0.shape)}; expected "
                                     f"(B, {pipe.codec.latent_channels}, {lat}, {lat}): was the cache "
                                     "built with another codec or tile size?")
            return x0
        target = batch["target"].to(pipe.device)
        if target.ndim != 4 or target.shape[1] != 3 or target.shape[2:] != (pipe.tile_size,) * 2:
            raise ConditionError(f"training target of shape {tuple(target.shape)}; expected "
                                 f"(B, 3, {pipe.tile_size}, {pipe.tile_size})")
        is_marker = [pipe.catalogue.get(s).kind == "marker" for s in batch["stain"]]
        return encode_targets(pipe.codec, pipe.marker_codec, target.float(), is_marker)

    def training_loss(self, batch: dict[str, Any], model: Optional[torch.nn.Module] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Flow-matching loss of one batch; noise, timesteps and dropout all come from
        `generator` (on its own device), so a loss is reproducible.

        batch: "target" (B, 3, H, W) in [-1, 1] or "target_latents" (cached); "stain" list[str];
        optional "source" (B, 3, H, W) or "source_latents", + optional "source_present" (B,) bool
        (a batch mixing tasks);
        "text" list[str | None]; "rna_values" (B, G) + "rna_mask" (B, G) bool;
        "reference" (B, 3, H, W) + optional "reference_present" (B,) bool;
        optional "target_valid" (B, 1, H, W) in [0, 1]: where the target counts in the loss;
        optional "genes" (B, G): spot RNA for the model's gene readout (`models.readout`), whose
        masked loss is added with its weight."""
        pipe = self.pipeline
        model = model if model is not None else pipe.transformer
        device = pipe.device
        x0 = self.training_latents(batch)
        b = x0.shape[0]
        weight = None
        if batch.get("target_valid") is not None:
            # A latent cell weighs the fraction of its pixels that were measured: the values a
            # marker map interpolates between spot footprints are not a training signal.
            weight = F.avg_pool2d(batch["target_valid"].to(device).float(), pipe.codec.downsample)
            if weight.shape[0] != b or weight.shape[-2:] != x0.shape[-2:]:
                raise ConditionError(f"target mask of shape {tuple(batch['target_valid'].shape)} "
                                     f"does not match targets of latent shape {tuple(x0.shape)}")
        gen_device = generator.device if generator is not None else device

        def draw(shape: tuple[int, ...], normal: bool) -> torch.Tensor:
            fn = torch.randn if normal else torch.rand
            return fn(shape, generator=generator, device=gen_device).to(device)

        noise = draw(tuple(x0.shape), True)
        t = torch.sigmoid(draw((b,), True))
        keep = {m: draw((b,), False) >= pipe.config["dropout"].get(m, 0.0) for m in MODALITIES}
        cond: dict[str, Any] = {"stain": pipe.stain_ids(batch["stain"])}
        if batch.get("source_latents") is not None:
            cond["source"] = batch["source_latents"].to(device).float()
        elif batch.get("source") is not None:
            cond["source"] = pipe.encode_images(batch["source"].to(device))
        if "source" in cond:
            if batch.get("source_present") is not None:
                cond["source_present"] = batch["source_present"].to(device).bool()
        text = pipe.encode_text(batch.get("text"))
        if text is not None:
            cond["text"] = (text[0], text[1] & keep["text"][:, None])
        if batch.get("rna_values") is not None:
            mask = batch["rna_mask"].to(device).bool() & keep["rna"][:, None]
            cond["rna"] = (batch["rna_values"].to(device).float(), mask)
        if batch.get("reference") is not None:
            present = batch.get("reference_present")
            present = keep["reference"] if present is None else present.to(device).bool() & keep["reference"]
            cond["reference"] = (pipe.encode_images(batch["reference"].to(device)), present)
        readout = float(pipe.config.get("readout_fraction", READOUT_FRACTION))
        if cond.get("source") is not None and readout > 0:  # train the one-step readout
            translating = cond.get("source_present", torch.ones(b, dtype=torch.bool, device=device))
            t = torch.where(translating & (draw((b,), False) < readout), torch.ones_like(t), t)
        tt = t[:, None, None, None]
        xt = (1 - tt) * x0 + tt * noise
        readout = getattr(pipe, "gene_readout", None)
        readout_genes = readout is not None and batch.get("genes") is not None
        out = model(xt, t, **model_kwargs(cond), **({"return_genes": True} if readout_genes else {}))
        out, tokens = out if readout_genes else (out, None)
        pred = pipe.as_velocity(out, xt, t)
        error = (pred.float() - (noise - x0).float()) ** 2
        if weight is None:
            loss = error.mean()
        else:
            loss = (error * weight).sum() / (weight.sum() * error.shape[1]).clamp_min(1e-8)
        if tokens is None:
            return loss
        # the gene head learns where translation is read: the t = 1 samples with a source
        rows = (t >= 1) & cond.get("source_present", torch.ones(b, dtype=torch.bool, device=device))
        return loss + readout.weight * gene_loss(tokens, batch["genes"].to(device),
                                                 self._spot_weights(), readout, rows)

    def _spot_weights(self) -> torch.Tensor:
        """Token weights of the central spot footprint, made once per objective."""
        if self._weights is None:
            pipe = self.pipeline
            token_px = pipe.codec.downsample * pipe.transformer.config.patch_size
            self._weights = spot_weights(footprint_mask(pipe.tile_size, pipe.mpp), token_px)
        return self._weights
