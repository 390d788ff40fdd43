"""Engine results as napari layers, placed in micrometres over (or beside) the source slide.

The one place a result layer (`mupd.regions.outputs.StainLayer`) becomes a napari layer tuple.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from mupd.regions.outputs import StainLayer

LayerData = tuple[Any, dict, str]
RESULT_KEY = "mupd_result"  # metadata flag of layers this plugin made
IHC_OPACITY = 0.7
SIDE_GAP = 0.05  # side-by-side: gap between the slide region and the result, fraction of its width


def result_name(stain: str, region: str) -> str:
    """A result layer's name: its stain and, in brackets, the region it covers."""
    return f"{stain} [{region}]"


def stain_of(layer_name: str) -> str:
    """The stain a layer's name starts with: `result_name`'s stain, or the whole name."""
    return layer_name.split(" [")[0]


def stain_layer_data(layers: Sequence[StainLayer], region: str) -> list[LayerData]:
    """IHC/H&E results as RGB at partial opacity; markers additive with their named colormaps."""
    out = []
    for layer in layers:
        data, where = np.asarray(layer.data), layer.placement
        width_um = data.shape[1] * where.scale_um[1]
        meta = {**layer.metadata, RESULT_KEY: True, "region": region,
                "mupd_translate_um": list(where.translate_um),
                "mupd_side_offset_um": width_um * (1 + SIDE_GAP)}
        kwargs: dict[str, Any] = {
            "name": result_name(layer.name, region), "scale": where.scale_um,
            "translate": where.translate_um, "units": ("um", "um"), "metadata": meta,
        }
        if layer.kind == "rgb":
            kwargs.update(rgb=True, opacity=IHC_OPACITY, blending="translucent")
        else:
            kwargs.update(colormap=layer.colormap, blending="additive", contrast_limits=(0.0, 1.0))
        out.append((data, kwargs, "image"))
    return out


def result_layers(viewer: Any) -> list[Any]:
    return [layer for layer in viewer.layers if layer.metadata.get(RESULT_KEY)]


def arrange(layers: Iterable[Any], side_by_side: bool) -> None:
    """Overlay: results exactly over their region. Side by side: shifted right by one region width."""
    for layer in layers:
        y, x = layer.metadata["mupd_translate_um"]
        shift = layer.metadata["mupd_side_offset_um"] if side_by_side else 0.0
        layer.translate = (y, x + shift)


def set_rgb_opacity(layers: Iterable[Any], opacity: float) -> None:
    for layer in layers:
        if layer.rgb:
            layer.opacity = opacity
