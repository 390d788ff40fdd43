"""The demo: the sample H&E slide in napari, calibrated, through the plugin's own reader.

    python -m napari_mupd.demo --out demo-out [--interactive]

Without --interactive it waits until the slide is drawn, saves the whole window as
`<out>/viewer.png`, says what it did and exits 0 (what `make demo` runs headless under Xvfb).
Each step is one function so later steps (e.g. a virtual stain on a default ROI) slot in between
`open_sample` and `frame`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

WINDOW_SIZE = (1400, 900)


def open_sample(viewer) -> list:
    """The CMU-1 small-region slide opened with napari-mupd's reader (not napari's built-in one)."""
    from mupd.io.samples import sample_slide_path

    return viewer.open(sample_slide_path(), plugin="napari-mupd")


def frame(viewer) -> None:
    """Scale bar on (its unit comes from the layers' micrometre units) and the slide fitted in view."""
    canvas = getattr(viewer, "canvas", None)  # napari >= 0.9 keeps overlays on the canvas
    scale_bar = canvas.overlays.scale_bar if canvas is not None else viewer.scale_bar
    scale_bar.visible = True
    viewer.reset_view()


def is_blank(image: np.ndarray) -> bool:
    """True when a screenshot is (nearly) one flat colour: nothing has been drawn yet."""
    rgb = np.asarray(image)[..., :3].astype(np.float32)
    background = np.median(rgb.reshape(-1, 3), axis=0)
    drawn = np.abs(rgb - background).max(axis=-1) > 30
    return float(rgb.std()) < 5.0 or float(drawn.mean()) < 0.05


def wait_for_render(viewer, timeout_s: float = 60.0) -> np.ndarray:
    """Process Qt events until the canvas shows pixels (tiles load lazily), then the window image."""
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + timeout_s
    while True:
        QApplication.processEvents()
        if not is_blank(viewer.screenshot(canvas_only=True, flash=False)):
            QApplication.processEvents()
            return viewer.screenshot(canvas_only=False, flash=False)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the canvas was still blank after {timeout_s:.0f} s")
        time.sleep(0.1)


def save_screenshot(image: np.ndarray, out_dir: Path) -> Path:
    from skimage.io import imsave

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "viewer.png"
    imsave(path, np.asarray(image), check_contrast=False)
    return path


def run(out_dir: Path, interactive: bool = False) -> Optional[Path]:
    """Open, frame and either hand over to the user or save a screenshot; returns the PNG path."""
    import napari

    viewer = napari.Viewer(title="MuPD demo")
    viewer.window.resize(*WINDOW_SIZE)
    try:
        layers = open_sample(viewer)
        frame(viewer)
        for layer in layers:
            mpp = layer.metadata.get("mpp")
            print(f"opened {layer.metadata.get('slide_path')} as layer {layer.name!r}: "
                  f"{layer.level_shapes[0][1]}x{layer.level_shapes[0][0]} px, "
                  f"{len(layer.level_shapes)} level(s), {mpp[0] if mpp else 'unknown'} um/px")
        print("scale bar on, view fitted to the slide")
        if interactive:
            napari.run()
            return None
        path = save_screenshot(wait_for_render(viewer), out_dir)
        print(f"wrote {path} (the whole napari window)")
        return path
    finally:
        viewer.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_mupd.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for viewer.png")
    parser.add_argument("--interactive", action="store_true", help="keep the window open for the user")
    args = parser.parse_args(argv)
    from mupd.errors import MuPDError

    try:
        run(args.out, args.interactive)
    except (MuPDError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
