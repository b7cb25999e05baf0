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


# What each scenario must end with, beyond 0 lost and 0 duplicated.
EXPECTED: dict[str, Callable[[faults.Row], bool]] = {
    "replicas-killed": _all_answered,
    "server-restarted": lambda row: _all_answered(row) and row.recovery is not None and row.recovery < 10,
    "large-backlog": lambda row: _all_answered(row) and row.inputs == 30,
    # Recovery counted from the new consumer leader's election (the election itself is the servers' own).
    "cluster-leader-kill": lambda row: _all_answered(row) and row.recovery is not None and row.recovery < 5,
    "consumer-deleted": lambda row: _all_answered(row) and row.inputs == 300 and row.recovery is not None
    and row.recovery < 10,
    "mongo-down": _all_answered,
    "influx-down": _all_answered,
    "malformed-inputs": lambda row: (row.inputs, row.outputs, row.errors, row.dead) == (110, 10, 100, 0),
    "handler-hangs": lambda row: _all_answered(row) and row.inputs == 21,
    "process-killed": lambda row: (row.inputs, row.outputs, row.errors, row.dead) == (21, 20, 0, 1),
    "output-stream-full": lambda row: _all_answered(row) and row.inputs == 60 and row.note.startswith("20 stored"),
    # 4 paths × 194 inputs at 1 ms, 50 ms, 120 ms and 1 s (half the 2 s ack wait): none called twice.
    "slow-handlers": lambda row: _all_answered(row) and row.inputs == 776 and row.second_calls == 0,
}


def test_every_scenario_has_its_expectation():
    assert set(EXPECTED) == set(faults.SCENARIOS)


@pytest.mark.parametrize("name", list(faults.SCENARIOS))
async def test_fault(name):
    row = await faults.SCENARIOS[name](True)
    assert (row.lost, row.duplicated) == (0, 0), row
    assert EXPECTED[name](row), row
