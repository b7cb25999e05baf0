"""Pull credits and settlement without a server: the arithmetic and the exactly-once rule."""

from __future__ import annotations

import logging

import pytest

from kre_runner.node.credits import START_WITHIN, Credits
from kre_runner.node.settlement import Job, Settlement

ACK = "$JS.ACK.s.c.{delivered}.{seq}.{seq}.1763700000000000000.0"


# --- credits -------------------------------------------------------------------------------------

def _credits(max_inflight: int, **kwargs: int) -> Credits:
    credits = Credits(max_inflight, **kwargs)
    credits.careful = False  # past start: a first delivery came
    return credits


def test_at_start_and_after_a_redelivery_one_message_at_a_time():
    credits = Credits(256)
    assert credits.careful
    assert credits.want(held=0, waiting=0) == 1
    credits.opened(1)
    assert credits.want(held=0, waiting=0) == 0
    credits.delivered(10)
    assert credits.want(held=1, waiting=0) == 0  # that one is still being handled
    assert credits.want(held=0, waiting=0) == 1
    credits.careful = False  # the consumer saw a first delivery
    assert credits.want(held=0, waiting=0) == 256


def test_an_idle_replica_asks_for_max_inflight_and_no_more():
    credits = _credits(256)
    assert credits.want(held=0, waiting=0) == 256
    credits.requested = 256
    assert credits.want(held=0, waiting=0) == 0


def test_while_busy_it_asks_only_in_chunks_of_a_quarter():
    credits = _credits(256)
    credits.requested, credits.running = 200, 56
    assert credits.want(held=56, waiting=0) == 0  # 256 - 56 - 200 = 0 free
    credits.requested = 150
    assert credits.want(held=56, waiting=0) == 0  # 50 free: under a quarter (64), wait for more
    credits.requested = 136
    assert credits.want(held=56, waiting=0) == 64


def test_messages_waiting_only_for_pub_acks_are_bounded_by_a_second_max_inflight():
    credits = _credits(8)
    # No handler runs, but 16 inputs are held (their outputs wait for PubAcks): nothing more may come.
    assert credits.want(held=16, waiting=0) == 0
    assert credits.want(held=12, waiting=0) == 4


def test_prefetch_holds_a_quarter_more_while_handlers_wait():
    credits = _credits(64)
    credits.running = 64
    assert credits.want(held=64, waiting=0) == 0
    credits.handlers_wait(True)
    assert credits.want(held=64, waiting=0) == 16
    assert credits.want(held=64, waiting=16) == 0  # those 16 came and wait for a slot
    credits.handlers_wait(False)
    assert credits.want(held=64, waiting=0) == 0


def test_deliveries_and_ended_requests_return_credit():
    credits = _credits(4)
    assert credits.opened(4) == 0  # no byte budget configured
    credits.delivered(10)
    assert credits.requested == 3
    credits.request_ended(0)  # "409 Batch Completed" of a request already closed by count: nothing to do
    assert credits.requested == 3
    credits.request_ended(3)  # it expired with 3 messages unused
    assert credits.requested == 0 and not credits.open
    credits.opened(2)
    credits.opened(2)
    credits.request_ended(None)  # unknown: all of them (a reconnect, a deleted consumer)
    assert credits.requested == 0 and not credits.open
    credits.delivered(10)  # a message for a request we had given up on
    assert credits.requested == 0


def test_small_messages_get_requests_without_a_byte_budget():
    mib = 1024 * 1024
    credits = _credits(256, max_bytes=16 * mib, message_bytes=mib)
    assert credits.opened(1) == mib  # nothing seen yet: budgeted
    credits.delivered(170)
    assert credits.opened(256) == 0  # 512 × 170 B cannot come near the budget: no max_bytes
    credits.delivered(200_000)  # large messages appear: the next requests are budgeted again
    assert credits.opened(64) == 2 * mib


def test_each_request_carries_a_share_of_the_byte_budget():
    mib = 1024 * 1024
    credits = _credits(256, max_bytes=16 * mib, message_bytes=mib)
    credits.largest = 700_000
    # 16 MiB over 512 message slots: 32 KiB a slot, at least one largest message a request.
    assert credits.opened(256) == 8 * mib and credits.opened(64) == 2 * mib and credits.opened(4) == mib
    assert credits.requested == 324 and credits.requested_bytes == 11 * mib
    for _ in range(256):
        credits.delivered(170)  # small envelopes fill the first request by count ...
    assert len(credits.open) == 2 and credits.requested_bytes == 3 * mib  # ... and free the rest of its budget
    # Small messages: the count decides (256 + 256 held at most, 68 still asked for), not the bytes.
    assert credits.held_bytes == 256 * 170 and credits.want(held=256, waiting=0) == 256 - 68


def test_large_messages_are_bounded_by_the_byte_budget():
    mib = 1024 * 1024
    credits = _credits(256, max_bytes=16 * mib, message_bytes=mib)
    credits.largest = 700_000
    assert credits.opened(256) == 8 * mib
    for _ in range(11):
        credits.delivered(700_000)  # a backlog of 700 KB envelopes
    credits.request_ended(245, 300_000)  # the server stopped at the request's max_bytes
    assert not credits.open and credits.requested == 0 and credits.requested_bytes == 0
    assert credits.held_bytes == 7_700_000
    assert credits.bytes_left() == 16 * mib - 7_700_000
    assert credits.opened(256) == 8 * mib  # the next request: its share, within what is left
    assert credits.opened(256) == 16 * mib - 7_700_000 - 8 * mib  # then only what is left
    # Less than one largest message left: no request while anything is held, whatever the count allows.
    assert credits.bytes_left() < mib and credits.want(held=11, waiting=0) == 0
    for _ in range(11):
        credits.freed(700_000)
    assert credits.held_bytes == 0


def test_an_idle_replica_always_asks_even_with_a_small_budget():
    credits = _credits(4, max_bytes=2 * 1024 * 1024, message_bytes=1024 * 1024)
    assert credits.want(held=0, waiting=0) == 4


def test_a_slow_sync_handler_on_the_loop_is_asked_only_what_it_can_start_within_half_the_ack_wait():
    credits = _credits(256, ack_wait=4)
    assert credits.want(held=0, waiting=0) == 256  # nothing measured yet (careful mode covers the first call)
    credits.paced_by(0.001)  # 4 s / 2 / 1 ms = 2000 > 512 held at most: no bound
    assert not credits.paced and credits.want(held=0, waiting=0) == 256
    credits.paced_by(0.12)  # 240 inputs pulled at once would start up to 29 s after delivery
    assert credits.paced and credits.window == 16 and credits.slots == 1
    assert credits.want(held=1, waiting=0) == 16  # the one running is started: 16 may wait behind it
    credits.requested = 10
    assert credits.want(held=1, waiting=3) == 0  # 13 not started: 3 more is under a chunk (16 // 4)
    assert credits.want(held=1, waiting=2) == 4
    credits.paced_by(2.0)  # half the ack wait per call: one at a time
    credits.requested = 0
    assert credits.window == 1 and credits.want(held=0, waiting=0) == 1 and credits.want(held=0, waiting=1) == 0


def test_the_pace_follows_slower_calls_at_once_and_faster_ones_gradually():
    credits = _credits(256, ack_wait=4)
    for _ in range(40):
        credits.called(1.0)
    assert credits.pace == 1.0 and credits.window == 2
    credits.relax(0.0)  # no call since the last look (idle): the pace stays for the next burst
    credits.relax(1.0)  # the calls' mean is the pace
    assert credits.pace == pytest.approx(1.0, rel=0.01)
    for _ in range(100):
        credits.called(0.001)  # calls got faster: the pace comes down at most by half a look
    assert credits.pace == pytest.approx(1.0, rel=0.01)
    credits.relax(0.001)
    assert credits.pace == pytest.approx(0.5, rel=0.01) and credits.window == 4
    for _ in range(12):  # 0.5 × 0.5^n reaches the mean, ~1 ms, after 9 looks
        credits.relax(0.001)
    assert credits.pace == pytest.approx(0.001, rel=0.01) and not credits.paced and credits.slots == 256


def test_inputs_wait_for_the_sum_of_the_calls_before_them_so_the_pace_is_the_calls_mean():
    # The fault table's quick ack wait: 512 inputs held start within 1 s only below ~2 ms a call.
    credits = _credits(256, ack_wait=2)
    for _ in range(40):  # a loaded machine: every other call descheduled (no two slow calls in a row)
        credits.called(0.001)
        credits.called(0.02)
    assert credits.paced and 80 <= credits.window <= 110  # 1 s over ~10.5 ms a call
    # One stretched call (a GC pass) moves the mean by an eighth of it: under 30 s / 2 / 512 ≈ 29 ms.
    credits = _credits(256, ack_wait=30)
    for _ in range(100):
        credits.called(0.001)
    credits.called(0.15)
    assert not credits.paced and credits.window == 512


def test_one_call_of_a_quarter_of_the_ack_wait_paces_at_once():
    """The inputs delivered behind it need keep-alives before the next call, however fast the calls were."""
    credits = _credits(256, ack_wait=2)
    for _ in range(100):
        credits.called(0.001)
    credits.called(0.5)
    assert credits.paced and credits.window == 2 and credits.slots == 1
    credits.called(0.001)  # one fast call after it: the pace comes down by looks, not at once
    assert credits.window == 2
    credits.relax(0.006)  # the second's mean: 101 calls, one of them 0.5 s
    assert credits.window == 4


def test_calls_under_the_floor_cannot_pace_and_a_seconds_mean_wears_off_a_stretched_call():
    """The pipeline counts only calls over ``floor``; the ticker's look brings the mean to the true one."""
    credits = _credits(256, ack_wait=30)
    assert credits.floor * credits.cap <= 30 * START_WITHIN / 8  # every input held, each under the floor: 1/8
    credits.called(0.2)  # stretched (a GC pass): a mean of 25 ms, under 30 s / 2 / 512 ≈ 29 ms
    assert not credits.paced
    credits.relax(0.0012)  # a second of ~1 ms calls (not counted one by one) and that one
    credits.called(0.2)  # another, a second later: not two in the mean
    assert not credits.paced and credits.window == 512
    credits.called(0.2)  # two in a row: calls that slow now (a mean of ~48 ms)
    assert credits.paced


def test_may_start_is_bounded_by_max_inflight():
    credits = _credits(2)
    credits.running = 1
    assert credits.may_start()
    credits.running = 2
    assert not credits.may_start()


# --- settlement ----------------------------------------------------------------------------------

class _Wire:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.fail = fail

    async def publish(self, subject: str, payload: bytes, reply: str = "", msg_id: str | None = None,
                      headers: dict[str, str] | None = None) -> None:
        if self.fail:
            raise ConnectionError("connection closed")
        self.sent.append((subject, payload))


def _settlement(wire: _Wire) -> Settlement:
    return Settlement(wire, logging.getLogger("test.settlement"), ack_wait=30, publish_timeout=5)  # type: ignore[arg-type]


def _job(seq: int = 7, delivered: int = 1) -> Job:
    return Job(ACK.format(seq=seq, delivered=delivered), f"n:s:{seq}", now=0.0)


async def test_acked_when_the_last_reference_goes_and_never_twice():
    wire = _Wire()
    settlement = _settlement(wire)
    job = _job()
    settlement.jobs.add(job)
    job.refs += 1  # a publish
    assert not await settlement.drop_reference(job)  # the handler's part: the publish is still out
    assert await settlement.drop_reference(job)  # its PubAck
    assert not await settlement.drop_reference(job)  # a stray release settles nothing more
    await settlement.hand_back(job, "late")
    assert wire.sent == [(job.ack_subject, b"+ACK")]
    assert settlement.jobs == set() and (settlement.acked, settlement.nakked) == (1, 0)


@pytest.mark.parametrize(("delivered", "delay_ns"), [(1, 500_000_000), (3, 2_000_000_000), (40, 30_000_000_000)])
async def test_a_failed_publish_naks_with_a_delay_growing_with_deliveries(delivered, delay_ns):
    wire = _Wire()
    settlement = _settlement(wire)
    job = _job(delivered=delivered)
    job.refs += 1
    await settlement.drop_reference(job, None)
    await settlement.drop_reference(job, "no PubAck within 5s")
    assert wire.sent == [(job.ack_subject, b'-NAK {"delay": %d}' % delay_ns)]


async def test_hand_back_naks_at_once_and_later_releases_do_nothing():
    wire = _Wire()
    settlement = _settlement(wire)
    job = _job()
    settlement.jobs.add(job)
    await settlement.hand_back(job, "shutdown grace over")
    assert not await settlement.drop_reference(job)  # the cancelled handler's finally
    assert wire.sent == [(job.ack_subject, b"-NAK")] and settlement.jobs == set()


async def test_a_lost_ack_is_logged_and_the_input_counts_as_settled(caplog):
    settlement = _settlement(_Wire(fail=True))
    job = _job()
    settlement.jobs.add(job)
    assert await settlement.drop_reference(job)
    assert job.settled and settlement.jobs == set()
    assert "could not send +ACK for input seq 7" in caplog.text


async def test_keep_alive_spares_finished_jobs_and_retries_leaked_ones():
    wire = _Wire()
    settlement = _settlement(wire)
    running, waiting, publishing, leaked = _job(1), _job(2), _job(3), _job(4)
    publishing.handled_at, leaked.handled_at = 90.0, 80.0  # handlers done 10 s and 20 s ago; publish timeout 5 s
    publishing.refs = leaked.refs = 2
    settlement.jobs.update({running, publishing, leaked})
    stuck = await settlement.keep_alive(100.0, [waiting])
    assert stuck == [leaked]
    assert sorted(wire.sent) == sorted([(running.ack_subject, b"+WPI"), (waiting.ack_subject, b"+WPI"),
                                        (leaked.ack_subject, b'-NAK {"delay": 500000000}')])
    wire.sent.clear()
    assert await settlement.keep_alive(101.0, [waiting]) == [] and wire.sent == []  # touched a second ago


# --- PubAcks -------------------------------------------------------------------------------------

class _FakeNats:
    def new_inbox(self) -> str:
        return "_INBOX.test"


async def _puback_outcome(data: bytes, headers: dict[str, str] | None = None) -> str | None:
    """What the publisher reports for a publish answered by ``data`` (None: stored)."""
    from kre_runner.node.publisher import PubAckPublisher

    reported: list[str | None] = []

    async def on_stored(owner: object, error: str | None) -> None:
        reported.append(error)

    publisher = PubAckPublisher(_FakeNats(), None, _Wire(), 5.0, on_stored)  # type: ignore[arg-type]
    await publisher.publish("s.out", b"x", "id", owner="job")
    await publisher._on_puback("_INBOX.test.1", "", data, headers)
    [error] = reported
    return error


@pytest.mark.parametrize("data", [
    b'{"stream":"error","seq":1}',
    b'{"stream":"error","domain":"error","seq":1}',
    b'{"stream":"my-error-stream","seq":7,"duplicate": true}',
    b'{"stream":"s", "domain":"error", "seq":3}',  # the server's hand-made form, spaces after commas
    b' { "seq": 3, "stream": "error" }',  # any JSON object with a stream and a sequence, in any order
])
async def test_a_pub_ack_is_stored_whatever_its_stream_or_domain_is_named(data):
    assert await _puback_outcome(data) is None


@pytest.mark.parametrize(("data", "headers", "expected"), [
    (b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"},"stream":"error","seq":0}',
     None, "JetStream error 503: maximum messages exceeded"),
    (b'{"error":{"code":400,"description":"bad"}}', None, "JetStream error 400: bad"),
    (b"", {"Status": "503"}, "no JetStream stream captures the subject (503 no responders)"),
    (b"", None, "empty PubAck (status none)"),
    (b"ok", None, "unreadable PubAck b'ok'"),  # a plain subscriber's reply is no PubAck
    (b'["stream", 1]', None, "unreadable PubAck"),
])
async def test_a_failed_or_unreadable_pub_ack_says_why(data, headers, expected):
    error = await _puback_outcome(data, headers)
    assert error is not None and error.startswith(expected)


@pytest.mark.parametrize(("error", "counter"), [
    ("interrupted before its outcome was published", "interrupted"),
    ("internal error: KeyError: 'x'", "internal_errors"),
    ("never settled", "never_settled"),
])
async def test_failures_of_the_node_itself_are_not_counted_as_publish_failures(error, counter):
    from kre_runner.node.counters import NodeMetrics

    metrics = NodeMetrics()
    settlement = Settlement(_Wire(), logging.getLogger("test.settlement"), ack_wait=30, publish_timeout=5,
                            metrics=metrics)  # type: ignore[arg-type]
    job = _job()
    settlement.jobs.add(job)
    await settlement.drop_reference(job, error)
    assert metrics.publish_failures == 0
    assert (getattr(metrics, counter), metrics.retried) == (1, 1)


async def test_a_failed_or_timed_out_publish_counts_as_a_publish_failure():
    from kre_runner.node.counters import NodeMetrics
    from kre_runner.node.publisher import PubAckPublisher

    metrics = NodeMetrics()

    async def on_stored(owner: object, error: str | None) -> None:
        pass

    publisher = PubAckPublisher(_FakeNats(), None, _Wire(), 0.0, on_stored, metrics=metrics)  # type: ignore[arg-type]
    await publisher.publish("s.out", b"x", "id", owner="job")
    await publisher.publish("s.out", b"x", "id", owner="job")
    await publisher._on_puback("_INBOX.test.1", "", b'{"error":{"code":503,"description":"full"}}', None)
    await publisher.expire()  # the second: its PubAck is overdue
    assert metrics.publish_failures == 2
    await PubAckPublisher(_FakeNats(), None, _Wire(fail=True), 5.0, on_stored, metrics=metrics).publish(  # type: ignore[arg-type]
        "s.out", b"x", "id", owner="job")
    assert metrics.publish_failures == 3


# --- dead letters refused ------------------------------------------------------------------------

class _DeadLetters:
    """Records each dead-letter publish (its stage) and takes its reference, as deadletter.DeadLetters does."""

    def __init__(self) -> None:
        self.stages: list[int] = []

    async def send(self, job: Job, reason: str) -> None:
        self.stages.append(job.dead_letter)
        job.refs += 1


def _dead_lettering(wire: _Wire) -> tuple[Settlement, _DeadLetters]:
    from kre_runner.node.counters import NodeMetrics

    letters = _DeadLetters()
    settlement = Settlement(wire, logging.getLogger("test.settlement"), ack_wait=30, publish_timeout=5,  # type: ignore[arg-type]
                            max_deliver=2, dead_letter=letters.send, metrics=NodeMetrics())
    return settlement, letters


async def test_a_refused_dead_letter_is_held_alive_and_retried_and_the_entrypoint_told_only_once_stored():
    import time

    from kre_runner.node.settlement import DEAD_LETTER_COPY, DEAD_LETTER_TELL

    wire = _Wire()
    settlement, letters = _dead_lettering(wire)
    metrics = settlement._metrics
    job = _job(delivered=2)
    settlement.jobs.add(job)
    assert not await settlement.drop_reference(job, "the handler asked for a retry: down")  # out of deliveries
    assert letters.stages == [DEAD_LETTER_COPY]  # the copy only: no error envelope yet
    assert not await settlement.drop_reference(job, "JetStream error 503: maximum messages exceeded")  # refused
    assert wire.sent == [] and not job.settled and job in settlement.jobs  # held: neither nakked nor acked
    assert (metrics.dead_letter_failures, metrics.dead_letters_held(), metrics.retried) == (1, 1, 0)
    assert "its dead-letter copy: JetStream error 503: maximum messages exceeded" in settlement.cannot_dead_letter()
    later = time.monotonic() + 60
    assert await settlement.keep_alive(later, []) == []  # due: published again, and kept alive
    assert letters.stages == [DEAD_LETTER_COPY, DEAD_LETTER_COPY]
    assert wire.sent == [(job.ack_subject, b"+WPI")]
    assert not await settlement.drop_reference(job, None)  # the copy is stored: now the error envelope
    assert letters.stages[-1] == DEAD_LETTER_TELL
    assert await settlement.drop_reference(job, None)
    assert wire.sent[-1] == (job.ack_subject, b"+TERM")
    assert (metrics.dead_lettered, metrics.dead_letters_held(), settlement.cannot_dead_letter()) == (1, 0, None)


@pytest.mark.parametrize(("delivered", "expected"), [(2, "2 spare deliveries left"), (4, "on its last delivery")])
async def test_a_held_dead_letter_handed_back_at_shutdown_says_what_becomes_of_it(caplog, delivered, expected):
    wire = _Wire()
    settlement, _ = _dead_lettering(wire)
    job = _job(delivered=delivered)
    settlement.jobs.add(job)
    await settlement.drop_reference(job, "the handler ran 2 times")
    await settlement.drop_reference(job, "no JetStream stream captures the subject (503 no responders)")
    await settlement.hand_back(job, "shutdown grace over")
    assert wire.sent == [(job.ack_subject, b"-NAK")] and settlement.cannot_dead_letter() is None
    assert expected in caplog.text
