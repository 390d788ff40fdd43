"""The training loop, checkpoints and exact resume, on real IHC tiles (scikit-image's image).

The generic parts are exercised with `StandInPipeline`, a small flow-matching test double with
the training objective's interface (`transformer`, `training_loss`, `to`), so these tests do not
depend on the model's size or speed; test_train_model.py runs the real tiny MuPD pipeline.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mupd.errors import CancelledError, DataError, MuPDError
from mupd.progress import CancelToken
from mupd.train.batches import Sample, collate
from mupd.train.checkpoint import CheckpointManager
from mupd.train.config import CheckpointSection, OptimSection
from mupd.train.order import BatchOrder
from mupd.train.trainer import Trainer

TILE = 32


class StandInNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.mlp = torch.nn.Linear(16, 16)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.inp(torch.cat([x, t[:, None, None, None].expand_as(x[:, :1])], 1)))
        return self.out(h + self.mlp(h.mean((2, 3)))[:, :, None, None])


class StandInPipeline:
    """Test double: linear-interpolant flow matching on the target, noise from `generator`."""

    rna_tokenizer = None

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.transformer = StandInNet()

    def to(self, device):
        self.transformer.to(device)
        return self

    def training_loss(self, batch, model=None, generator=None):
        model = model or self.transformer
        x = batch["target"]
        t = torch.rand(x.shape[0], generator=generator)
        noise = torch.randn(x.shape, generator=generator)
        xt = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
        return F.mse_loss(model(xt, t), noise - x)


def real_tiles() -> list[Sample]:
    from skimage.data import immunohistochemistry

    image = immunohistochemistry()  # real IHC (hematoxylin + DAB), 512 x 512
    return [Sample(target=image[y:y + TILE, x:x + TILE], stain="H&E", name=f"{x},{y}")
            for y in range(0, 256, TILE) for x in range(0, 256, TILE)]


def make_trainer(run_dir: Path, steps: int, init_seed: int = 0, every: int = 5,
                 batch_size: int = 8, accum: int = 1) -> tuple[Trainer, StandInPipeline]:
    pipeline = StandInPipeline(init_seed)
    optim = OptimSection(max_steps=steps, batch_size=batch_size, learning_rate=3e-3,
                         grad_accum_steps=accum, warmup_steps=3, ema_decay=0.99, seed=7)
    trainer = Trainer(pipeline, real_tiles(), optim, CheckpointSection(every=every, keep=2),
                      run_dir, log_every=5)
    return trainer, pipeline


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.apply_ema()
    return {k: v.detach().clone() for k, v in trainer.unwrapped_model().state_dict().items()}


def test_loss_decreases_with_log_and_progress(tmp_path):
    events = []
    trainer, _ = make_trainer(tmp_path / "run", steps=60, every=30)
    result = trainer.fit(progress=events.append)
    assert result.final_loss < 0.8 * result.first_loss, (result.first_loss, result.final_loss)
    assert [e.step for e in events] == list(range(1, 61))
    assert {e.stage for e in events} == {"train"} and events[-1].total == 60
    assert set(events[-1].metrics) == {"loss", "lr"} and events[-1].metrics["lr"] == pytest.approx(3e-3)
    assert events[0].metrics["lr"] < 3e-3  # warmup
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert rows[0].split(",") == ["step", "loss", "lr", "grad_norm", "samples_per_s", "wall_s"]
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(5, 65, 5))
    assert [p.name for p in trainer.checkpoints.checkpoints()] == ["step-00000030", "step-00000060"]


def test_cancel_saves_and_resume_is_exact(tmp_path):
    reference, _ = make_trainer(tmp_path / "a", steps=20, accum=2)
    reference.fit()
    expected = weights(reference)

    token = CancelToken()
    first, _ = make_trainer(tmp_path / "b", steps=20, accum=2)
    with pytest.raises(CancelledError, match="step 12"):
        first.fit(cancel=token, progress=lambda e: token.cancel() if e.step == 12 else None)
    assert first.checkpoints.latest().name == "step-00000012"
    state = json.loads((first.checkpoints.latest() / "trainer_state.json").read_text())
    assert state["data_position"] == first.order.position(24)  # 12 steps x 2 micro-batches

    # a fresh process-like start: different initial weights, all state comes from the checkpoint
    second, _ = make_trainer(tmp_path / "b", steps=20, init_seed=123, accum=2)
    result = second.fit(resume=True)
    assert result.steps == 20
    got = weights(second)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_refuses_other_settings(tmp_path):
    trainer, _ = make_trainer(tmp_path / "run", steps=5)
    trainer.fit()
    other, _ = make_trainer(tmp_path / "run", steps=10, batch_size=4)
    with pytest.raises(MuPDError, match="same settings"):
        other.fit(resume=True)


def test_batch_order_shards_and_errors():
    orders = [BatchOrder(50, 4, seed=1, num_processes=3, process_index=r) for r in range(3)]
    per_epoch = orders[0].batches_per_epoch
    assert per_epoch == 4
    seen = [i for step in range(per_epoch) for o in orders for i in o.indices(step)]
    assert len(seen) == len(set(seen)) == 48  # disjoint, ragged tail of 2 dropped
    assert orders[0].indices(0) != orders[0].indices(per_epoch)  # a new permutation per epoch
    assert orders[0].micro_step(orders[0].position(9)) == 9
    with pytest.raises(DataError, match="3 training samples cannot fill one batch of 4"):
        BatchOrder(3, 4)


def test_collate_flags_mixed_tasks_and_rejects_ragged_tiles():
    tiles = real_tiles()[:2]
    tiles[1].source = tiles[0].target
    batch = collate(tiles)
    assert batch["source_present"].tolist() == [False, True]
    assert float(batch["source"][0].abs().max()) == 1.0  # the absent source is blank (0 -> -1)
    batch = collate(real_tiles()[:3])
    assert batch["target"].shape == (3, 3, TILE, TILE) and "source" not in batch
    assert -1 <= float(batch["target"].min()) < float(batch["target"].max()) <= 1
    ragged = real_tiles()[:2]
    ragged[1].target = ragged[1].target[:16]
    with pytest.raises(DataError, match="tiles of different sizes"):
        collate(ragged)


def test_checkpoint_manager_keeps_last_k_and_ignores_partial(tmp_path):
    trainer, _ = make_trainer(tmp_path / "run", steps=12, every=3)
    trainer.fit()
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    assert [p.name for p in manager.checkpoints()] == ["step-00000009", "step-00000012"]
    partial = tmp_path / "run" / "checkpoints" / ".tmp-step-00000015"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert manager.latest().name == "step-00000012"
    manager.remove_partial()
    assert not partial.exists()


SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from safetensors.torch import save_file
from test_train_loop import make_trainer, weights
from pathlib import Path
run_dir, resume = Path(sys.argv[1]), sys.argv[2] == "resume"
trainer, _ = make_trainer(run_dir, steps=40, every=4)
trainer.fit(resume=resume, progress=lambda e: time.sleep(0.1))
save_file(weights(trainer), str(run_dir / "final.safetensors"))
"""


def _launch(script: Path, run_dir: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(run_dir), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """Kill -9 mid-run (after >= 2 checkpoints), resume, and get bit-identical final weights."""
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(Path(__file__).parent))))
    reference = _launch(script, tmp_path / "ref", "fresh")
    killed = _launch(script, tmp_path / "killed", "fresh")
    manager = CheckpointManager(tmp_path / "killed" / "checkpoints")
    deadline = time.time() + 120
    while (manager.latest() is None or int(manager.latest().name[5:]) < 8) and time.time() < deadline:
        assert killed.poll() is None, killed.stdout.read().decode()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    at_kill = manager.latest()
    assert at_kill is not None and not (tmp_path / "killed" / "final.safetensors").exists()
    for ckpt in manager.checkpoints():  # every complete checkpoint is readable
        load_file(str(ckpt / "model.safetensors"))
        json.loads((ckpt / "trainer_state.json").read_text())
    resumed = _launch(script, tmp_path / "killed", "resume")
    for proc in (reference, resumed):
        out = proc.communicate(timeout=180)[0].decode()
        assert proc.returncode == 0, out
    assert manager.latest().name == "step-00000040"
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp-*"))
    a = load_file(str(tmp_path / "ref" / "final.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(r.split(",")[0]) for r in
             (tmp_path / "killed" / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(5, 45, 5))  # rows redone after the kill are not duplicated


DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from safetensors.torch import save_file
from test_train_loop import make_trainer, weights
run_dir, steps = Path(sys.argv[1]), int(sys.argv[2])
trainer, _ = make_trainer(run_dir, steps=steps, every=3, batch_size=4)
assert trainer.accelerator.num_processes == 2, trainer.accelerator.distributed_type
trainer.fit(resume=True)
w = weights(trainer)
save_file(w, str(run_dir / f"final-rank{{trainer.accelerator.process_index}}.safetensors"))
"""


@pytest.mark.slow
def test_two_process_ddp_resume_matches(tmp_path):
    """DDP over two CPU processes (gloo): ranks agree, and stop-at-6 + resume == straight run."""
    script = tmp_path / "ddp_script.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(Path(__file__).parent))))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

    def torchrun(run_dir: Path, steps: int) -> None:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--standalone", str(script), str(run_dir), str(steps)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    torchrun(tmp_path / "straight", 12)
    torchrun(tmp_path / "resumed", 6)
    torchrun(tmp_path / "resumed", 12)
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-00000012"
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                   "random_states_1.pkl"}
    finals = [load_file(str(tmp_path / run / f"final-rank{r}.safetensors"))
              for run in ("straight", "resumed") for r in (0, 1)]
    for other in finals[1:]:
        assert all(torch.equal(finals[0][k], other[k]) for k in finals[0])


def test_train_from_config_writes_model_folder_and_card(tmp_path):
    """`train()` end to end on a captions folder of real tiles, with the stand-in pipeline."""
    from PIL import Image
    from safetensors.torch import save_file

    from mupd.errors import OutputExistsError
    from mupd.train.config import config_from_dict
    from mupd.train.run import train

    class SavingStandIn(StandInPipeline):
        tile_size, mpp = TILE, 0.5

        def save_pretrained(self, folder, overwrite=False):
            Path(folder).mkdir(parents=True, exist_ok=overwrite)
            save_file(self.transformer.state_dict(), str(Path(folder) / "weights.safetensors"))

    data = tmp_path / "captions"
    data.mkdir()
    for i, s in enumerate(real_tiles()[:6]):
        Image.fromarray(s.target).save(data / f"{i}.png")
    (data / "captions.csv").write_text("file,caption\n" + "".join(
        f"{i}.png,colon IHC\n" for i in range(6)))
    config = config_from_dict({"output": str(tmp_path / "run"), "data": {"store": str(data)},
                               "optim": {"max_steps": 4, "batch_size": 2},
                               "checkpoint": {"every": 2}, "log_every": 2})

    def run(config, **kwargs):
        stand_in = SavingStandIn()  # the pipeline and its own objective
        return train(config, pipeline=stand_in, objective=stand_in, **kwargs)

    result = run(config, command="mupd train --config x.yaml")
    model = tmp_path / "run" / "model"
    assert (model / "weights.safetensors").is_file() and result.steps == 4
    card = (model / "MODEL_CARD.md").read_text()
    assert "`mupd train --config x.yaml`" in card and "6 captioned H&E tiles" in card
    assert "steps: 4 (batch 2 = 2 x 1 process(es) x 1 accumulation)" in card
    assert "EMA of the trained weights" in card and "To be filled by `mupd eval`" in card
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["max_steps"] == 4
    with pytest.raises(OutputExistsError, match="pass --resume"):
        run(config)
    with pytest.raises(OutputExistsError, match="already trained to 4 steps"):
        run(config, resume=True)
    # A run stopped early (no model/ yet) is finished at its newest checkpoint, training nothing;
    # to fewer steps than that checkpoint it is refused.
    shutil.rmtree(model)
    result = run(config, resume=True)
    assert (model / "weights.safetensors").is_file() and result.steps == 4
    assert np.isfinite(result.final_loss) and "steps: 4" in (model / "MODEL_CARD.md").read_text()
    log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    logged = list(csv.DictReader(log))[-1]["samples_per_s"]
    assert result.samples_per_second == float(logged) > 0  # the run's rate, not 0 for no steps
    fewer = config_from_dict({**config.to_dict(), "optim": {**config.to_dict()["optim"], "max_steps": 2}})
    with pytest.raises(OutputExistsError, match="already trained to 4 steps"):
        run(fewer, resume=True)
