"""The servers a benchmark needs, started on free loopback ports and removed afterwards.

nats-server comes from ``kre_runner.embedded`` (JetStream, file storage in a temp dir);
VictoriaMetrics (Debian package ``victoria-metrics``) plays InfluxDB: it accepts ``/api/v2/write``,
which is what kre-runner's InfluxSink speaks.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from kre_runner.embedded import EmbeddedNats, free_port

__all__ = ["EmbeddedNats", "VictoriaMetrics", "find_victoria_metrics"]


def find_victoria_metrics() -> str | None:
    for candidate in ("/usr/bin/victoria-metrics", shutil.which("victoria-metrics")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


class VictoriaMetrics:
    """VictoriaMetrics single-node with its data in a temp dir; a context manager."""

    def __init__(self, binary: str) -> None:
        self.port = free_port()
        self._binary = binary
        self._dir = tempfile.mkdtemp(prefix="kre-bench-vm-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> VictoriaMetrics:
        self._proc = subprocess.Popen(
            [self._binary, f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={self._dir}",
             "-loggerLevel=ERROR"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"victoria-metrics exited with code {self._proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise TimeoutError("victoria-metrics did not start within 20s")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)
