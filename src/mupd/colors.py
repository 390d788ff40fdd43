"""napari colormap names <-> OME channel colours ('RRGGBB'): one table for the engine, which
writes a marker layer's colormap into its file, and the plugin, which reads it back.

No napari and no torch here, so both sides import it.
"""

from __future__ import annotations

from typing import Optional

#: napari's linear colormaps (black to one colour) by that colour: the same both ways.
_LINEAR = {"red": "FF0000", "green": "00FF00", "blue": "0000FF", "yellow": "FFFF00",
           "magenta": "FF00FF", "cyan": "00FFFF", "gray": "FFFFFF"}
#: Plus napari's perceptual 'bop' colormaps by their hue, for writing only: they are not
#: linear, so a file colour never reads back as one.
_HEX = {**_LINEAR, "bop orange": "FF8000", "bop purple": "8000FF", "bop blue": "0080FF"}
_BY_HEX = {hex_color: name for name, hex_color in _LINEAR.items()}


def colormap_hex(name: str) -> str:
    """OME channel colour for a napari colormap name (unknown names fall back to white)."""
    return _HEX.get(name, "FFFFFF")


def linear_colormap(hex_color: str) -> Optional[str]:
    """The name of napari's linear colormap ending in `hex_color` ('RRGGBB', '#' and case
    ignored), or None when napari has none."""
    return _BY_HEX.get(hex_color.lstrip("#").upper())
