"""`mupd generate`: tiles and a mosaic from text and/or a real HER2ST RNA profile."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mupd.cli import main
from mupd.mosaic import mosaic
from support_slides import model_folder

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(model_folder(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def d1_profile(shared_data, tmp_path_factory):
    """Raw UMI counts of the deepest spot of section D1 (patient D: RNA use is outside the
    held-out patients A and B), as a two-column TSV the way a user would give one."""
    with gzip.open(shared_data / "st/her2st/counts/D1.tsv.gz", "rt") as f:
        counts = pd.read_csv(f, sep="\t", index_col=0)
    spot = counts.loc[counts.sum(axis=1).idxmax()]
    path = tmp_path_factory.mktemp("rna") / "D1_spot.tsv"
    spot.rename_axis("gene").rename("count").to_csv(path, sep="\t")  # zeros are measured values
    return path


def _tiles(out):
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("tile-*.png"))])


def test_text_gives_n_tiles_and_their_mosaic(model, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--text", "HER2-positive invasive ductal carcinoma", "-n", "4",
                 "--steps", "2", "--guidance", "text=2", "--model", model, "--device", "cpu",
                 "--out", str(out)]) == 0
    tiles = _tiles(out)
    assert tiles.shape[0] == 4 and tiles.shape[3] == 3 and tiles.shape[1] == tiles.shape[2]
    assert tiles.std() > 0 and not np.array_equal(tiles[0], tiles[1])  # distinct samples
    assert np.array_equal(np.asarray(Image.open(out / "mosaic.png")), mosaic(tiles))
    assert "mosaic.png" in capsys.readouterr().out


def test_real_rna_profile_warns_about_missing_panel_genes(model, d1_profile, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--rna", str(d1_profile), "-n", "2", "--steps", "2", "--seed", "3",
                 "--model", model, "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # HER2ST's gene list lacks KRT5, KRT14 and RPLP0 of the model's panel: masked and said so
    assert "warning: 3 panel genes missing" in printed
    for gene in ("KRT5", "KRT14", "RPLP0"):
        assert gene in printed
    assert _tiles(out).shape[0] == 2


def test_marker_generation_is_a_grey_map(model, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--text", "lymphocyte-rich stroma", "--stain", "CD45", "-n", "2",
                 "--steps", "1", "--model", model, "--device", "cpu", "--out", str(out)]) == 0
    assert _tiles(out).ndim == 3  # (N, H, W): one intensity map per tile


def test_refusals_exit_2(model, tmp_path, capsys):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "keep.png").write_bytes(b"x")
    assert main(["generate", "--text", "x", "--out", str(out), "--model", model]) == 2
    assert "not empty" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep.png"]
    assert main(["generate", "--text", "x", "--guidance", "text3", "--out", str(tmp_path / "g2"),
                 "--model", model, "--device", "cpu"]) == 2
    assert "MODALITY=SCALE" in capsys.readouterr().err
    assert main(["generate", "--rna", str(tmp_path / "none.tsv"), "--out", str(tmp_path / "g3"),
                 "--model", model, "--device", "cpu"]) == 2
    assert "none.tsv" in capsys.readouterr().err


def test_mosaic_fills_a_near_square_grid_with_white():
    tiles = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    grid = mosaic(tiles)
    assert grid.shape == (4, 6, 3)  # 3 columns x 2 rows
    assert np.array_equal(grid[2:4, 2:4], tiles[4]) and (grid[2:4, 4:6] == 255).all()


# -- hardening: one line naming the file or field, exit 2, no traceback (unless --debug) ---------
def _break(model, tmp_path, how: str):
    """A copy of `model` with one file broken the way `how` says."""
    import json
    import shutil

    folder = tmp_path / f"model-{how}"
    shutil.copytree(model, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    index, config = folder / "model_index.json", folder / "transformer" / "config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif how == "shapes":
        config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 96}))
    elif how == "index":
        index.write_text(index.read_text()[:40])
    elif how == "key":
        data = json.loads(index.read_text())
        del data["config"]["tile_size"]
        index.write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("how, named", [
    ("truncated", "transformer"), ("shapes", "transformer"), ("index", "model_index.json"),
    ("key", "model_index.json")])
def test_a_broken_model_file_is_one_line_naming_it(model, tmp_path, capsys, how, named):
    broken = _break(model, tmp_path, how)
    argv = ["generate", "--text", "x", "-n", "1", "--steps", "1", "--model", str(broken),
            "--device", "cpu", "--out", str(tmp_path / "gen")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mupd generate: error: cannot load ")
    assert str(broken / named) in err[0] and "Traceback" not in err[0]
    from mupd.errors import ModelError

    with pytest.raises(ModelError, match=named):  # --debug: the exception itself, traceback and all
        main(["--debug", *argv])


def test_bad_text_and_an_out_under_a_file_are_refused_before_any_compute(tmp_path, capsys):
    import os

    nowhere = str(tmp_path / "no-model")  # refused before the model would be looked at
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--text", os.fsdecode(b"HER2 \xff\xfe"), "--out", str(tmp_path / "g"),
              "--model", nowhere])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "mupd generate: error: argument --text: text is not valid UTF-8 text (it holds an unpaired "
        "surrogate)")
    (tmp_path / "file").write_text("mine")
    assert main(["generate", "--text", "x", "--out", str(tmp_path / "file" / "gen"), "--model", nowhere]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mupd generate: error: output {tmp_path / 'file' / 'gen'} lies under "
                   f"{tmp_path / 'file'}, which is a file, not a folder; choose another --out"]
    assert (tmp_path / "file").read_text() == "mine"


def test_a_request_without_guidance_gets_the_models_validated_scales(tmp_path):
    """Config `guidance` (chosen on validation data) is the default of every engine caller (CLI,
    server, plugin); an explicit scale still wins, and a bad one is refused at load, named."""
    import dataclasses
    import json

    import torch

    from mupd.engine import GenerateRequest
    from mupd.engine.local import LocalEngine
    from mupd.errors import ModelError
    from mupd.pipeline import MuPDPipeline

    pipe = MuPDPipeline.from_config_name("tiny", tile_size=32, hidden_size=48, depth=1, num_heads=2,
                                         guidance={"text": 3.0})
    torch.manual_seed(0)
    with torch.no_grad():  # untrained cross-attention is zero: give the text a way in
        for p in pipe.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = pipe.save_pretrained(tmp_path / "m")
    engine = LocalEngine(str(folder), device="cpu")
    assert engine.info().guidance == {"text": 3.0}
    request = GenerateRequest(text="HER2-high carcinoma", num_images=1, steps=2)
    default = engine.generate(request).images
    np.testing.assert_array_equal(default, engine.generate(
        dataclasses.replace(request, guidance={"text": 3.0})).images)
    assert not np.array_equal(default, engine.generate(
        dataclasses.replace(request, guidance={"text": 1.0})).images)
    index = folder / "model_index.json"
    data = json.loads(index.read_text())
    data["config"]["guidance"] = {"colour": 2.0}
    index.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="guidance.*'colour'"):
        LocalEngine(str(folder), device="cpu")
