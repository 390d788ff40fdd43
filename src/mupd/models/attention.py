"""The adaLN-Zero transformer block with decoupled cross-modal attention (DCA).

Per block: self-attention over image tokens; then one cross-attention stream per condition
modality, all sharing one query projection of the image tokens but each with its own K/V
projections; the streams' outputs are summed with per-modality scales and go through one
output projection (zero-initialised, so a fresh block ignores conditions); then the MLP.
A modality absent from the whole batch, or whose scale is 0, is not computed at all, so scale 0
is exactly the model without it; a sample of a batch that lacks a modality gets exactly zero
from that stream (its mask row is all False), never attention over padding tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

#: The condition modalities with a cross-attention stream, in a fixed order.
MODALITIES = ("text", "rna", "reference")

Context = tuple[torch.Tensor, torch.Tensor]  # tokens (B, L, D_m), mask (B, L) bool


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class DCABlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, context_dims: dict[str, int],
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.ModuleDict({m: nn.Linear(c, 2 * dim) for m, c in context_dims.items()})
        self.cross_out = nn.Linear(dim, dim, bias=False)  # no bias: a sample without conditions gets 0
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)
        nn.init.zeros_(self.cross_out.weight)

    def cross_attention(self, x: torch.Tensor, contexts: dict[str, Context],
                        scales: dict[str, float]) -> Optional[torch.Tensor]:
        streams = [(m, c) for m, c in contexts.items() if scales.get(m, 1.0) != 0]
        if not streams:
            return None
        q = _heads(self.cross_q(self.norm_cross(x)), self.num_heads)
        total = torch.zeros_like(x)
        for modality, (tokens, mask) in streams:
            present = mask.any(dim=1)
            # A sample without this modality attends to one dummy key (keeps the softmax finite)
            # and its output is multiplied by 0: exactly no contribution, no data-dependent
            # indexing (so meta tensors, CUDA graphs and torch.compile all work).
            first = torch.zeros_like(mask)
            first[:, 0] = True
            safe = mask | (first & ~present[:, None])
            k, v = self.cross_kv[modality](tokens).chunk(2, dim=-1)
            out = F.scaled_dot_product_attention(q, _heads(k, self.num_heads), _heads(v, self.num_heads),
                                                 attn_mask=safe[:, None, None, :])
            weight = present.to(x.dtype) * scales.get(modality, 1.0)
            total = total + _merge(out) * weight[:, None, None]
        return self.cross_out(total)

    def forward(self, x: torch.Tensor, c: torch.Tensor, contexts: dict[str, Context],
                scales: dict[str, float]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(*(_heads(t, self.num_heads) for t in (q, k, v)))
        x = x + gate1[:, None] * self.attn_out(_merge(h))
        cross = self.cross_attention(x, contexts, scales)
        if cross is not None:
            x = x + cross
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
