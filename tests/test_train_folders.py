"""Fine-tuning folders: every bad-data case is reported before training, naming the file and
the problem; good folders become samples. LoRA mechanics (inject, train, merge) on the stand-in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import immunohistochemistry

from mupd.errors import DataError
from mupd.train.config import CheckpointSection, OptimSection
from mupd.train.finetune import add_lora
from mupd.train.folders import MIN_SAMPLES, load_folder
from mupd.train.trainer import Trainer
from test_train_loop import StandInPipeline, real_tiles

TILE = 32


class PanelTokenizer:
    """Test double of the RNA tokenizer: a fixed gene panel, case-insensitive."""

    def __init__(self, genes: list[str]) -> None:
        self.genes = genes

    def align(self, profile: dict[str, float], normalized: bool):
        lower = {k.lower(): v for k, v in profile.items()}
        used = [g for g in self.genes if g.lower() in lower]
        values = np.array([lower.get(g.lower(), 0.0) for g in self.genes], dtype=np.float32)
        mask = np.array([g.lower() in lower for g in self.genes])
        return values, mask, used, [g for g in self.genes if g not in used]


def write_pairs(root, n: int = 3, size: int = 64, stain: str = "NEWSTAIN"):
    image = immunohistochemistry()
    (root / "HE").mkdir(parents=True)
    (root / stain).mkdir()
    for i in range(n):
        crop = image[i * size:(i + 1) * size, :size]
        Image.fromarray(crop).save(root / "HE" / f"p{i}.png")
        Image.fromarray(crop[..., ::-1]).save(root / stain / f"p{i}.png")
    return root


def test_pairs_become_tiles_and_stains(tmp_path):
    data = load_folder(write_pairs(tmp_path / "d"), TILE)
    assert data.kind == "pairs" and data.stains == {"NEWSTAIN": "rgb"}
    assert len(data.samples) == 3 * 4  # 64 px images -> 2 x 2 tiles of 32
    s = data.samples[0]
    assert s.source.shape == s.target.shape == (TILE, TILE, 3) and s.stain == "NEWSTAIN"
    assert np.array_equal(s.target, s.source[..., ::-1])  # the pair stays aligned


def test_single_channel_targets_are_markers(tmp_path):
    root = write_pairs(tmp_path / "d")
    for p in (root / "NEWSTAIN").iterdir():
        Image.open(p).convert("L").save(p)
    data = load_folder(root, TILE)
    assert data.stains == {"NEWSTAIN": "marker"}
    assert data.samples[0].target.ndim == 2 and 0 <= data.samples[0].target.max() <= 1


def test_all_pair_problems_reported_at_once(tmp_path):
    root = write_pairs(tmp_path / "d", n=4)
    Image.fromarray(immunohistochemistry()[:48, :64]).save(root / "NEWSTAIN" / "p0.png")
    (root / "NEWSTAIN" / "p1.png").write_bytes(b"not a png")
    Image.fromarray(immunohistochemistry()[:64, :64]).save(root / "NEWSTAIN" / "orphan.png")
    Image.fromarray(immunohistochemistry()[:16, :16]).save(root / "HE" / "p2.png")
    Image.fromarray(immunohistochemistry()[:16, :16]).save(root / "NEWSTAIN" / "p2.png")
    with pytest.raises(DataError) as info:
        load_folder(root, TILE)
    msg = str(info.value)
    assert "4 problem(s)" in msg
    assert "pair sizes differ" in msg and "p0.png is 64x64" in msg and "p0.png is 64x48" in msg
    assert "cannot read image" in msg and "p1.png" in msg
    assert "orphan.png has no H&E partner" in msg
    assert "p2.png is 16x16, smaller than the model's 32x32 tile" in msg


def test_too_few_samples_says_the_minimum(tmp_path):
    root = write_pairs(tmp_path / "d", n=1, size=TILE)
    with pytest.raises(DataError, match=f"only 1 training tiles .* at least {MIN_SAMPLES} are needed"):
        load_folder(root, TILE)


def test_unrecognised_folder_and_captions(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope", TILE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a training folder"):
        load_folder(tmp_path / "empty", TILE)
    root = tmp_path / "cap"
    root.mkdir()
    Image.fromarray(immunohistochemistry()[:64, :64]).save(root / "a.png")
    (root / "captions.csv").write_text("image,text\na.png,x\n")
    with pytest.raises(DataError, match="needs columns 'file' and 'caption'"):
        load_folder(root, TILE)
    (root / "captions.csv").write_text("file,caption\na.png,DAB-positive colon\nb.png,missing\n")
    with pytest.raises(DataError, match="names b.png, which is not in"):
        load_folder(root, TILE)
    (root / "captions.csv").write_text("file,caption\na.png,DAB-positive colon\n")
    data = load_folder(root, TILE)
    assert data.kind == "captions" and len(data.samples) == 4
    assert {s.text for s in data.samples} == {"DAB-positive colon"}


def test_spots_with_unknown_genes_only_stop(tmp_path, shared_data):
    """Real Visium mouse-brain spots; a human-receptor-only panel matches none of its genes."""
    import shutil

    src = shared_data / "st" / "visium" / "squidpy_mouse_brain"
    root = tmp_path / "spots"
    root.mkdir()
    shutil.copy(src / "test_data.h5ad", root)
    shutil.copy(src / "test_img.jpg", root)
    with pytest.raises(DataError, match="none of the 1999 genes .* is in the model's gene panel"):
        load_folder(root, TILE, PanelTokenizer(["ERBB2", "ESR1", "PGR"]))
    import anndata

    genes = list(anndata.read_h5ad(root / "test_data.h5ad").var_names[:3])
    data = load_folder(root, TILE, PanelTokenizer(genes + ["NOT_A_GENE"]))
    assert data.kind == "spots" and len(data.samples) >= MIN_SAMPLES
    s = data.samples[0]
    assert s.target.shape == (TILE, TILE, 3) and s.rna_normalized  # the file is log-normalised
    assert set(genes) <= set(s.rna)


def test_lora_trains_adapters_only_and_merges(tmp_path):
    pipeline = StandInPipeline(0)
    before = {k: v.clone() for k, v in pipeline.transformer.state_dict().items()}
    tuner = add_lora(pipeline.transformer, rank=4)
    trainable = [n for n, p in pipeline.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # zero-initialised lora_B: training must move it; the base weights stay frozen
    trainer = Trainer(pipeline, real_tiles(), OptimSection(max_steps=5, batch_size=8,
                      learning_rate=1e-2, ema_decay=0), CheckpointSection(every=5, keep=1), tmp_path)
    trainer.fit()
    merged = tuner.merge_and_unload()
    after = merged.state_dict()
    assert after.keys() == before.keys()  # plain module again: loads without peft
    assert torch.equal(after["inp.weight"], before["inp.weight"])
    assert not torch.equal(after["mlp.weight"], before["mlp.weight"])


def test_patient_filter_never_admits_held_out_patients():
    from mupd.train.config import DataSection
    from mupd.train.store import select_rows

    patients = ["A", "C", "C", "B", "D", "C"]
    rows = select_rows(patients, DataSection(store="s", exclude_patients=["A", "B"]))
    assert rows.tolist() == [1, 2, 4, 5]
    rows = select_rows(patients, DataSection(store="s", patients=["C"], exclude_patients=["A"]))
    assert rows.tolist() == [1, 2, 5]
    with pytest.raises(DataError, match=r"patients in store: \['A', 'B', 'C', 'D'\]"):
        select_rows(patients, DataSection(store="s", patients=["Z"]))
