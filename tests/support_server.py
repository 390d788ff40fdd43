"""Fixtures for the server tests: a tiny model folder and `mupd serve` as a real subprocess."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
import pytest

STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_model(folder: Path) -> Path:
    """The bundled model, copied (a trained model: distinct inputs give distinct outputs)."""
    from mupd.paths import DEFAULT_MODEL

    if not DEFAULT_MODEL.is_dir():
        pytest.skip(f"bundled model {DEFAULT_MODEL} is absent")
    shutil.copytree(DEFAULT_MODEL, folder)
    return folder


class ServerProcess:
    """`python -m mupd.cli serve` on a free loopback port; restartable on the same state."""

    def __init__(self, root: Path, model: Path, extra: Optional[list[str]] = None) -> None:
        self.root, self.model, self.extra = root, model, extra or []
        self.token = secrets.token_urlsafe(24)
        self.token_file = root / "token"
        root.mkdir(parents=True, exist_ok=True)
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        for name in ("slides", "models", "state"):
            (root / name).mkdir(exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "mupd.cli", "serve", "--port", str(self.port),
               "--token-file", str(self.token_file), "--model", str(self.model), "--device", "cpu",
               "--slide-root", str(self.root / "slides"), "--model-root", str(self.root / "models"),
               "--state-dir", str(self.root / "state"), *self.extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MUPD_CACHE": str(self.root / "cache")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mupd serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mupd serve did not come up in {STARTUP_TIMEOUT_S} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown (what a crash or an OOM kill does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def alive(self) -> bool:
        return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
