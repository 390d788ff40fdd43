"""Fine-tune jobs on a real `mupd serve`: progress stream, cancel, and a SIGKILLed server that
resumes the job from its last complete checkpoint after a restart."""

from __future__ import annotations

import csv
import time

import pytest
from PIL import Image
from skimage.data import immunohistochemistry

from mupd.engine.remote import RemoteEngine, RemoteError
from mupd.requests import FinetuneRequest
from support_server import ServerProcess, save_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    model = save_tiny_model(root / "model")
    server = ServerProcess(root / "srv", model)
    # a captions folder of real IHC tiles, inside the server's data root
    from mupd.pipeline import MuPDPipeline

    T = int(MuPDPipeline.from_pretrained(model).tile_size)
    data = server.root / "slides" / "captions"
    data.mkdir(parents=True)
    image = immunohistochemistry()
    with open(data / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "caption"])
        for i in range(6):
            o = i * (min(image.shape[:2]) - T) // 5
            Image.fromarray(image[o : o + T, o : o + T]).save(data / f"t{i}.png")
            writer.writerow([f"t{i}.png", "colon, FHL2 immunohistochemistry, DAB"])
    server.start()
    yield server
    server.stop()


def _wait(engine, job_id, pred, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = engine.job_status(job_id)
        if pred(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} stuck: {engine.job_status(job_id)}")


def test_job_outside_the_roots_is_refused(setup):
    with RemoteEngine(setup.url, setup.token) as engine, pytest.raises(RemoteError) as err:
        engine.start_finetune(FinetuneRequest(data_dir="/etc", output_dir="out-x"))
    assert err.value.status_code == 403


def test_cancel_a_running_job(setup):
    with RemoteEngine(setup.url, setup.token) as engine:
        job = engine.start_finetune(FinetuneRequest(data_dir="captions", output_dir="cancelled",
                                                    steps=10_000, batch_size=2))
        _wait(engine, job.job_id, lambda s: s.state == "running")
        engine.cancel_job(job.job_id)
        status = _wait(engine, job.job_id, lambda s: s.state in ("cancelled", "failed", "done"))
        assert status.state == "cancelled", status
        assert setup.alive()


def test_killed_server_resumes_the_job_from_its_checkpoint(setup):
    steps = 24
    with RemoteEngine(setup.url, setup.token) as engine:
        job = engine.start_finetune(FinetuneRequest(data_dir="captions", output_dir="resumed",
                                                    steps=steps, batch_size=2))
        events = []
        for status in engine.job_events(job.job_id):  # NDJSON progress stream
            events.append(status)
            if status.step > steps // 4 + 1:  # past the first checkpoint (every steps // 4)
                break
        assert events[-1].state == "running" and events[-1].history
    setup.kill()
    run = setup.root / "models" / "resumed" / "training"
    complete = [p for p in run.glob("step-*") if (p / "trainer_state.json").is_file()]
    assert complete, list(run.iterdir())
    setup.start()
    with RemoteEngine(setup.url, setup.token) as engine:
        assert "resumed fine-tune job" in setup.log.read_text()
        status = engine.wait_job(job.job_id, timeout=240)
        assert status.state == "done", status
        resumed_from = min(h["step"] for h in status.history)
        assert resumed_from > steps // 4, status.history  # continued, not restarted from step 1
        from mupd.pipeline import MuPDPipeline

        MuPDPipeline.from_pretrained(status.result_path)  # a complete, loadable model
        assert status.result_path in engine.list_models()
