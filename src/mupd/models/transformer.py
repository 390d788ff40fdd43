"""MuPDTransformer: a SiT/DiT-style transformer over patchified latents with DCA blocks.

Global conditioning (adaLN-Zero): timestep + target-stain token + "has a source" flag.
Translation concatenates the source latents to the noisy latents along channels (zeros and
flag 0 when there is none). Token conditioning: one cross-attention stream per modality in
every block (see `attention.DCABlock`). With `readout_genes` > 0 a linear head on the final
tokens predicts a gene panel's expression per token (`models.readout`). With
`pooled_conditioning` the masked mean of the text and RNA tokens also joins the adaLN condition
through a small MLP per modality (SD3's pooled projection): cross-attention lets each image token
look up what it needs, the pooled vector modulates every token at once, which is how a
tile-level attribute (cellularity, a marker's level) reaches the whole tile. The constructor
arguments are the config, so `save_pretrained` / `from_pretrained` (diffusers, safetensors) need
no extra code.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import DCABlock, modulate
from .conditioning import ReferenceImageEncoder, RNAGroupEncoder


#: Init std of the stain and has-source embeddings. They are summed with the timestep embedding
#: into the adaLN condition; at DiT's 0.02 they are ~invisible next to it, and a short CPU run
#: (the bundled tiny model, 600 steps) ended predicting the same map for every marker.
EMBED_INIT_STD = 0.5


class MuPDTransformer(ModelMixin, ConfigMixin):
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, latent_channels: int = 48, patch_size: int = 2, hidden_size: int = 192,
                 depth: int = 6, num_heads: int = 3, mlp_ratio: float = 4.0, max_stains: int = 64,
                 text_dim: int = 384, num_genes: int = 64, rna_group_size: int = 8,
                 cond_dim: Optional[int] = None, reference_grid: int = 4,
                 readout_genes: int = 0, pooled_conditioning: bool = False) -> None:
        super().__init__()
        cond_dim = cond_dim or hidden_size
        self.gradient_checkpointing = False
        self.patch_embed = nn.Linear(2 * latent_channels * patch_size ** 2, hidden_size)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, hidden_size)
        self.stain_embed = nn.Embedding(max_stains, hidden_size)
        self.source_embed = nn.Embedding(2, hidden_size)
        self.text_norm = nn.LayerNorm(text_dim)
        self.rna_encoder = RNAGroupEncoder(num_genes, rna_group_size, cond_dim)
        self.reference_encoder = ReferenceImageEncoder(latent_channels, cond_dim, reference_grid)
        contexts = {"text": text_dim, "rna": cond_dim, "reference": cond_dim}
        self.blocks = nn.ModuleList([DCABlock(hidden_size, num_heads, contexts, mlp_ratio)
                                     for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = nn.Linear(hidden_size, patch_size ** 2 * latent_channels)
        self.gene_head = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, readout_genes)) \
            if readout_genes > 0 else None
        self.pooled = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, hidden_size), nn.SiLU(),
                                                      nn.Linear(hidden_size, hidden_size))
                                     for m, d in (("text", text_dim), ("rna", cond_dim))}) \
            if pooled_conditioning else None
        nn.init.normal_(self.stain_embed.weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.source_embed.weight, std=EMBED_INIT_STD)
        for layer in (self.final_modulation[1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def with_pooled_conditioning(self) -> "MuPDTransformer":
        """This trained transformer plus the pooled-condition MLPs, every other weight kept; their
        output layers are zero, so before any training the new model computes what this one does
        (a warm start)."""
        if self.pooled is not None:
            return self
        new = type(self).from_config(self.config, pooled_conditioning=True)
        missing, unexpected = new.load_state_dict(self.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("pooled.") for k in missing), (missing, unexpected)
        for mlp in new.pooled.values():
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)
        return new.to(device=self.device, dtype=self.dtype)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def _unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.latent_channels
        b = x.shape[0]
        x = x.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)

    def _pos_embed(self, h: int, w: int, x: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        if h != w:
            raise ValueError(f"latents must be square, got {h}x{w}")
        pos = get_2d_sincos_pos_embed(self.config.hidden_size, h // p, base_size=h // p,
                                      device=x.device, output_type="pt")
        return pos.to(x.dtype)[None]

    def _pooled(self, contexts: dict[str, tuple[torch.Tensor, torch.Tensor]],
                scales: dict[str, float], dtype: torch.dtype) -> torch.Tensor | float:
        """The pooled-condition term of the adaLN vector: per modality the masked token mean
        through its MLP, times the stream's scale; a sample without the modality gets 0."""
        if self.pooled is None:
            return 0.0
        total: torch.Tensor | float = 0.0
        for m, (tokens, mask) in contexts.items():
            scale = scales.get(m, 1.0)
            if m not in self.pooled or scale == 0:
                continue
            w = mask.to(dtype)[..., None]
            mean = (tokens * w).sum(1) / w.sum(1).clamp(min=1.0)
            present = mask.any(-1).to(dtype)[:, None]
            total = total + scale * present * self.pooled[m](mean)
        return total

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, stain: torch.Tensor,
                source: Optional[torch.Tensor] = None,
                text: Optional[torch.Tensor] = None, text_mask: Optional[torch.Tensor] = None,
                rna_values: Optional[torch.Tensor] = None, rna_mask: Optional[torch.Tensor] = None,
                reference: Optional[torch.Tensor] = None,
                reference_present: Optional[torch.Tensor] = None,
                source_present: Optional[torch.Tensor] = None,
                scales: Optional[dict[str, float]] = None,
                return_genes: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Velocity for latents `sample` (B, C, h, w) at `timestep` (B,) in [0, 1] (1 = noise).

        `stain` (B,) long: catalogue ids. `source` (B, C, h, w) or None; `source_present` (B,) bool marks
        which samples have one when a batch mixes translation and generation. Each modality is given
        as tokens + mask; a sample whose mask row is all False does not have it. `scales`
        multiplies each stream's output (0 = skip the stream). `return_genes`: also the gene
        head's (B, N tokens, G) predictions (row-major token grid)."""
        b, _, h, w = sample.shape
        has_source = source is not None
        if has_source and source_present is not None:  # a batch mixing tasks: zero the absent
            source = source * source_present.to(source.dtype)[:, None, None, None]
        source = source if has_source else torch.zeros_like(sample)
        x = self.patch_embed(self._patchify(torch.cat([sample, source], dim=1)))
        x = x + self._pos_embed(h, w, x)
        t = self.time_embed(self.time_proj(timestep.float() * 1000).to(x.dtype))
        if has_source and source_present is not None:
            flag = source_present.to(device=x.device, dtype=torch.long)
        else:
            flag = torch.full((b,), int(has_source), device=x.device, dtype=torch.long)
        c = t + self.stain_embed(stain) + self.source_embed(flag)
        contexts = {}
        if text is not None:
            contexts["text"] = (self.text_norm(text.to(x.dtype)), text_mask.bool())
        if rna_values is not None:
            contexts["rna"] = self.rna_encoder(rna_values.to(x.dtype), rna_mask.bool())
        if reference is not None:
            present = torch.ones(b, dtype=torch.bool, device=x.device) \
                if reference_present is None else reference_present.bool()
            contexts["reference"] = self.reference_encoder(reference.to(x.dtype), present)
        scales = scales or {}
        c = c + self._pooled(contexts, scales, c.dtype)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, contexts, scales)
            else:
                x = block(x, c, contexts, scales)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        out = self._unpatchify(self.final_linear(modulate(self.final_norm(x), shift, scale)), h, w)
        if not return_genes:
            return out
        if self.gene_head is None:
            raise ValueError("this transformer has no gene readout head (readout_genes=0)")
        return out, self.gene_head(x)
