"""Screenshots of the real napari window with each MuPD panel, for the README and docs.

    xvfb-run -a python docs/make_screenshots.py [--data ../shared/data] [--out docs/screenshots]

Drives the panels as a user would on held-out HER2ST section B4 (patient B, never trained on):
calibrate the JPEG, draw a region, translate (with the table of predicted scores), zoom in to the
cells of the rendered IHC; open a QuPath GeoJSON of classified annotations and translate every
annotation of one class; load a B4 spot's RNA and generate; fine-tune a few steps from the open
layers; and, on the TCGA frozen section, frozen -> FFPE image-to-image. Needs ../shared/data.
`--only translate qupath` makes just those (translate runs first whenever a later one needs it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHOTS = ("engine", "translate", "cells", "look", "qupath", "generate", "finetune", "restain")
#: QuPath-style annotations on B4 (level-0 px): two tumour areas (one with a hole) and stroma.
B4_ANNOTATIONS = {
    "type": "FeatureCollection",
    "features": [
        {"type": "Feature", "id": "t1", "geometry": {"type": "Polygon", "coordinates": [
            [[3700, 4300], [4300, 4250], [4450, 4700], [4000, 5000], [3650, 4750], [3700, 4300]],
            [[3950, 4550], [4150, 4520], [4150, 4700], [3950, 4700], [3950, 4550]]]},
         "properties": {"objectType": "annotation", "name": "tumour 1",
                        "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "id": "t2", "geometry": {"type": "Polygon", "coordinates": [
            [[4600, 4900], [5000, 4850], [5050, 5200], [4650, 5250], [4600, 4900]]]},
         "properties": {"objectType": "annotation", "name": "tumour 2",
                        "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "id": "s1", "geometry": {"type": "Polygon", "coordinates": [
            [[4500, 4200], [4900, 4200], [4900, 4600], [4500, 4600], [4500, 4200]]]},
         "properties": {"objectType": "annotation", "name": "stroma",
                        "classification": {"name": "Stroma", "color": [150, 200, 150]}}},
    ],
}


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
    parser.add_argument("--only", nargs="+", choices=SHOTS, default=list(SHOTS))
    args = parser.parse_args()
    only = set(args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    import os
    import tempfile

    os.environ["MUPD_CONFIG"] = tempfile.mkdtemp(prefix="mupd-shots-")  # leave the user's panel settings alone

    import napari
    import pandas as pd

    from mupd.names import ihc_name
    from napari_mupd._engine_panel import EnginePanel
    from napari_mupd._session import session
    from napari_mupd._translate_panel import TranslatePanel
    from napari_mupd.demo import WINDOW_SIZE, frame

    session().engine()
    viewer = napari.Viewer(title="MuPD")
    viewer.window.resize(*WINDOW_SIZE)
    (slide,) = viewer.open(str(args.data / "st/her2st/images/B4_HE.jpg"), plugin="napari-mupd")
    frame(viewer)

    if "engine" in only:
        engine = EnginePanel(viewer)
        dock = viewer.window.add_dock_widget(engine, name="Engine", area="right")
        shoot(viewer, args.out / "engine.png")
        viewer.window.remove_dock_widget(dock)

    if only & {"translate", "cells", "look", "qupath", "finetune"}:  # finetune uses its layers
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
                layer.visible = layer.name.startswith(ihc_name("HER2"))
        viewer.camera.center = (0, (y + h / 2) * 0.69, (x + w * 1.05) * 0.69)
        viewer.camera.zoom = 0.36
        shoot(viewer, args.out / "translate.png")
        if "cells" in only:  # the rendered IHC at cell level: membranous HER2 around blue nuclei
            translate.side_by_side.value = False
            for layer in viewer.layers:
                if layer.metadata.get("mupd_result"):
                    layer.visible = layer.name.startswith(ihc_name("HER2"))
            viewer.camera.center = (0, (y + h / 2) * 0.69, (x + w / 2) * 0.69)
            viewer.camera.zoom = 5.0
            shoot(viewer, args.out / "ihc-cells.png")
        if "look" in only:  # the same cells in the look of another lab's IHC (the kidney's)
            look_shot(viewer, translate, args.data, args.out)
        viewer.window.remove_dock_widget(dock)
        if "qupath" in only:
            qupath_shot(viewer, slide, args.out)

    if "generate" not in only and "finetune" not in only and "restain" not in only:
        viewer.close()
        return
    counts = pd.read_csv(args.data / "st/her2st/counts/B4.tsv.gz", sep="\t", index_col=0)
    spot = counts.sum(axis=1).idxmax()  # the deepest B4 spot
    profile = Path(os.environ["MUPD_CONFIG"]) / f"B4_spot_{spot}.csv"
    counts.loc[spot].rename_axis("gene").rename("count").to_csv(profile)
    if "generate" in only:
        generate_shot(viewer, profile, args.out)
    if "finetune" in only:
        finetune_shot(viewer, slide, args.out)
    if "restain" in only:
        restain_shot(viewer, args.data, args.out)
    viewer.close()


def look_shot(viewer, translate, data: Path, out: Path) -> None:
    """The region translated again with the IDR0073 kidney IHC as the lab's look (its pixel size
    is not stated; 2 um/px assumed), shown at the zoom of ihc-cells.png: the same cells with a
    darker counterstain and weaker DAB."""
    from mupd.names import ihc_name

    translate.ihc_look.value = str(data / "ihc" / "idr0073_kidney-48-5_IHC.tif")
    translate.ihc_look_mpp.value = 2.0
    translate.stains.value = ["HER2"]
    before = {layer.name for layer in viewer.layers}
    wait(translate.run())
    translate.ihc_look.value, translate.ihc_look_mpp.value = None, 0.0  # the panel keeps settings
    for layer in viewer.layers:
        if layer.metadata.get("mupd_result"):
            layer.visible = layer.name not in before and layer.name.startswith(ihc_name("HER2"))
    shoot(viewer, out / "ihc-look.png")


def generate_shot(viewer, profile: Path, out: Path) -> None:
    from napari_mupd._generate_panel import GeneratePanel

    generate = GeneratePanel(viewer)
    generate.prompt.value = "H&E, breast, HER2-positive carcinoma, HER2-high, immune-rich"
    generate.rna_file.value = profile
    generate.samples.value, generate.steps.value = 9, 20
    dock = viewer.window.add_dock_widget(generate, name="Generate", area="right")
    wait(generate.run())
    grid = next(l for l in viewer.layers if l.metadata.get("mupd_generated"))
    viewer.camera.center = (0, *(np.asarray(grid.extent.world).mean(axis=0)[-2:]))
    viewer.camera.zoom = 1.6
    shoot(viewer, out / "generate.png")
    viewer.window.remove_dock_widget(dock)
    viewer.layers.remove(grid)


def finetune_shot(viewer, slide, out: Path) -> None:
    from napari_mupd._finetune_panel import LAYERS, FinetunePanel

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
    shoot(viewer, out / "finetune.png")
    viewer.window.remove_dock_widget(dock)


def qupath_shot(viewer, slide, out: Path) -> None:
    """A QuPath export opened with File > Open (classes as properties and edge colours), then
    Translate on 'all of class' Tumor: one score row per tumour annotation."""
    import json
    import os

    from mupd.names import ihc_name
    from napari_mupd._translate_panel import CLASS, TranslatePanel

    path = Path(os.environ["MUPD_CONFIG"]) / "B4_annotations.geojson"
    path.write_text(json.dumps(B4_ANNOTATIONS))
    viewer.layers.selection.active = slide
    (annotations,) = viewer.open(str(path), plugin="napari-mupd")
    viewer.layers.selection.active = annotations
    for layer in viewer.layers:
        if layer.metadata.get("mupd_result") or layer.name == "ROI":
            layer.visible = False
    translate = TranslatePanel(viewer)
    translate.stains.value = ["Ki67"]
    translate.region.value = CLASS
    translate.klass.reset_choices()
    translate.klass.value = "Tumor"
    dock = viewer.window.add_dock_widget(translate, name="Translate", area="right")
    wait(translate.run())
    for layer in viewer.layers:
        if layer.metadata.get("mupd_result"):
            layer.visible = layer.name.startswith(ihc_name("Ki67"))
    viewer.layers.move(viewer.layers.index(annotations), len(viewer.layers) - 1)
    viewer.camera.center = (0, 4700 * 0.69, 4350 * 0.69)
    viewer.camera.zoom = 0.9
    shoot(viewer, out / "qupath.png")
    viewer.window.remove_dock_widget(dock)


def restain_shot(viewer, data: Path, out: Path) -> None:
    """Frozen -> FFPE (image-to-image, strength 0.5) on the TCGA frozen section, side by side."""
    from napari_mupd._translate_panel import SELECTED, TranslatePanel

    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    (frozen,) = viewer.open(str(data / "wsi" / "TCGA-CR-7395-01A-01-TS1.svs"), plugin="napari-mupd")
    x, y, w, h = 3000, 2450, 700, 520  # tissue (chosen on the thumbnail)
    rect = np.array([[y, x], [y, x + w], [y + h, x + w], [y + h, x]], float)
    shapes = viewer.add_shapes([rect], shape_type="rectangle", name="ROI", edge_color="yellow",
                               face_color="transparent", edge_width=6)
    shapes.selected_data = {0}
    translate = TranslatePanel(viewer)
    translate.stains.value = ["H&E"]
    translate.region.value = SELECTED  # the panel keeps its last settings
    translate.user_mpp.value = 1.0  # TCGA-CR-7395 carries no mpp (docs/data.md)
    translate.strength.value = 0.5
    translate.steps.value = 10  # as measured in benchmarks/bench_restain.py
    translate.render.value = False
    dock = viewer.window.add_dock_widget(translate, name="Translate", area="right")
    wait(translate.run())
    translate.side_by_side.value = True
    viewer.camera.center = (0, y + h / 2, x + w * 1.05)
    viewer.camera.zoom = 0.55
    shoot(viewer, out / "restain.png")
    viewer.window.remove_dock_widget(dock)


if __name__ == "__main__":
    main()
