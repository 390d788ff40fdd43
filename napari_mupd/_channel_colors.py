"""Channel colour <-> napari colormap, both ways, so a saved file keeps the colours seen on screen."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
from napari.utils.colormaps import Colormap

from mupd.colors import linear_colormap

#: Nuclear stains are conventionally blue; other unnamed channels take the next colour in turn.
_NUCLEAR = ("dapi", "hoechst", "nuclei", "nuclear")
_CYCLE = ("green", "magenta", "cyan", "yellow", "red", "blue")


def channel_colormap(name: str, hex_color: Optional[str], index: int) -> Union[str, Colormap]:
    """The colormap for one fluorescence channel: its file colour, else blue for DNA, else a cycle."""
    if hex_color:
        named = linear_colormap(hex_color)  # keeps layer colormap names readable (blue, green, ...)
        if named is not None:
            return named
        key = hex_color.lstrip("#").upper()
        rgb = [int(key[i:i + 2], 16) / 255 for i in (0, 2, 4)]
        return Colormap(colors=[[0, 0, 0, 1], [*rgb, 1]], name=f"mupd-{key.lower()}", display_name=name)
    if any(tag in name.lower() for tag in _NUCLEAR):
        return "blue"
    return _CYCLE[index % len(_CYCLE)]


def colormap_hex(colormap: Union[str, dict, Colormap, Sequence]) -> str:
    """The brightest colour of a layer's colormap as 'RRGGBB' (what OME channel colours store)."""
    from napari.utils.colormaps import ensure_colormap

    if isinstance(colormap, dict):
        colors = np.asarray(colormap["colors"], dtype=float)
    else:
        colors = np.asarray(ensure_colormap(colormap).colors, dtype=float)
    rgb = np.clip(np.rint(colors[-1, :3] * 255), 0, 255).astype(int)
    return "".join(f"{c:02X}" for c in rgb)
