"""Names the engine gives and the plugin, the CLI and the server read back: one home each, plain
strings (no torch), so the plugin imports them too."""

from __future__ import annotations

#: Guidance key of the translation source (image guidance): scale 1 is the plain conditional
#: model, 0 the model with the source hidden, above 1 extrapolates away from it.
SOURCE = "source"


def ihc_name(marker: str) -> str:
    """Layer (and file) name of a marker's rendering as brightfield IHC: "IHC-<marker>"."""
    return f"IHC-{marker}"
