"""Generate panel: synthetic H&E from a text prompt, an RNA profile and/or a reference region.

The RNA profile is shown as an editable table of the model's gene panel, with the genes the file
lacks flagged (they are masked, not zero-filled); the whole profile, edits included, goes to
`Engine.generate`, so CPM normalisation sees the same totals as the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
from magicgui.widgets import (CheckBox, Container, FileEdit, FloatSlider, Label, LineEdit,
                              SpinBox)
from napari.utils.notifications import show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from mupd.engine.api import EngineInfo, GenerateRequest, GenerateResult
from mupd.errors import ConditionError, MuPDError
from mupd.mosaic import mosaic

from . import _settings
from ._regions import is_slide_layer, roi_shapes, selected_polygons
from ._session import session
from ._tasks import EngineTask, RunCancel, ensure_engine, notify_error

USED, MISSING, EDITED = "used", "missing: masked", "edited"
RNA_FILTER = "*.csv *.tsv *.txt *.h5ad"


def panel_rows(profile: dict[str, float], panel: list[str]) -> tuple[list[tuple[str, str, str]], str]:
    """(gene, value, status) for every panel gene, and a one-line summary of the match."""
    by_key = {g.strip().upper(): g for g in profile}
    rows, found = [], 0
    for gene in panel:
        key = by_key.get(gene.upper())
        if key is None:
            rows.append((gene, "", MISSING))
        else:
            found += 1
            rows.append((gene, f"{profile[key]:g}", USED))
    ignored = len(profile) - found
    summary = (f"{found} of {len(panel)} panel genes found"
               + (f", {len(panel) - found} missing (masked)" if found < len(panel) else "")
               + (f"; {ignored} other genes are not in the model's panel" if ignored else ""))
    return rows, summary


def reference_tile(slide_layer: Any, polygon: list[tuple[float, float]], info: EngineInfo) -> np.ndarray:
    """One model-sized tile at the model's mpp, centred on the region (the reference stream's input)."""
    from mupd.io import open_slide

    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    mpp = slide_layer.metadata["mpp"]
    side = int(round(info.tile_size * info.mpp / mpp[0]))
    x = int(round((min(xs) + max(xs)) / 2 - side / 2))
    y = int(round((min(ys) + max(ys)) / 2 - side / 2))
    with open_slide(slide_layer.metadata["slide_path"]) as slide:
        w, h = slide.level_dimensions[0]
        x, y = min(max(x, 0), max(w - side, 0)), min(max(y, 0), max(h - side, 0))
        tile = slide.read_region((x, y), (side, side), mpp=info.mpp)[..., :3]
    return np.ascontiguousarray(tile[:info.tile_size, :info.tile_size])


class GeneratePanel(QWidget):
    """Dock widget: prompt, RNA file + gene table, per-modality guidance, samples, seed."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.task: Optional[EngineTask] = None
        self.profile: dict[str, float] = {}
        self.prompt = LineEdit(label="text prompt", value="", tooltip=(
            "the bundled model learned HER2ST's derived captions, e.g. 'H&E, breast, "
            "HER2-positive carcinoma, HER2-high, immune-rich' (HER2-low / -intermediate / -high)"))
        self.rna_file = FileEdit(label="RNA profile", mode="r", filter=RNA_FILTER, value="")
        self.normalized = CheckBox(text="values are already log-normalised (not raw counts)", value=False)
        self.rna_summary = Label(value="no RNA profile")
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["gene", "value", "status"])
        self.table.setMinimumHeight(160)
        # The scales start at the model's own (its config's `guidance`, chosen on validation data,
        # docs/training.md), set when an engine arrives; 1 is the model as trained.
        self.text_scale = FloatSlider(label="text guidance", min=0.0, max=10.0, value=1.0)
        self.rna_scale = FloatSlider(label="RNA guidance", min=0.0, max=10.0, value=1.0)
        self.reference_scale = FloatSlider(label="reference guidance", min=0.0, max=10.0, value=1.0)
        self.use_reference = CheckBox(text="use selected region as reference (image to image)", value=False)
        self.samples = SpinBox(label="samples", min=1, max=64, value=4)
        self.steps = SpinBox(label="steps", min=1, max=200, value=20)
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0)
        self.buttons = RunCancel("Generate")
        self.run_button, self.cancel_button = self.buttons.run, self.buttons.cancel
        self.status = Label(value="")
        top = Container(widgets=[self.prompt, self.rna_file, self.normalized, self.rna_summary])
        bottom = Container(widgets=[
            self.text_scale, self.rna_scale, self.reference_scale, self.use_reference, self.samples,
            self.steps, self.seed, self.buttons, self.status])
        layout = QVBoxLayout(self)
        layout.addWidget(top.native)
        layout.addWidget(self.table)
        layout.addWidget(bottom.native)
        layout.addStretch()
        _settings.persist("generate", {
            "prompt": self.prompt, "normalized": self.normalized, "samples": self.samples,
            "steps": self.steps, "seed": self.seed})
        self.rna_file.changed.connect(self.load_profile)
        self.table.itemChanged.connect(self._edited)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(lambda: self.task and self.task.cancel())
        session().changed.connect(self._on_engine)
        if session().current_info is None:
            ensure_engine()
        else:
            self._on_engine(session().current_info)

    # -- RNA profile -----------------------------------------------------------------------------
    def _panel(self) -> list[str]:
        info = session().current_info
        return list(info.rna_genes) if info else []

    def _on_engine(self, info: EngineInfo) -> None:
        # guidance starts at the scales the model was validated with (not the last session's)
        for modality, slider in (("text", self.text_scale), ("rna", self.rna_scale),
                                 ("reference", self.reference_scale)):
            slider.value = info.guidance.get(modality, 1.0)
        if self.profile:
            self._fill_table()

    def load_profile(self, path: Any = None) -> bool:
        """Read the file into the table; a file with no gene of the panel is refused, named."""
        from mupd.models.rna import read_profile

        path = Path(str(path if path is not None else self.rna_file.value))
        if str(path) in ("", "."):
            self.profile = {}
            self._fill_table()
            return False
        try:
            profile = read_profile(path)
            panel = self._panel()
            if panel and not any(r[2] == USED for r in panel_rows(profile, panel)[0]):
                raise ConditionError(
                    f"RNA file {path.name} has no usable genes: none of its {len(profile)} genes "
                    f"(e.g. {', '.join(list(profile)[:3])}) is in the model's {len(panel)}-gene panel "
                    f"(e.g. {', '.join(panel[:3])})")
        except MuPDError as exc:
            notify_error(exc, "Loading the RNA profile")
            self.profile = {}
            self._fill_table()
            return False
        self.profile = profile
        self._fill_table()
        return True

    def _fill_table(self) -> None:
        panel = self._panel()
        rows, summary = panel_rows(self.profile, panel) if self.profile else ([], "no RNA profile")
        self.table.blockSignals(True)
        self.table.setRowCount(len(rows))
        for r, (gene, value, status) in enumerate(rows):
            for c, text in enumerate((gene, value, status)):
                item = QTableWidgetItem(text)
                if c != 1:
                    item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                if status == MISSING:
                    item.setForeground(Qt.GlobalColor.darkYellow)
                self.table.setItem(r, c, item)
        self.table.blockSignals(False)
        self.rna_summary.value = summary if panel or not self.profile else \
            f"{len(self.profile)} genes read; the gene panel shows once the engine is loaded"

    def _edited(self, item: QTableWidgetItem) -> None:
        if item.column() != 1:
            return
        gene = self.table.item(item.row(), 0).text()
        text = item.text().strip()
        keys = {g.upper(): g for g in self.profile}
        key = keys.get(gene.upper(), gene)
        if not text:
            self.profile.pop(key, None)
            status = MISSING
        else:
            try:
                self.profile[key] = float(text)
            except ValueError:
                notify_error(ConditionError(f"expression of gene {gene} must be a number, got {text!r}"),
                             "Editing the RNA profile")
                return
            status = EDITED
        self.table.blockSignals(True)
        self.table.item(item.row(), 2).setText(status)
        self.table.blockSignals(False)

    # -- work --------------------------------------------------------------------------------------
    def request(self) -> GenerateRequest:
        text = self.prompt.value.strip() or None
        rna = dict(self.profile) or None
        guidance = {}
        if text:
            guidance["text"] = self.text_scale.value
        if rna:
            guidance["rna"] = self.rna_scale.value
        if self.use_reference.value:
            guidance["reference"] = self.reference_scale.value
        return GenerateRequest(text=text, rna=rna, rna_normalized=self.normalized.value,
                               num_images=self.samples.value, steps=self.steps.value,
                               guidance=guidance, seed=self.seed.value)

    def _reference_region(self) -> tuple[Any, list[tuple[float, float]]]:
        slide = next((l for l in self.viewer.layers if is_slide_layer(l)), None)
        if slide is None:
            raise ConditionError("'use selected region as reference' needs an open slide")
        return slide, selected_polygons(roi_shapes(self.viewer), slide)[0]

    def run(self) -> Optional[EngineTask]:
        try:
            request = self.request()
            reference = self._reference_region() if self.use_reference.value else None
        except MuPDError as exc:
            notify_error(exc, "Generate")
            return None

        def call(progress, cancel) -> GenerateResult:
            engine = session().engine()
            if reference is not None:
                request.reference = reference_tile(*reference, engine.info())
            return engine.generate(request, progress, cancel)

        self.buttons.busy(True)
        self.status.value = f"generating {request.num_images} tile(s)..."
        self.task = EngineTask(call, "Generating H&E", on_done=lambda r: self.add_grid(r, request),
                               on_finished=lambda: self.buttons.busy(False),
                               on_error=lambda e: setattr(self.status, "value", "failed")).start()
        return self.task

    def add_grid(self, result: GenerateResult, request: GenerateRequest) -> Any:
        """The samples as one grid layer at the model's scale, right of what is already shown."""
        info = session().current_info
        mpp = info.mpp if info else 1.0
        right = float(self.viewer.layers.extent.world[1][-1]) if len(self.viewer.layers) else 0.0
        label = request.text or (Path(str(self.rna_file.value)).name if request.rna else "unconditional")
        layer = self.viewer.add_image(
            mosaic(result.images, gap=4), name=f"MuPD generated: {label}", rgb=True, scale=(mpp, mpp),
            translate=(0.0, right + 50 * mpp), units=("um", "um"),
            metadata={"mupd_generated": True, "prompt": request.text, "seed": request.seed,
                      "steps": request.steps, "guidance": request.guidance,
                      "missing_genes": result.missing_genes, "n_images": len(result.images)})
        self.status.value = f"{len(result.images)} tile(s) in {result.seconds:.1f} s"
        if result.missing_genes:
            show_info(f"{len(result.missing_genes)} panel genes were missing from the profile and masked")
        return layer
