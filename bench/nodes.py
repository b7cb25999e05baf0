"""Starting the node under test as its own process: the reference, or kre-runner via its real CLI.

kre-runner runs exactly as in a pod: ``python -m kre_runner run`` with the ``KRT_*`` environment,
this directory as ``KRT_BASE_PATH`` and a handler file with its own protobufs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from jetstream import CONSUMER, ENTRYPOINT, INPUT, NODE, OUTPUT, STREAM, VERSION

from kre_runner.dev.embedded import free_port

__all__ = ["NodeProcess", "NodeSpec", "kre_env"]

BENCH_DIR = Path(__file__).resolve().parent


def kre_env(nats_url: str, function: str = "handler", max_inflight: int = 256) -> dict[str, str]:
    """The ``KRT_*`` environment kre-runner runs with in the bench (``function`` of handler.py)."""
    return {
        "KRT_WORKFLOW_NAME": "bench", "KRT_RUNTIME_ID": "bench", "KRT_VERSION_ID": f"{VERSION}-id",
        "KRT_VERSION": VERSION, "KRT_NODE_NAME": NODE, "KRT_NATS_SERVER": nats_url,
        "KRT_NATS_STREAM": STREAM, "KRT_NATS_INPUT": INPUT, "KRT_NATS_OUTPUT": OUTPUT,
        "KRT_NATS_ENTRYPOINT_SUBJECT": ENTRYPOINT, "KRT_BASE_PATH": str(BENCH_DIR),
        "KRT_HANDLER_PATH": f"handler.py:{function}", "KRT_MAX_INFLIGHT": str(max_inflight),
        "KRT_DELIVER_POLICY": "all", "KRT_SHUTDOWN_GRACE": "5",
        # The HTTP endpoint on, as in production, on a port of its own (nodes may overlap between rounds).
        "KRT_HTTP_PORT": str(free_port()),
    }


@dataclass(frozen=True)
class NodeSpec:
    """What to run: ``kind`` is ``reference`` or ``kre-runner``; the rest applies to kre-runner."""

    kind: str
    function: str = "handler"
    max_inflight: int = 256
    influx_url: str | None = None
    src: str | None = None  # import kre_runner from this directory instead (to try a patch)

    @property
    def label(self) -> str:
        if self.kind == "reference":
            return "reference"
        return f"kre-runner:{self.function}:{self.max_inflight}"

    def command(self, nats_url: str) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        src = self.src if self.kind == "kre-runner" else None
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, str(BENCH_DIR), env.get("PYTHONPATH")]))
        if self.kind == "reference":
            return [sys.executable, str(BENCH_DIR / "reference_node.py"), "--url", nats_url, "--stream", STREAM,
                    "--consumer", CONSUMER, "--output", OUTPUT, "--node", NODE,
                    "--max-inflight", str(self.max_inflight)], env
        env.update(kre_env(nats_url, self.function, self.max_inflight))
        if self.influx_url:
            env["KRT_INFLUX_URI"] = self.influx_url
        else:
            env.pop("KRT_INFLUX_URI", None)
        return [sys.executable, "-m", "kre_runner", "run"], env


class NodeProcess:
    """The running node; a context manager that stops it with SIGTERM (as Kubernetes would)."""

    def __init__(self, spec: NodeSpec, nats_url: str, log_path: Path | None = None) -> None:
        args, env = spec.command(nats_url)
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=self._log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()  # type: ignore[union-attr]
        return self.proc.returncode

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
