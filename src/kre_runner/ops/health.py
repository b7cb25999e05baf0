"""Liveness and readiness: the node's phase and its NATS connection, as Kubernetes probes see them.

Phases: ``starting`` (connecting, checking the stream) → ``init`` (the user's ``init`` runs) →
``ready`` (consuming) → ``draining`` (SIGTERM: finishing in-flight messages). Readiness is true only
when ready *and* connected, so a rolling update waits for ``init`` and a replica that lost NATS or
is draining gets no traffic it cannot serve (there is none for a pull consumer, but the rollout
and dashboards read it). Liveness fails only when NATS has been unreachable for longer than
``KRT_HEALTH_RECONNECT_GRACE``: a restart may help then, and not before (a server restart takes a
few seconds, and a pod restarted meanwhile would reload its model for nothing), or when the node's
event loop has not run for longer than ``stall_limit`` once ready (a sync handler stuck on it: the
probes are served from a thread of their own, so answering proves nothing about the loop; its
heartbeat does). A sync ``init`` may hold the loop for as long as it takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["DRAINING", "INIT", "READY", "STARTING", "Health"]

STARTING = "starting"
INIT = "init"
READY = "ready"
DRAINING = "draining"


class Health:
    """Updated by the node and the connection callbacks; read by ``/healthz`` and ``/readyz``."""

    def __init__(self, reconnect_grace: float, clock: Callable[[], float] = time.monotonic,
                 stall_limit: float = 60.0) -> None:
        self.reconnect_grace = reconnect_grace
        self.stall_limit = stall_limit
        self._clock = clock
        self.phase = STARTING
        self.started = clock()
        # Not connected yet counts as disconnected since the start: the first connect is bounded anyway.
        self.disconnected_since: float | None = self.started
        # Whether the durable consumer exists and is pulled from (False while it or its stream is recreated).
        self.consumer_bound: Callable[[], bool] = _always
        # Why the node cannot dead-letter now (inputs held until the dead-letter stream takes them), or None.
        self.cannot_dead_letter: Callable[[], str | None] = _nothing
        self.last_beat = self.started  # when the node's event loop last ran its heartbeat

    def beat(self) -> None:
        """Called by the node's event loop every second."""
        self.last_beat = self._clock()

    def connected(self) -> None:
        self.disconnected_since = None

    def disconnected(self) -> None:
        if self.disconnected_since is None:
            self.disconnected_since = self._clock()

    def liveness(self) -> tuple[bool, str]:
        """(alive, reason)."""
        down = None if self.disconnected_since is None else self._clock() - self.disconnected_since
        if down is not None and down >= self.reconnect_grace:
            return False, (f"NATS unreachable for {down:.1f}s, longer than KRT_HEALTH_RECONNECT_GRACE="
                           f"{self.reconnect_grace:g}")
        if self.phase in (READY, DRAINING):
            stalled = self._clock() - self.last_beat
            if stalled > self.stall_limit:
                return False, (f"the event loop has not run for {stalled:.0f}s (a sync handler blocking it?), "
                               f"longer than KRT_ACK_WAIT + 30s")
        if down is None:
            return True, "connected to NATS"
        return True, f"connecting to NATS for {down:.1f}s (grace {self.reconnect_grace:g}s)"

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason)."""
        if self.phase != READY:
            return False, {STARTING: "starting", INIT: "init(ctx) is running",
                           DRAINING: "draining in-flight messages before exit"}.get(self.phase, self.phase)
        if self.disconnected_since is not None:
            return False, "disconnected from NATS"
        if not self.consumer_bound():
            return False, "the durable consumer or its stream is missing: recreating it"
        # Readiness, not liveness: a restart would not help, and it would spend the held inputs' last deliveries.
        problem = self.cannot_dead_letter()
        if problem is not None:
            return False, f"cannot dead-letter: {problem}"
        return True, "consuming"


def _always() -> bool:
    return True


def _nothing() -> str | None:
    return None
