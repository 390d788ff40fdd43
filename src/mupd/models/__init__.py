"""MuPD model pieces: transformer with DCA, codecs, condition encoders, catalogue, configs.

Import the submodules directly (`mupd.models.transformer`, ...); `mupd.pipeline` ties them together.
"""
