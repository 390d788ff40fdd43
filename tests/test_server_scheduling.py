"""The server's device slot (one call at a time, bounded queue) and path confinement."""

from __future__ import annotations

import os
import threading
import time

import pytest

from mupd.engine.server.errors import AccessDenied, DeviceBusy
from mupd.engine.server.paths import confine
from mupd.engine.server.slot import DeviceSlot
from mupd.errors import CancelledError
from mupd.progress import CancelToken


def test_one_call_at_a_time_in_arrival_order_and_a_bounded_queue():
    slot = DeviceSlot(max_waiting=3)
    order, running, peak = [], [0], [0]
    first = slot.enqueue("first", CancelToken())

    def use(ticket, name):
        with slot.hold(ticket):
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            order.append(name)
            time.sleep(0.05)
            running[0] -= 1

    tickets = [slot.enqueue(f"r{i}", CancelToken()) for i in range(2)]
    with pytest.raises(DeviceBusy, match="3 requests already wait") as busy:
        slot.enqueue("one too many", CancelToken())
    assert busy.value.retry_after > 0
    threads = [threading.Thread(target=use, args=(t, t.label)) for t in reversed(tickets)]
    for t in threads:
        t.start()
    use(first, "first")
    for t in threads:
        t.join(5)
    assert order == ["first", "r0", "r1"] and peak[0] == 1
    assert slot.state() == {"running": None, "waiting": 0}


def test_a_cancelled_waiter_leaves_the_queue():
    slot = DeviceSlot(max_waiting=4)
    holder = slot.enqueue("holder", CancelToken())
    token = CancelToken()
    waiter = slot.enqueue("waiter", token)
    errors = []

    def wait():
        try:
            with slot.hold(waiter):
                pass
        except CancelledError as exc:
            errors.append(exc)

    with slot.hold(holder):
        t = threading.Thread(target=wait)
        t.start()
        token.cancel()
        t.join(5)
    assert errors and slot.state()["waiting"] == 0


def test_inference_is_turned_away_while_a_fine_tune_job_holds_the_device():
    slot = DeviceSlot(max_waiting=4)
    with slot.job_gate("fine-tune job abc", CancelToken()):
        with pytest.raises(DeviceBusy, match="fine-tune job abc"):
            slot.enqueue("generate", CancelToken())
    with slot.hold(slot.enqueue("generate", CancelToken())):
        assert slot.state()["running"] == "generate"


def test_confine_resolves_symlinks_and_refuses_escapes(tmp_path):
    root, outside = tmp_path / "slides", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    (root / "a.svs").write_bytes(b"x")
    (root / "link").symlink_to(outside)
    assert confine("a.svs", [root.resolve()], "slide path") == (root / "a.svs").resolve()
    assert confine(str(root / "a.svs"), [root.resolve()], "slide path") == (root / "a.svs").resolve()
    for bad in ["../private", str(outside), "link/x.svs", "a.svs/../../private"]:
        with pytest.raises(AccessDenied, match="outside the folders"):
            confine(bad, [root.resolve()], "slide path")
    with pytest.raises(AccessDenied, match="--slide-root"):
        confine("a.svs", [], "slide path")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsync'd files through /proc")
def test_job_records_are_written_atomically_and_fsynced(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mupd.requests import FinetuneRequest
    from mupd.engine.server.core import Server, ServerConfig

    engine = SimpleNamespace(info=lambda: SimpleNamespace(model_path=str(tmp_path)))
    server = Server(engine, ServerConfig(state_dir=str(tmp_path / "state")))
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    server._write_record("abc123", FinetuneRequest("d", "o"), "running")
    jobs = tmp_path / "state" / "jobs"
    assert [p.name for p in jobs.iterdir()] == ["abc123.json"]  # no temporary left
    assert any(s.startswith(str(jobs / ".abc123.json.")) for s in synced)  # the data, before the rename
    assert str(jobs) in synced  # the rename
    assert server.job_status("abc123").state == "running"
