"""napari-mupd: the napari plugin over the MuPD engine.

Holds an `mupd.engine.Engine` (local or remote) and turns its results into layers. Never
imports torch: everything heavy goes through the engine.
"""

__version__ = "0.1.0"
