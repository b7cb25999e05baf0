"""The node's Prometheus metrics: plain counters the hot path bumps, exposed by a custom collector.

prometheus_client's own Counter and Histogram take a lock on every update; at tens of thousands of
messages a second that is a measurable share of the node's work. Here the consumer does plain
attribute increments (``metrics.ok += 1``) and a bisect into a list for durations, all on the event
loop thread (handler threads never touch them), and :class:`NodeCollector` reads the numbers only
when ``/metrics`` is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["NodeCollector", "metrics_registry"]

from ..node.counters import NodeMetrics


# Seconds. A handler call ranges from microseconds (a lookup) to seconds (a model on a GPU).
class NodeCollector(Collector):
    """Exposes :class:`NodeMetrics` with the labels ``node``, ``workflow`` and ``version``."""

    def __init__(self, metrics: NodeMetrics, *, node: str, workflow: str, version: str) -> None:
        self._m = metrics
        self._label_names = ["node", "workflow", "version"]
        self._labels = [node, workflow, version]

    def _family(self, cls: type, name: str, doc: str, **kwargs: object) -> Metric:
        return cls(name, doc, labels=[*self._label_names, *kwargs.pop("extra_labels", [])], **kwargs)

    def collect(self) -> Iterator[Metric]:
        m = self._m
        labels = self._labels
        messages = self._family(CounterMetricFamily, "kre_messages", "Messages settled, by outcome",
                                extra_labels=["outcome"])
        for outcome in ("ok", "error", "invalid", "filtered", "retried", "dead_lettered"):
            messages.add_metric([*labels, outcome], getattr(m, outcome))
        yield messages
        for name, doc, histogram in (
            ("kre_handler_duration_seconds", "Duration of every handler call, raising or not", m.handler_seconds),
            ("kre_workflow_duration_seconds", "Last node: from the first tracking entry to this node's end",
             m.workflow_seconds),
        ):
            family = self._family(HistogramMetricFamily, name, doc)
            family.add_metric(labels, histogram.cumulative(), histogram.sum)
            yield family
        for name, doc, value in (
            ("kre_publish_failures", "Publishes not stored (refused, no PubAck in time, no stream, ...)",
             m.publish_failures),
            ("kre_interrupted", "Handler runs cancelled by the shutdown before their outcome was published",
             m.interrupted),
            ("kre_internal_errors", "Outcomes the runner failed to build or send (inputs retried)", m.internal_errors),
            ("kre_never_settled", "Inputs found unsettled long after their handler ended (retried; a bug)",
             m.never_settled),
            ("kre_dead_letter_failures", "Dead-letter copies (or their error envelopes) refused; retried by the node",
             m.dead_letter_failures),
            ("kre_redeliveries", "Inputs delivered again (after a nak, a crash or the ack wait)", m.redeliveries),
            ("kre_influx_points_dropped", "Time-series points dropped (buffer full, refused, left at shutdown)",
             m.influx_dropped()),
            ("kre_db_errors", "ctx.db / ctx.prediction calls that raised DatabaseError", m.db_errors()),
        ):
            counter = self._family(CounterMetricFamily, name, doc)
            counter.add_metric(labels, value)
            yield counter
        for name, doc, gauge_value in (
            ("kre_inflight_messages", "Messages held by this replica", m.inflight()),
            ("kre_dead_letter_held_messages",
             "Inputs held unacked because the dead-letter stream refuses them (retried until stored)",
             m.dead_letters_held()),
            ("kre_consumer_pending_messages", "Messages in the stream not yet delivered to the node's consumer",
             m.consumer_pending),
            ("kre_consumer_ack_pending_messages", "Messages delivered to the consumer and not yet acked",
             m.consumer_ack_pending),
        ):
            gauge = self._family(GaugeMetricFamily, name, doc)
            if gauge_value is not None:  # the consumer's counts are unknown until its first look
                gauge.add_metric(labels, gauge_value)
            yield gauge


def metrics_registry(metrics: NodeMetrics, *, node: str, workflow: str, version: str) -> CollectorRegistry:
    """A registry of its own (nothing global): the node's metrics and the process collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(metrics, node=node, workflow=workflow, version=version))
    ProcessCollector(registry=registry)
    return registry
