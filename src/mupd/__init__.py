"""MuPD engine: slides, data, the multimodal diffusion model, training, evaluation, serving.

This package never imports Qt or napari; the plugin (`napari_mupd`) talks to it through
`mupd.engine.Engine`.
"""

__version__ = "0.1.0"
