"""Throwaway MongoDB-compatible and time-series servers for the demo, tests and bench.

* :class:`EmbeddedMongo`: ``nx-27017`` (MongoDB wire protocol on SQLite, from PyPI, a test extra);
* :class:`EmbeddedVictoriaMetrics`: VictoriaMetrics (Debian package ``victoria-metrics``), which
  accepts InfluxDB line protocol on ``/api/v2/write``.

Both run on a free loopback port with their data in a temporary directory; ``stop()`` then
``start()`` keeps the port and the data, as an outage and a restart would.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .embedded import free_port

__all__ = ["EmbeddedMongo", "EmbeddedVictoriaMetrics", "find_nx_27017", "find_victoria_metrics"]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout}s")


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def find_nx_27017() -> str:
    """The ``nx-27017`` console script next to this interpreter (the venv's), or on PATH."""
    candidate = Path(sys.executable).parent / "nx-27017"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("nx-27017")
    if found:
        return found
    raise FileNotFoundError("nx-27017 not found: pip install nx-27017 (a test extra of kre-runner)")


def find_victoria_metrics() -> str:
    candidates = ("/usr/bin/victoria-metrics", shutil.which("victoria-metrics"), shutil.which("victoria-metrics-prod"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError("victoria-metrics not found: apt-get install -y victoria-metrics")


class EmbeddedMongo:
    """nx-27017 on a free port; ``stop()``/``start()`` keep the port and the data (an outage)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kre-mongo-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedMongo:
        self._proc = subprocess.Popen(
            [find_nx_27017(), "--host", "127.0.0.1", "-p", str(self.port), "--data-dir", f"{self.dir}/data",
             "--log-file", f"{self.dir}/nx.log", "--pid-file", f"{self.dir}/nx.pid"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, self._proc, timeout, "nx-27017")
        return self

    def stop(self) -> None:
        _terminate(self._proc)
        self._proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class EmbeddedVictoriaMetrics:
    """VictoriaMetrics single-node on a free port; ``stop()``/``start()`` keep the port and the data."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kre-vm-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedVictoriaMetrics:
        self._proc = subprocess.Popen(
            [find_victoria_metrics(), f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={self.dir}/data",
             "-loggerLevel=ERROR", "-retentionPeriod=100y"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, self._proc, timeout, "victoria-metrics")
        return self

    def stop(self) -> None:
        _terminate(self._proc)
        self._proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
