"""The fault table (``bench/faults.py``) in reduced sizes, with exact counts: nothing lost, nothing twice.

Each scenario runs real servers (nats-server, a 3-node cluster, nx-27017, VictoriaMetrics) and real
``kre-runner run`` processes; ``python bench/faults.py`` prints the same rows in full size.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

import faults

pytestmark = pytest.mark.integration


def _all_answered(row: faults.Row) -> bool:
    return row.outputs == row.inputs and (row.errors, row.dead) == (0, 0)


# Recovery bounds: what the node's design allows (from its own timers), plus this margin for what a
# shared, loaded machine adds (scheduling, a server's start-up, the first output's round trips).
_MARGIN = 5.0  # seconds
# nats-py reconnects after connection.py's reconnect_time_wait (0.5 s, plus up to 0.1 s of jitter), and the
# node then pulls and republishes at once.
_RECONNECT = 0.6
# The open pull request ends with "409 Consumer Deleted" at once; the fallback, the consumer check every
# 5 s (consumer.py), then recreates it within its 1 s retry loop.
_CONSUMER_RECREATED = 5.0 + 1.0


def _recovered_within(row: faults.Row, design: float) -> bool:
    return row.recovery is not None and row.recovery < design + _MARGIN


# What each scenario must end with, beyond 0 lost and 0 duplicated.
EXPECTED: dict[str, Callable[[faults.Row], bool]] = {
    "replicas-killed": _all_answered,
    "server-restarted": lambda row: _all_answered(row) and _recovered_within(row, _RECONNECT),
    "large-backlog": lambda row: _all_answered(row) and row.inputs == 30,
    # Recovery counted from the new consumer leader's election (the election itself is the servers' own):
    # the leader-elected advisory makes the node pull at once (design 0 s), well before the fallback of
    # three missed heartbeats (15 s) that the bound excludes.
    "cluster-leader-kill": lambda row: _all_answered(row) and _recovered_within(row, 0.0),
    "consumer-deleted": lambda row: _all_answered(row) and row.inputs == 300
    and _recovered_within(row, _CONSUMER_RECREATED),
    "mongo-down": _all_answered,
    "influx-down": _all_answered,
    "malformed-inputs": lambda row: (row.inputs, row.outputs, row.errors, row.dead) == (110, 10, 100, 0),
    "handler-hangs": lambda row: _all_answered(row) and row.inputs == 21,
    "process-killed": lambda row: (row.inputs, row.outputs, row.errors, row.dead) == (21, 20, 0, 1),
    "output-stream-full": lambda row: _all_answered(row) and row.inputs == 60 and row.note.startswith("20 stored"),
    # 4 paths × 194 inputs at 1 ms, 50 ms, 120 ms and 1 s (half the 2 s ack wait): none called twice.
    "slow-handlers": lambda row: _all_answered(row) and row.inputs == 792 and row.second_calls == 0,
    # A 3.x fan-in node (three inputs): every input answered by the handler its from_node names.
    "v3-replicas-killed": lambda row: _all_answered(row) and row.note.startswith("0 misrouted"),
    "v3-server-restarted": lambda row: _all_answered(row) and row.note.startswith("0 misrouted")
    and _recovered_within(row, _RECONNECT),
}


def test_every_scenario_has_its_expectation():
    assert set(EXPECTED) == set(faults.SCENARIOS)


@pytest.mark.parametrize("name", list(faults.SCENARIOS))
async def test_fault(name):
    row = await faults.SCENARIOS[name](True)
    assert (row.lost, row.duplicated) == (0, 0), row
    assert EXPECTED[name](row), row
