"""The demo: the sample H&E slide in napari, calibrated, through the plugin's own reader.

    python -m napari_mupd.demo --out demo-out [--interactive]

Opens the slide, draws a default region of interest, runs the bundled model's virtual staining
on it through the same calls as the Translate panel (HER2 and Ki67 marker maps plus their
rendered brightfield IHC, one OME-Zarr each in `<out>/virtual-stain/`), overlays the results and
fills the panel's table of predicted per-region scores (% positive cells, H-score).
Without --interactive it waits until the window is drawn, saves it as `<out>/viewer.png`, says
what it did and exits 0 (what `make demo` runs headless under Xvfb).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

WINDOW_SIZE = (1600, 1000)
DEMO_STAINS = ["HER2", "Ki67"]
#: Level-0 box (x, y, w, h) of the CMU-1 sample: a tumour-rich field in the slide's middle.
DEFAULT_ROI = (700, 1000, 1024, 1024)


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


def stain_default_roi(viewer, slide_layer, out_dir: Path) -> list:
    """Virtual HER2/Ki67 on the default ROI, as the Translate panel does it; returns the new layers."""
    import dataclasses
    import shutil

    from mupd.io import Region
    from mupd.scores import ScoredRegion
    from mupd.names import ihc_name
    from napari_mupd._session import session
    from napari_mupd._translate_panel import TranslatePanel, add_results, translation_requests

    x, y, w, h = DEFAULT_ROI
    polygon = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    mpp = slide_layer.metadata["mpp"][0]
    viewer.add_shapes([np.array([[py, px] for px, py in polygon], float) * mpp], shape_type="rectangle",
                      name="ROI", edge_color="yellow", face_color="transparent", edge_width=4,
                      units=("um", "um"))
    out = out_dir / "virtual-stain"
    if out.exists():  # the demo's own previous output
        shutil.rmtree(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (request,) = translation_requests(slide_layer, [polygon], DEMO_STAINS, steps=1, seed=0,
                                      render_brightfield=True)
    request = dataclasses.replace(request, output_path=str(out))
    engine = session().engine()  # the bundled model, loaded before the panel asks for it
    panel = TranslatePanel(viewer)
    panel.stains.value = DEMO_STAINS
    viewer.window.add_dock_widget(panel, name="Translate", area="right")
    start = time.perf_counter()
    result = engine.translate(request)
    layers = add_results(viewer, [("ROI 1", result)], panel.side_by_side.value)
    panel.show_scores([ScoredRegion(Region(polygon, name="ROI 1"), result.scores, result.cells)])
    for layer in layers:  # one familiar brightfield view on top; the others a click away
        layer.visible = layer.name.startswith(ihc_name(DEMO_STAINS[0]))
        if layer.visible:
            viewer.layers.selection.active = layer  # its controls (opacity) in the side panel
    print(f"virtual {', '.join(DEMO_STAINS)} on ROI x={x} y={y} {w}x{h} px: {result.n_tiles} tiles in "
          f"{time.perf_counter() - start:.1f} s on {session().current_info.device} "
          f"({session().current_info.model_name}); wrote {result.output_path}")
    for score in result.scores:
        read = (f"{score.percent_positive:.1f}% positive, H-score {score.h_score:.0f}"
                if score.n_cells else "no cells found")
        print(f"  predicted {score.marker}: {score.n_cells} cells, {read} "
              "(a read-out of the model's prediction, not a measured stain)")
    return layers


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
        stain_default_roi(viewer, layers[0], out_dir)
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
