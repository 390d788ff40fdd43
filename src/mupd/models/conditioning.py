"""Condition token encoders that train with the transformer (text states come in ready-made).

Each returns (tokens (B, L, D), mask (B, L) bool); a row with an all-False mask is a sample
without that modality, which the attention skips.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RNAGroupEncoder(nn.Module):
    """Gene-set tokens: consecutive groups of `group_size` panel genes, one token per group.

    A token is a masked projection of its genes' values (measured value and measured flag per
    gene, own weights per group) plus a learned group embedding; a group with no measured gene
    is masked out of attention instead of being fed zeros.
    """

    def __init__(self, num_genes: int, group_size: int, dim: int) -> None:
        super().__init__()
        self.num_genes, self.group_size = num_genes, group_size
        self.num_groups = -(-num_genes // group_size)
        fan_in = 2 * group_size
        self.weight = nn.Parameter(torch.randn(self.num_groups, fan_in, dim) / math.sqrt(fan_in))
        self.bias = nn.Parameter(torch.zeros(self.num_groups, dim))
        self.group_pos = nn.Parameter(torch.randn(self.num_groups, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.num_groups * self.group_size - self.num_genes
        m = mask.to(values.dtype)
        x = torch.stack([values * m, m], dim=-1)  # (B, G, 2)
        x = nn.functional.pad(x, (0, 0, 0, pad)).reshape(len(values), self.num_groups, -1)
        tokens = torch.einsum("bgi,gid->bgd", x, self.weight.to(x.dtype)) + self.bias + self.group_pos
        present = nn.functional.pad(mask, (0, pad)).reshape(len(values), self.num_groups, -1).any(-1)
        return self.norm(tokens), present


class ReferenceImageEncoder(nn.Module):
    """Tokens of a reference image's latents: a strided conv stem, then one token per cell of a
    `grid` x `grid` pooled map (so the token count does not grow with the tile size)."""

    def __init__(self, in_channels: int, dim: int, grid: int = 4) -> None:
        super().__init__()
        width = max(32, dim // 2)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, dim, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.pos = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, latents: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pool(self.stem(latents)).flatten(2).transpose(1, 2)  # (B, grid^2, dim)
        tokens = self.norm(self.proj(h + self.pos))
        return tokens, present[:, None].expand(-1, tokens.shape[1])
