"""Translating regions of slides, one module per idea.

`plan` is a region's geometry (output grid, tiles, pyramid level, placement), derived once by
a pure function that translation, a remote upload and the server's size check all use;
`source` reads the tiles' pixels from slides (and in-memory windows of them); `blend` holds
the feathered, fixed-point blending sums; `translate` runs a pipeline over a planned region;
`outputs` is the result layer with its placement and the one writer of results to disk.
"""
