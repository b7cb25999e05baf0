"""Fuzzing: the envelope decoder, and the whole pipeline, with random bytes and random handler outcomes.

The pipeline runs without a server: a stand-in connection (as in ``bench/instructions.py``) feeds real
``MSG`` protocol bytes through nats-py's own parser into a real ``Consumer``, captures every ``PUB``
the consumer writes, and answers its publishes with PubAcks. Whatever the input and whatever the
handler does, every input gets exactly one settling command and nothing escapes as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kre_helpers import STREAM, node_env, request_envelope
from standin import Publish, StandIn, parse_writes

from kre_runner.config import Settings
from kre_runner.context import Context
from kre_runner.handler import load_user_code
from kre_runner.node.consumer import Consumer
from kre_runner.node.envelope import EnvelopeError, KreNatsMessage, decode

OUTCOMES = ["value", "any", "none", "raise", "retry", "wrong", "unserialisable"]
MODES = {"inline": ("handler", "0"), "threaded": ("handler", "2"), "async": ("handler_async", "0")}
CONSUMER = "v1-greeter"
OUT = f"{STREAM}.out"
ENTRY = f"{STREAM}.entrypoint"
DEAD = f"{STREAM}-dead-letter.greeter"
_SETTLING = (b"+ACK", b"-NAK", b"+TERM")


# ------------------------------------------------------------------------------------------ the decoder


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None)
def test_decode_raises_only_envelope_error_on_random_bytes(data):
    with contextlib.suppress(EnvelopeError):
        assert isinstance(decode(data), KreNatsMessage)


@given(st.binary(max_size=2048), st.integers(min_value=0, max_value=4096))
@settings(max_examples=300, deadline=None)
def test_decode_raises_only_envelope_error_on_random_gzip(data, cut):
    compressed = gzip.compress(data)
    for candidate in (compressed, compressed[:cut], b"\x1f\x8b" + data):
        with contextlib.suppress(EnvelopeError):
            assert isinstance(decode(candidate), KreNatsMessage)


# ------------------------------------------------------------------------------------------ the pipeline


@dataclass
class Input:
    seq: int
    delivered: int
    data: bytes
    outcome: str | None  # None: random bytes

    @property
    def ack_subject(self) -> str:
        return f"$JS.ACK.{STREAM}.{CONSUMER}.{self.delivered}.{self.seq}.{self.seq}.1763700000000000000.0"


@dataclass
class Seen:
    settles: dict[str, list[bytes]] = field(default_factory=dict)
    publishes: dict[int, list[Publish]] = field(default_factory=dict)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if " failed on all " not in record.getMessage():  # dead-lettering says so at ERROR, by design
            self.records.append(record)


async def _run_pipeline(mode: str, inputs: list[Input]) -> tuple[Seen, list[logging.LogRecord]]:
    function, threads = MODES[mode]
    env = node_env("nats://127.0.0.1:4222", f"fuzzed.py:{function}", KRT_HANDLER_THREADS=threads,
                   KRT_MAX_DELIVER="2")
    s = Settings.from_env(env)
    errors = _Errors()
    root = logging.getLogger("kre_runner")
    root.addHandler(errors)
    nc = StandIn()
    consumer = None
    try:
        log = logging.getLogger("kre_runner.fuzz")
        ctx = Context(base_path=s.base_path, logger=log)
        consumer = Consumer(s, load_user_code(s.base_path, s.handler_path), nc, ctx, log)
        inbox = await consumer.attach()
        sids = {sub.subject: sid for sid, sub in nc._subs.items()}
        prefix = consumer.puback_prefix
        by_ack = {i.ack_subject: i for i in inputs}
        seen = Seen()
        await nc._ps.parse(b"".join(b"MSG %s %d %s %d\r\n%s\r\n" % (inbox.encode(), sids[inbox], i.ack_subject.encode(),
                                                                   len(i.data), i.data) for i in inputs))
        acked = 0
        for _ in range(400):  # bounded: at most ~4 s of pumping
            await asyncio.sleep(0.01)
            nc.take()
            pubacks = []
            for pub in parse_writes(nc.written):
                if pub.subject in by_ack:
                    seen.settles.setdefault(pub.subject, []).append(pub.data)
                elif pub.reply.startswith(prefix):
                    seq = int(pub.msg_id.split(":")[2]) if pub.msg_id.count(":") >= 2 else -1
                    seen.publishes.setdefault(seq, []).append(pub)
                    acked += 1
                    ack = b'{"stream":"%s","seq":%d}' % (STREAM.encode(), acked)
                    pubacks.append(b"MSG %s %d %d\r\n%s\r\n" % (pub.reply.encode(), sids[prefix + "*"], len(ack), ack))
            if pubacks:
                await nc._ps.parse(b"".join(pubacks))
            settled = [i for i in inputs if any(c.startswith(_SETTLING) for c in seen.settles.get(i.ack_subject, []))]
            if len(settled) == len(inputs) and not consumer.inflight and not pubacks:
                break
        return seen, errors.records
    finally:
        root.removeHandler(errors)
        if consumer is not None:
            consumer.stop_threads()
        nc._flusher_task.cancel()
        for sub in nc._subs.values():
            if sub._wait_for_msgs_task is not None:
                sub._wait_for_msgs_task.cancel()
        await asyncio.sleep(0)


_inputs = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(OUTCOMES), st.sampled_from([1, 1, 1, 3])),
        st.tuples(st.none(), st.just(1)),
    ),
    min_size=1, max_size=12,
)


@pytest.mark.parametrize("mode", list(MODES))
@given(plan=_inputs, garbage=st.lists(st.binary(max_size=300), min_size=12, max_size=12))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_input_is_settled_once_whatever_the_handler_does(mode, plan, garbage):
    inputs = []
    for seq, ((outcome, delivered), noise) in enumerate(zip(plan, garbage, strict=False), start=1):
        if outcome is None:
            data = noise if seq % 2 else b"\x1f\x8b" + noise  # random bytes, or a broken gzip
        else:
            data = request_envelope(outcome, tracking_id=f"t{seq}").SerializeToString()
        inputs.append(Input(seq, delivered, data, outcome))
    seen, errors = asyncio.run(_run_pipeline(mode, inputs))

    assert not errors, [r.getMessage() for r in errors]
    for i in inputs:
        commands = [c for c in seen.settles.get(i.ack_subject, []) if c.startswith(_SETTLING)]
        assert len(commands) == 1, (i, commands)
        command = commands[0]
        published = seen.publishes.get(i.seq, [])
        subjects = sorted(p.subject for p in published)
        if i.outcome is None:
            assert command == b"+ACK", (i, command)
            assert len(published) <= 1
        elif i.delivered == 3:  # over KRT_MAX_DELIVER: not run again, dead-lettered, the entrypoint told
            assert command == b"+TERM", (i, command)
            assert subjects == sorted([DEAD, ENTRY]), subjects
        elif i.outcome == "retry":
            assert command.startswith(b"-NAK"), (i, command)
            assert subjects == []
        else:
            assert command == b"+ACK", (i, command)
            expected = {"value": [OUT], "any": [OUT], "none": []}.get(i.outcome, [ENTRY])
            assert subjects == expected, (i, subjects)
            for p in published:
                envelope = decode(p.data)
                assert envelope.tracking_id == f"t{i.seq}"
                assert bool(envelope.error) == (p.subject == ENTRY)
