"""Sample data: the CC0 CMU-1 small-region H&E slide, opened exactly as the reader opens a file."""

from __future__ import annotations

from ._reader import LayerData, slide_layer_data


def cmu1_small() -> list[LayerData]:
    """CMU-1-Small-Region.svs (2220 x 2967 px, 0.499 um/px); fetched into the user cache on first use."""
    from mupd.io import open_slide
    from mupd.io.samples import sample_slide_path

    return slide_layer_data(open_slide(sample_slide_path()))
