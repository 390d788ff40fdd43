"""Training and fine-tuning the real tiny MuPD pipeline end to end (config -> model folder,
LoRA fine-tune -> model folder with a new stain), on real H&E tiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mupd.cli import main
from mupd.errors import OutputExistsError
from mupd.pipeline import MuPDPipeline
from mupd.requests import FinetuneRequest


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny"
    torch.manual_seed(0)
    MuPDPipeline.from_config_name("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tile(tiny_model) -> int:
    return int(MuPDPipeline.from_pretrained(tiny_model).tile_size)


def he_tiles(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "he_patches" / "nct_crc_he_100k").glob("[A-Z]*-*.tif"))[:8]


def write_captions(folder: Path, shared_data: Path, tile: int) -> Path:
    folder.mkdir(parents=True)
    rows = ["file,caption"]
    for path in he_tiles(shared_data):
        image = Image.open(path).convert("RGB")
        if min(image.size) < tile:
            image = image.resize((tile, tile))
        image.crop((0, 0, tile, tile)).save(folder / f"{path.stem}.png")
        rows.append(f"{path.stem}.png,colorectal H&E {path.stem.split('-')[0]}")
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_train_from_config_writes_model_card_and_resumes(tmp_path, shared_data, tiny_model, tile):
    data = write_captions(tmp_path / "captions", shared_data, tile)
    config = {"output": str(tmp_path / "run"), "model": {"base": str(tiny_model)},
              "data": {"store": str(data)},
              "optim": {"max_steps": 6, "batch_size": 2, "learning_rate": 1e-3},
              "checkpoint": {"every": 3, "keep": 2}, "log_every": 3}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    assert main(["train", "--config", str(path), "--max-steps", "3"]) == 0
    assert main(["train", "--config", str(path)]) == 2  # an earlier run: needs --resume
    assert main(["train", "--config", str(path), "--resume"]) == 0
    model = tmp_path / "run" / "model"
    card = (model / "MODEL_CARD.md").read_text()
    assert "steps: 6" in card and "captions" in card and "To be filled by `mupd eval`" in card
    loaded = MuPDPipeline.from_pretrained(model)
    base = MuPDPipeline.from_pretrained(tiny_model)
    changed = [k for k, v in loaded.transformer.state_dict().items()
               if not torch.equal(v, base.transformer.state_dict()[k])]
    assert changed
    assert (tmp_path / "run" / "train_log.csv").read_text().count("\n") == 3  # header + 2 rows


def test_lora_finetune_registers_new_stain(tmp_path, shared_data, tiny_model, tile):
    """Mechanics smoke test only: the "FAKEIHC" targets are real IHC crops that are NOT the
    same tissue as the H&E tiles, so nothing here measures translation quality."""
    data = tmp_path / "pairs"
    (data / "HE").mkdir(parents=True)
    (data / "FAKEIHC").mkdir()
    ihc = Image.open(shared_data / "ihc" / "skimage_ihc_FHL2_colon.png").convert("RGB")
    for i, path in enumerate(he_tiles(shared_data)[:4]):
        Image.open(path).convert("RGB").resize((tile, tile)).save(data / "HE" / f"{i}.png")
        ihc.crop((i * 64, 0, i * 64 + tile, tile)).save(data / "FAKEIHC" / f"{i}.png")
    from mupd.train.finetune import run_finetune

    events = []
    out = run_finetune(FinetuneRequest(data_dir=str(data), output_dir=str(tmp_path / "ft"),
                                       base_model=str(tiny_model), method="lora", steps=4,
                                       learning_rate=1e-3, batch_size=2), progress=events.append)
    tuned = MuPDPipeline.from_pretrained(out)
    assert "FAKEIHC" in [t["name"] for t in tuned.catalogue.to_list()]
    assert not any("lora" in k for k in tuned.transformer.state_dict())  # merged
    assert [e.step for e in events if e.stage == "train"] == [1, 2, 3, 4]
    assert "FAKEIHC" in (out / "MODEL_CARD.md").read_text()
    with pytest.raises(OutputExistsError):
        run_finetune(FinetuneRequest(data_dir=str(data), output_dir=str(out),
                                     base_model=str(tiny_model)))


def test_finetune_cli_reports_bad_data(tmp_path, tiny_model, capsys):
    (tmp_path / "d" / "HE").mkdir(parents=True)
    (tmp_path / "d" / "HER3").mkdir()
    (tmp_path / "d" / "HE" / "a.png").write_bytes(b"broken")
    (tmp_path / "d" / "HER3" / "a.png").write_bytes(b"broken")
    code = main(["finetune", "--base", str(tiny_model), "--data", str(tmp_path / "d"),
                 "--out", str(tmp_path / "out"), "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot read image" in err and "a.png" in err
    assert not (tmp_path / "out").exists()  # stopped before training


def test_real_pipeline_loss_decreases_on_real_tiles(tmp_path, shared_data):
    """The real (small-overridden) tiny pipeline learns on real colorectal H&E tiles."""
    from mupd.train.batches import Sample
    from mupd.train.config import CheckpointSection, OptimSection
    from mupd.train.loss import FlowMatchingObjective
    from mupd.train.trainer import Trainer

    torch.manual_seed(0)
    pipeline = MuPDPipeline.from_config_name("tiny", tile_size=32, hidden_size=96, depth=2)
    samples = []
    for path in he_tiles(shared_data):
        image = np.asarray(Image.open(path).convert("RGB"))
        samples += [Sample(target=image[y:y + 32, x:x + 32], stain="H&E")
                    for y in range(0, 192, 64) for x in range(0, 192, 64)]
    optim = OptimSection(max_steps=300, batch_size=8, learning_rate=2e-3, warmup_steps=5)
    result = Trainer(FlowMatchingObjective(pipeline), samples, optim, CheckpointSection(every=300),
                     tmp_path, log_every=30).fit()
    assert result.final_loss < 0.7 * result.first_loss, (result.first_loss, result.final_loss)


def test_train_translate_from_patch_store_skips_held_out(tmp_path, tiny_model):
    """A PatchStore of real IHC tiles (patients A, C): translation to a marker with RNA; the
    held-out patient A is filtered before any tile is read. Marker maps here are the DAB
    channel of the same tiles (a mechanics test, not a ground truth)."""
    import pandas as pd
    from skimage.color import rgb2hed
    from skimage.data import immunohistochemistry

    from mupd.data.store import write_patch_store
    from mupd.train.batches import collate
    from mupd.train.config import config_from_dict
    from mupd.train.run import train
    from mupd.train.store import store_samples

    T = 32
    image = immunohistochemistry()
    tiles = np.stack([image[y:y + T, x:x + T] for y in range(0, 128, T) for x in range(0, 128, T)])
    dab = np.clip(rgb2hed(tiles.reshape(-1, T, 3))[..., 2].reshape(tiles.shape[:3]) * 10, 0, 1)
    n = len(tiles)
    manifest = pd.DataFrame({"patient": ["A"] * 4 + ["C"] * (n - 4), "slide": "s", "x": 0, "y": 0,
                             "mpp": 1.0, "tile_size": T, "source": "skimage"})
    genes = ["ERBB2", "ESR1", "MKI67"]
    rna = np.random.default_rng(0).poisson(5, (n, 3)).astype(np.float32)
    valid = np.zeros((n, T, T), bool)
    valid[:, :, : T // 2] = True  # measured on the left half only (a spot footprint stand-in)
    store = write_patch_store(tmp_path / "store", tiles, manifest,
                              markers={"HER2": dab.astype(np.float32)}, marker_valid={"HER2": valid},
                              rna=rna, genes=genes, rna_normalized=False)
    torch.manual_seed(0)
    pipeline = MuPDPipeline.from_config_name("tiny", tile_size=T, hidden_size=96, depth=2)

    def config(task: str):
        return config_from_dict({
            "output": str(tmp_path / "run"),
            "data": {"store": str(store), "task": task, "targets": ["HER2"],
                     "conditions": ["rna"], "exclude_patients": ["A"]},
            "optim": {"max_steps": 3, "batch_size": 4}, "checkpoint": {"every": 3}, "log_every": 1})

    # the loss sees where the marker was measured; generation samples count everywhere
    mixed, _, _ = store_samples(config("both"), pipeline)
    batch = collate([mixed[0], mixed[len(mixed) - 1]], pipeline.rna_tokenizer)
    assert batch["stain"] == ["H&E", "HER2"] and batch["target_valid"].shape == (2, 1, T, T)
    assert float(batch["target_valid"][0].min()) == 1.0
    np.testing.assert_array_equal(batch["target_valid"][1, 0].numpy(), valid[-1])
    result = train(config("translate"), pipeline=pipeline)
    assert result.steps == 3
    card = (tmp_path / "run" / "model" / "MODEL_CARD.md").read_text()
    assert "patients C; held out: A" in card and f"{n - 4} tiles, task translate" in card


def test_train_translate_to_paired_stain_tiles_from_a_store(tmp_path, tiny_model):
    """Paired RGB targets (BCI / MIST pairs, registered serial sections) train from a store: the
    sample's target is the stored IHC tile, pixel-aligned with its H&E source."""
    import pandas as pd
    from skimage.data import immunohistochemistry

    from mupd.data.store import PatchStore, write_patch_store
    from mupd.errors import DataError
    from mupd.train.config import config_from_dict
    from mupd.train.run import train
    from mupd.train.store import store_samples

    T = 32
    ihc = immunohistochemistry()
    tiles = np.stack([ihc[y:y + T, x:x + T] for y in range(0, 128, T) for x in range(0, 128, T)])
    paired = np.ascontiguousarray(255 - tiles)  # any pixel-aligned RGB target
    n = len(tiles)
    manifest = pd.DataFrame({"patient": ["A"] * 4 + ["C"] * (n - 4), "slide": "s", "x": 0, "y": 0,
                             "mpp": 1.0, "tile_size": T, "source": "skimage"})
    store = write_patch_store(tmp_path / "store", tiles, manifest, targets={"IHC-pair": paired})
    assert list(PatchStore(store).targets) == ["IHC-pair"]
    pipeline = MuPDPipeline.from_config_name("tiny", tile_size=T, hidden_size=96, depth=2)
    pipeline.catalogue.register("IHC-pair", "rgb")

    def config(targets: list[str]):
        return config_from_dict({
            "output": str(tmp_path / "run"),
            "data": {"store": str(store), "task": "translate", "targets": targets, "conditions": [],
                     "exclude_patients": ["A"]},
            "optim": {"max_steps": 2, "batch_size": 4}, "checkpoint": {"every": 2}, "log_every": 1})

    samples, _, _ = store_samples(config(["IHC-pair"]), pipeline)
    assert len(samples) == n - 4
    first = samples[0]
    assert first.stain == "IHC-pair" and first.target.dtype == np.uint8 and first.target.shape == (T, T, 3)
    np.testing.assert_array_equal(first.target, 255 - first.source)
    with pytest.raises(DataError, match=r"no marker maps or paired stain tiles for \['PD-L1'\]"):
        store_samples(config(["PD-L1"]), pipeline)
    assert train(config(["IHC-pair"]), pipeline=pipeline).steps == 2


def test_generate_stores_add_captioned_he_tiles_without_held_out_patients(tmp_path):
    """`data.generate_stores`: H&E tiles of more slides join as generation samples (their
    captions as text), the held-out patients of every store stay out, and a store of another
    tile size or a repeated store is refused before training."""
    import pandas as pd
    from skimage.data import immunohistochemistry

    from mupd.data.store import write_patch_store
    from mupd.errors import DataError
    from mupd.train.config import TrainConfigError, config_from_dict
    from mupd.train.store import store_samples

    T = 32
    ihc = immunohistochemistry()
    tiles = np.stack([ihc[y:y + T, x:x + T] for y in range(0, 128, T) for x in range(0, 128, T)])
    main = write_patch_store(tmp_path / "main", tiles[:6], pd.DataFrame(
        {"patient": ["C"] * 6, "slide": "c", "x": 0, "y": 0, "mpp": 1.0, "tile_size": T,
         "source": "t", "caption": "H&E, breast"}))
    slides = write_patch_store(tmp_path / "slides", tiles[6:], pd.DataFrame(
        {"patient": ["CMU"] * 4 + ["B"] * 6, "slide": "w", "x": 0, "y": 0, "mpp": 1.0,
         "tile_size": T, "source": "wsi-tile", "caption": ["H&E, FFPE section"] * 4 + ["held out"] * 6}))
    small = write_patch_store(tmp_path / "small", tiles[:2, :16, :16], pd.DataFrame(
        {"patient": ["D"] * 2, "slide": "s", "x": 0, "y": 0, "mpp": 1.0, "tile_size": 16, "source": "t"}))

    def config(extra: list[str], store: Path = main):
        return config_from_dict({
            "output": str(tmp_path / "run"),
            "data": {"store": str(store), "task": "generate", "conditions": ["text"],
                     "patients": ["C"], "exclude_patients": ["B"],
                     "generate_stores": [str(p) for p in extra]},
            "optim": {"max_steps": 1, "batch_size": 2}})

    samples, description, split = store_samples(config([slides]), None)
    assert len(samples) == 6 + 4  # patient B's six tiles never read; `patients` filters main only
    added = [samples[i] for i in range(6, 10)]
    assert {s.text for s in added} == {"H&E, FFPE section"} and all(s.stain == "H&E" for s in added)
    np.testing.assert_array_equal(added[0].target, tiles[6])
    assert "4 tiles, captioned" in description and split == "patients C, CMU; held out: B"
    with pytest.raises(DataError, match="different tile sizes"):
        store_samples(config([small]), None)
    with pytest.raises(TrainConfigError, match="repeats data.store"):
        config([main])
