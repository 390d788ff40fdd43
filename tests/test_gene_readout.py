"""The multi-gene readout (`mupd.models.readout`): fitted on training spots, saved with the
model, trained only where translation is read (t = 1), masked where a spot measured nothing,
and the one source of a covered marker's map in `translate`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mupd.errors import DataError, ModelError
from mupd.models.readout import GeneReadout, gene_loss, spot_weights
from mupd.pipeline import MuPDPipeline
from mupd.train.loss import FlowMatchingObjective

T = 32
GENES = ["ERBB2", "ESR1", "GAPDH"]


def readout(weight: float = 1.0) -> GeneReadout:
    values = np.array([[1.0, 2.0, np.nan], [3.0, 2.0, 5.0], [5.0, 2.0, 7.0]])
    return GeneReadout.fit(GENES, values, {"HER2": 4.0, "ER": 3.0, "Ki67": 2.0},
                           {"HER2": "ERBB2", "ER": "ESR1", "Ki67": "MKI67"}, weight)


def small(spec: GeneReadout) -> MuPDPipeline:
    torch.manual_seed(0)
    return MuPDPipeline.from_config_name("tiny", tile_size=T, hidden_size=48, depth=2, num_heads=2,
                                         cond_dim=48, prediction="x0", readout_fraction=1.0,
                                         gene_readout=spec.to_config())


def test_fit_skips_unmeasured_spots_and_genes_outside_the_panel():
    r = readout()
    assert r.mean == (3.0, 2.0, 6.0) and r.std[1] == 0.0 and r.std[2] == 1.0
    assert r.marker_genes == {"HER2": "ERBB2", "ER": "ESR1"}  # MKI67 is not in the panel
    assert r.reads("HER2") and not r.reads("Ki67")
    z, mask = r.standardize(torch.tensor([[3.0, 2.0, float("nan")]]))
    assert mask.tolist() == [[True, False, False]]  # a constant gene and a NaN teach nothing
    assert GeneReadout.from_config(r.to_config()) == r
    with pytest.raises(ModelError, match="incomplete"):
        GeneReadout.from_config({"genes": GENES})


def test_the_head_is_saved_with_the_model_and_a_mismatch_is_refused(tmp_path):
    pipe = small(readout())
    assert pipe.transformer.gene_head[1].out_features == 3
    loaded = MuPDPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "m"))
    assert loaded.gene_readout == pipe.gene_readout
    for a, b in zip(pipe.transformer.gene_head.parameters(), loaded.transformer.gene_head.parameters()):
        assert torch.equal(a, b)
    spec = readout().to_config()
    spec.update(genes=GENES[:2], mean=[0, 0], std=[1, 1])
    with pytest.raises(ModelError, match="gene head has 3 outputs"):
        MuPDPipeline(pipe.transformer, pipe.codec, pipe.catalogue, pipe.rna_tokenizer,
                     pipe.text_encoder, dict(pipe.config, gene_readout=spec))


def test_translate_reads_a_covered_marker_from_the_head():
    pipe = small(readout())
    head = pipe.transformer.gene_head[1]
    with torch.no_grad():  # the head answers ERBB2 = +0.5 std and ESR1 = -1 std on every token
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.5, -1.0, 0.0]))
    tiles = np.random.default_rng(0).integers(0, 255, (2, T, T, 3), dtype=np.uint8)
    maps = pipe.translate(tiles, ["HER2", "ER", "Ki67"], steps=4)
    r = pipe.gene_readout
    np.testing.assert_allclose(maps["HER2"], (r.mean[0] + 0.5 * r.std[0]) / 4.0, atol=1e-6)
    np.testing.assert_allclose(maps["ER"], np.clip((r.mean[1] - r.std[1]) / 3.0, 0, 1), atol=1e-6)
    assert maps["Ki67"].shape == (2, T, T)  # not covered: the diffusion readout, as before


def test_gene_loss_counts_read_out_rows_and_measured_genes_only():
    r = readout()
    weights = spot_weights(np.ones((T, T), bool), 8)
    assert weights.shape == (16,) and float(weights.sum()) == pytest.approx(1.0)
    tokens = torch.zeros(2, 16, 3, requires_grad=True)
    values = torch.tensor([[5.0, 2.0, float("nan")], [1.0, 9.0, 8.0]])
    loss = gene_loss(tokens, values, weights, r, torch.tensor([True, False]))
    # row 0: ERBB2 z = (5 - 3) / std; ESR1 is constant and GAPDH unmeasured; row 1 is not read out
    assert float(loss) == pytest.approx((2 / r.std[0]) ** 2)
    loss.backward()
    assert float(tokens.grad[1].abs().sum()) == 0 and float(tokens.grad[0, :, 1:].abs().sum()) == 0
    none = gene_loss(tokens, values, weights, r, torch.tensor([False, False]))
    assert float(none) == 0.0


def test_training_loss_adds_the_gene_loss_and_teaches_the_head():
    pipe = small(readout(weight=1.0))
    x = torch.zeros(4, 3, T, T)
    batch = {"target": x, "stain": ["HER2"] * 4, "source": x,
             "genes": torch.tensor([[5.0, 2.0, 7.0]] * 4)}
    objective = FlowMatchingObjective(pipe)
    with_genes = objective.training_loss(batch, generator=torch.Generator().manual_seed(0))
    without = objective.training_loss({k: v for k, v in batch.items() if k != "genes"},
                                      generator=torch.Generator().manual_seed(0))
    assert float(with_genes) > float(without)
    with_genes.backward()
    assert float(pipe.transformer.gene_head[1].weight.grad.abs().sum()) > 0


def test_store_samples_carry_the_spot_rna_of_the_readout_panel(tmp_path):
    import dataclasses

    import pandas as pd

    from mupd.data.store import PatchStore, write_patch_store
    from mupd.train.batches import collate
    from mupd.train.config import DataSection
    from mupd.train.store import StoreSamples, fit_gene_readout

    n = 6
    tiles = np.random.default_rng(0).integers(0, 255, (n, T, T, 3), dtype=np.uint8)
    manifest = pd.DataFrame({"patient": ["A"] * 2 + ["C"] * 4, "slide": "s", "x": 0, "y": 0,
                             "mpp": 1.0, "tile_size": T, "source": "test"})
    rna = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    rna[3, 1] = np.nan  # a gene this spot's section did not measure
    maps = np.zeros((n, T, T), np.float32)
    store = write_patch_store(tmp_path / "store", tiles, manifest, markers={"HER2": maps},
                              marker_valid={"HER2": maps > -1}, marker_scales={"HER2": 10.0},
                              rna=rna, genes=GENES)
    data = DataSection(store=str(store), task="translate", targets=["HER2"], conditions=["rna"],
                       exclude_patients=["A"])
    spec = fit_gene_readout(data)
    assert spec["mean"][0] == pytest.approx(rna[2:, 0].mean())  # patient A never enters the fit
    samples = StoreSamples(PatchStore(store), np.arange(2, n), data, spec["genes"])
    assert "ESR1" not in samples[1].rna  # absent, not NaN, for the RNA condition
    batch = collate([samples[i] for i in range(4)], small(readout()).rna_tokenizer)
    assert batch["genes"].shape == (4, 3) and bool(torch.isnan(batch["genes"][1, 1]))
    with pytest.raises(DataError, match="gene readout panel"):
        StoreSamples(PatchStore(store), np.arange(2, n), dataclasses.replace(data), GENES[:2])
