"""The condition dict that sampling, guidance and the training loss all run the transformer with.

cond: "stain" (B,) long catalogue ids; optional "source" (B, C, h, w) latents with optional
"source_present" (B,) bool (a batch mixing translation and generation); each token modality
(`MODALITIES`) as a pair: "text" (tokens, mask), "rna" (values, mask), "reference" (latents,
present). An absent key is an absent condition.
"""

from __future__ import annotations

from typing import Any


def model_kwargs(cond: dict[str, Any]) -> dict[str, Any]:
    """`MuPDTransformer.forward` keyword arguments for a condition dict."""
    kwargs: dict[str, Any] = {"stain": cond["stain"], "source": cond.get("source")}
    if cond.get("source_present") is not None:
        kwargs["source_present"] = cond["source_present"]
    if cond.get("text") is not None:
        kwargs["text"], kwargs["text_mask"] = cond["text"]
    if cond.get("rna") is not None:
        kwargs["rna_values"], kwargs["rna_mask"] = cond["rna"]
    if cond.get("reference") is not None:
        kwargs["reference"], kwargs["reference_present"] = cond["reference"]
    return kwargs
