"""Classifier-free guidance, independent per modality and composable.

With `guidance=None` the model is run once with every given condition. With
`guidance={"text": w_t, "rna": w_r, ...}` the velocity is the compositional form
v = v_uncond + sum_m w_m (v_m - v_uncond), v_m being the model given only modality m (plus stain
and source); all these passes run as one batch. `guidance={"source": w}` (translation) is image
guidance on the source H&E: v = v(source hidden) + w (v(source) - v(source hidden)),
composable with the others.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from .errors import ConditionError
from .models.attention import MODALITIES
from .names import SOURCE

#: One model pass as a velocity: (latents, timesteps (B,), condition dict) -> velocity.
Velocity = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]


def check_guidance(guidance: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
    """The scales as floats, or a clear error for an unknown key or a non-finite scale."""
    if guidance is None:
        return None
    unknown = [k for k in guidance if k not in (*MODALITIES, SOURCE)]
    if unknown:
        raise ConditionError(f"guidance for unknown modality {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join((*MODALITIES, SOURCE))}")
    bad = [k for k, w in guidance.items() if not math.isfinite(float(w))]
    if bad:
        raise ConditionError(f"guidance scale for {', '.join(bad)} is not a finite number")
    return {k: float(w) for k, w in guidance.items()}


def guided_velocity(velocity: Velocity, x: torch.Tensor, t: float, cond: dict[str, Any],
                    guidance: Optional[dict[str, float]]) -> torch.Tensor:
    """The guided velocity at latents `x`, noise level `t` (see the module doc)."""
    if guidance and SOURCE in guidance and cond.get("source") is not None:
        w, rest = guidance[SOURCE], {k: v for k, v in guidance.items() if k != SOURCE} or None
        v_on = guided_velocity(velocity, x, t, cond, rest)
        if w == 1.0:
            return v_on
        hidden = {**cond, "source_present": torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)}
        v_off = guided_velocity(velocity, x, t, hidden, rest)
        return v_off + w * (v_on - v_off)
    present = [m for m in MODALITIES if cond.get(m) is not None]
    b = x.shape[0]
    if guidance is None or not present:
        return velocity(x, torch.full((b,), t, device=x.device), cond)
    passes = [None, *present]  # unconditional, then each modality alone
    k = len(passes)
    batched: dict[str, Any] = {"stain": cond["stain"].repeat(k)}
    if cond.get("source") is not None:
        batched["source"] = cond["source"].repeat(k, 1, 1, 1)
    for m in present:
        data, mask = cond[m]
        on = torch.tensor([p == m for p in passes], device=x.device).repeat_interleave(b)
        batched[m] = (data.repeat(k, *([1] * (data.ndim - 1))),
                      mask.repeat(k, *([1] * (mask.ndim - 1))) & on.view(-1, *([1] * (mask.ndim - 1))))
    v = velocity(x.repeat(k, 1, 1, 1), torch.full((k * b,), t, device=x.device), batched)
    v = v.view(k, b, *v.shape[1:])
    return v[0] + sum(guidance.get(m, 1.0) * (v[i + 1] - v[0]) for i, m in enumerate(present))
