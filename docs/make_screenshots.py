"""Screenshots of the real napari window with each MuPD panel, for the README and docs.

    xvfb-run -a python docs/make_screenshots.py [--data ../shared/data] [--out docs/screenshots]

Drives the panels as a user would on held-out HER2ST section B4 (patient B, never trained on):
calibrate the JPEG, draw a region, translate; load a B4 spot's RNA and generate; fine-tune a few
steps from the open layers. Needs ../shared/data (the HER2ST images and counts).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def wait(task, timeout_s: float = 900) -> None:
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + timeout_s
    while not task.done:
        QApplication.processEvents()
        time.sleep(0.02)
        if time.monotonic() > deadline:
            raise TimeoutError(task.what)
    for _ in range(20):
        QApplication.processEvents()
    if task.error is not None:
        raise task.error


def shoot(viewer, path: Path) -> None:
    from skimage.io import imsave

    from napari_mupd.demo import wait_for_render

    imsave(path, wait_for_render(viewer), check_contrast=False)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import os
    import tempfile

    os.environ["MUPD_CONFIG"] = tempfile.mkdtemp(prefix="mupd-shots-")  # leave the user's panel settings alone

    import napari
    import pandas as pd

    from mupd.names import ihc_name
    from napari_mupd._engine_panel import EnginePanel
    from napari_mupd._finetune_panel import LAYERS, FinetunePanel
    from napari_mupd._generate_panel import GeneratePanel
    from napari_mupd._session import session
    from napari_mupd._translate_panel import TranslatePanel
    from napari_mupd.demo import WINDOW_SIZE, frame

    session().engine()
    viewer = napari.Viewer(title="MuPD")
    viewer.window.resize(*WINDOW_SIZE)
    (slide,) = viewer.open(str(args.data / "st/her2st/images/B4_HE.jpg"), plugin="napari-mupd")
    frame(viewer)

    engine = EnginePanel(viewer)
    dock = viewer.window.add_dock_widget(engine, name="Engine", area="right")
    shoot(viewer, args.out / "engine.png")
    viewer.window.remove_dock_widget(dock)

    x, y, w, h = 3600, 4200, 1400, 1100
    rect = np.array([[y, x], [y, x + w], [y + h, x + w], [y + h, x]], float)
    shapes = viewer.add_shapes([rect], shape_type="rectangle", name="ROI", edge_color="yellow",
                               face_color="transparent", edge_width=6)
    shapes.selected_data = {0}
    translate = TranslatePanel(viewer)
    translate.stains.value = ["HER2", "CD45"]
    translate.user_mpp.value = 0.69
    dock = viewer.window.add_dock_widget(translate, name="Translate", area="right")
    wait(translate.run())
    translate.side_by_side.value = True
    for layer in viewer.layers:
        if layer.metadata.get("mupd_result"):
            layer.visible = layer.name.startswith((ihc_name("HER2"), "CD45"))
    viewer.camera.center = (0, (y + h / 2) * 0.69, (x + w * 1.05) * 0.69)
    viewer.camera.zoom = 0.55
    shoot(viewer, args.out / "translate.png")
    viewer.window.remove_dock_widget(dock)

    counts = pd.read_csv(args.data / "st/her2st/counts/B4.tsv.gz", sep="\t", index_col=0)
    spot = counts.sum(axis=1).idxmax()  # the deepest B4 spot
    profile = Path(os.environ["MUPD_CONFIG"]) / f"B4_spot_{spot}.csv"
    counts.loc[spot].rename_axis("gene").rename("count").to_csv(profile)
    generate = GeneratePanel(viewer)
    generate.prompt.value = "H&E, breast, HER2-positive carcinoma, HER2-high, immune-rich"
    generate.rna_file.value = profile
    generate.samples.value, generate.steps.value = 9, 20
    dock = viewer.window.add_dock_widget(generate, name="Generate", area="right")
    wait(generate.run())
    grid = next(l for l in viewer.layers if l.metadata.get("mupd_generated"))
    viewer.camera.center = (0, *(np.asarray(grid.extent.world).mean(axis=0)[-2:]))
    viewer.camera.zoom = 1.6
    shoot(viewer, args.out / "generate.png")
    viewer.window.remove_dock_widget(dock)

    finetune = FinetunePanel(viewer)
    finetune.source_kind.value = LAYERS
    finetune.source_layer.value = slide
    finetune.target_layer.value = next(l for l in viewer.layers if l.name == "HER2 [ROI 1]")
    finetune.stain.value = "HER2-mine"
    finetune.steps.value = 40
    from mupd.paths import cache_dir

    finetune.output.value = str(cache_dir() / "models" / f"screenshot-ft-{time.strftime('%H%M%S')}")
    dock = viewer.window.add_dock_widget(finetune, name="Fine-tune", area="right")
    viewer.reset_view()
    wait(finetune.start())
    shoot(viewer, args.out / "finetune.png")
    viewer.close()


if __name__ == "__main__":
    main()
