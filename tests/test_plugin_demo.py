"""The sample-data contribution and the headless demo (`python -m napari_mupd.demo`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from skimage.io import imread

from plugin_fixtures import drawn_stats, needs_display

REPO = Path(__file__).resolve().parents[1]


def test_sample_data_is_the_calibrated_cmu_slide() -> None:
    from napari.components import ViewerModel
    from npe2 import PluginManager

    PluginManager.instance().discover()
    viewer = ViewerModel()
    (layer,) = viewer.open_sample("napari-mupd", "cmu1_small")
    assert layer.rgb and layer.name == "CMU-1-Small-Region"
    assert tuple(layer.data.shape) == (2967, 2220, 3)
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert layer.metadata["mpp_known"] and layer.metadata["format"] == "svs"


@pytest.mark.gui
@needs_display
def test_demo_writes_a_screenshot_of_the_window(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "napari_mupd.demo", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    png = tmp_path / "viewer.png"
    assert f"wrote {png}" in proc.stdout and "0.499 um/px" in proc.stdout
    shot = imread(png)
    assert shot.shape[0] >= 600 and shot.shape[1] >= 900  # the whole window, not just the canvas
    std, covered = drawn_stats(shot)
    assert std > 40 and covered > 0.5, (std, covered)
    # H&E is drawn: a clearly pink/purple (red and blue above green) share of the window
    rgb = shot[..., :3].astype(int)
    stained = (rgb[..., 0] - rgb[..., 1] > 40) & (rgb[..., 2] - rgb[..., 1] > 20)
    assert stained.mean() > 0.05, stained.mean()
    assert "scale bar on" in proc.stdout
    # The virtual stain overlay on the default ROI, computed by the bundled model and saved.
    assert "virtual HER2, Ki67 on ROI" in proc.stdout and "(mupd-tiny)" in proc.stdout
    from mupd.io import open_slide

    for stain in ("HER2", "Ki67", "IHC-HER2"):
        with open_slide(tmp_path / "virtual-stain" / f"{stain}.ome.zarr") as written:
            assert written.mpp_known and written.mpp[0] == pytest.approx(1.0)
            assert written.level_dimensions[0] == (511, 511), written.level_dimensions  # 1024 px at 0.499
            assert stain in written.channel_names or written.is_rgb
    # The panel's table of predicted per-region scores is filled and said on stdout.
    for marker in ("HER2", "Ki67"):
        assert f"predicted {marker}: " in proc.stdout and "H-score" in proc.stdout
    assert (tmp_path / "virtual-stain" / "scores.csv").is_file()
