"""Distributed whole-slide staining: 2 processes (gloo on CPU) give the 1-process output exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch.multiprocessing as mp
from skimage.data import immunohistochemistry

from support_server import free_port, save_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _rank(rank: int, world: int, port: int, model: str, out: str, stains: list) -> None:
    import torch
    import torch.distributed as dist

    from mupd.distributed import translate_distributed
    from mupd.pipeline import MuPDPipeline
    from mupd.regions.source import ArraySlide

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        pipeline = MuPDPipeline.from_pretrained(model)
        slide = ArraySlide(immunohistochemistry(), mpp=float(pipeline.mpp))
        result = translate_distributed(pipeline, slide, stains, None, box=(8, 16, 300, 260),
                                       seed=2, batch_size=2, tissue_only=False)
        if rank == 0:
            np.savez(out, **{l.name: np.asarray(l.data) for l in result.layers})
        else:
            assert result is None
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_and_the_plain_translator(tmp_path):
    import torch

    from mupd.pipeline import MuPDPipeline
    from mupd.regions.source import ArraySlide
    from mupd.regions.translate import RegionTranslator

    model = save_tiny_model(tmp_path / "model")
    pipeline = MuPDPipeline.from_pretrained(model)
    stains = [next(t["name"] for t in pipeline.catalogue.to_list() if t["kind"] == "marker"), "H&E"]
    outs = {}
    for world in (2, 1):
        outs[world] = tmp_path / f"world{world}.npz"
        mp.spawn(_rank, args=(world, free_port(), str(model), str(outs[world]), stains), nprocs=world)
    two, one = np.load(outs[2]), np.load(outs[1])
    torch.set_num_threads(1)
    plain = RegionTranslator(pipeline, batch_size=2, tissue_only=False)(
        ArraySlide(immunohistochemistry(), mpp=float(pipeline.mpp)), stains, box=(8, 16, 300, 260), seed=2)
    assert sorted(two.files) == sorted(one.files) == sorted(l.name for l in plain.layers)
    for layer in plain.layers:
        assert np.array_equal(two[layer.name], one[layer.name]), layer.name
        assert np.array_equal(one[layer.name], np.asarray(layer.data)), layer.name
    assert len(set(two.files)) >= 2 and two[stains[0]].std() > 0  # a real, non-constant output
