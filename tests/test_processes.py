"""Real ``kre-runner run`` processes: replicas sharing a consumer, SIGTERM, redelivery, CLI errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from kre_helpers import (
    STREAM,
    Collector,
    greeting,
    node_env,
    request_envelope,
    start_process,
    wait_ready,
    wait_settled,
)

pytestmark = pytest.mark.integration

IN = f"{STREAM}.greeter"
OUT = f"{STREAM}.out"


def _stop(proc: subprocess.Popen[bytes], sig: int | None = signal.SIGTERM, timeout: float = 30) -> str:
    """Signal ``proc`` (unless ``sig`` is None) and collect its output; kill it if it hangs."""
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"process did not exit within {timeout}s:\n{out.decode(errors='replace')}") from None
    return out.decode(errors="replace")


async def test_two_replicas_share_the_consumer_exactly_once(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    env = node_env(nats_server.url, "greet.py", KRT_MAX_INFLIGHT="32")
    procs = [start_process(env), start_process(env)]
    try:
        await wait_ready(js, "v1-greeter", replicas=2)
        total = 2000
        for i in range(total):
            await js.publish(IN, request_envelope(f"r{i}", tracking_id=f"id-{i}").SerializeToString())
        results = await out.take(total, timeout=30)
        await wait_settled(js, "v1-greeter")
        assert await out.nothing_more()
    finally:
        logs = [_stop(p) for p in procs]
    ids = [r.tracking_id for r in results]
    assert len(ids) == total and set(ids) == {f"id-{i}" for i in range(total)}
    pids = {greeting(r).rsplit("pid=", 1)[1] for r in results}
    assert pids == {str(p.pid) for p in procs}, "both replicas must have taken part"
    assert all(p.returncode == 0 for p in procs), logs


async def test_sigterm_with_messages_in_flight_loses_none(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    env = node_env(nats_server.url, "slow.py", KRT_MAX_INFLIGHT="20", SLOW_SECONDS="0.3")
    proc = start_process(env)
    total = 100
    try:
        await wait_ready(js, "v1-greeter")
        for i in range(total):
            await js.publish(IN, request_envelope(f"s{i}", tracking_id=f"s-{i}").SerializeToString())
        first = await out.take(10)
        info = await js.consumer_info(STREAM, "v1-greeter")
        assert info.num_ack_pending > 0, "messages must be in flight when SIGTERM comes"
    finally:
        log = _stop(proc)
    assert proc.returncode == 0, log
    # Everything the stopped replica held was finished and acked: nothing waits for the ack wait.
    info = await js.consumer_info(STREAM, "v1-greeter")
    assert info.num_ack_pending == 0, log
    assert "stopped after" in log

    # A new replica takes the rest; every request is answered exactly once.
    second = start_process(env)
    try:
        rest = await out.take(total - len(first), timeout=30)
        await wait_settled(js, "v1-greeter")
    finally:
        _stop(second)
    ids = sorted(r.tracking_id for r in first + rest)
    assert ids == sorted(f"s-{i}" for i in range(total))


async def test_redelivered_input_does_not_duplicate_its_output(nats_server, js, workflow_stream):
    """Replica A freezes mid-message past the ack wait; B gets the redelivery; A wakes up and publishes too."""
    out = await Collector(js, OUT).start()
    env = node_env(nats_server.url, "slow.py", KRT_ACK_WAIT="1.5", SLOW_SECONDS="0.5")
    # A asks for one message at a time, so once frozen it holds no pull request the redelivery could go to.
    a = start_process({**env, "KRT_MAX_INFLIGHT": "1"})
    b = None
    try:
        await wait_ready(js, "v1-greeter")
        await js.publish(IN, request_envelope("once", tracking_id="only-one").SerializeToString())
        for _ in range(100):
            if (await js.consumer_info(STREAM, "v1-greeter")).num_ack_pending == 1:
                break
            await asyncio.sleep(0.02)
        a.send_signal(signal.SIGSTOP)  # as a long GC pause or a network partition would
        b = start_process(env)
        [result] = await out.take(1, timeout=15)  # B's output, after the ack wait redelivered
        a.send_signal(signal.SIGCONT)  # A finishes its copy and publishes the same Nats-Msg-Id
        await asyncio.sleep(1.5)
        await wait_settled(js, "v1-greeter")
        assert await out.nothing_more(1.0)
        stream = await js.stream_info(STREAM)
        assert stream.state.messages == 0  # interest retention: everything consumed and acked
    finally:
        a.send_signal(signal.SIGCONT)
        _stop(a)
        if b is not None:
            _stop(b)
    assert result.tracking_id == "only-one"
    assert greeting(result).startswith("slow once pid=")


def test_cli_reports_every_configuration_problem_and_exits_2():
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRT_")}
    env.update({"KRT_NATS_SERVER": "http://wrong", "KRT_MAX_INFLIGHT": "zero"})
    proc = subprocess.run([sys.executable, "-m", "kre_runner", "run"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert "KRT_NODE_NAME is not set: expected a value, e.g. KRT_NODE_NAME=greeter" in proc.stderr
    assert "KRT_NATS_SERVER='http://wrong' is invalid: expected a nats:// URL" in proc.stderr
    assert "KRT_MAX_INFLIGHT='zero' is invalid: expected an integer ≥ 1, e.g. KRT_MAX_INFLIGHT=256" in proc.stderr


async def test_cli_exits_1_with_a_clear_message_when_the_handler_has_a_syntax_error(nats_server, js,
                                                                                    workflow_stream, tmp_path):
    (tmp_path / "broken.py").write_text("def handler(ctx, data)\n    return data\n")
    env = node_env(nats_server.url, "broken.py", KRT_BASE_PATH=str(tmp_path))
    proc = start_process(env)
    out = _stop(proc, None)
    assert proc.returncode == 1
    assert "cannot start: syntax error in" in out and "broken.py:1" in out


def test_cli_exits_1_when_nats_is_unreachable():
    env = node_env("nats://127.0.0.1:1", "greet.py")
    started = time.monotonic()
    proc = start_process(env)
    out = _stop(proc, None, timeout=60)
    assert proc.returncode == 1
    assert "cannot connect to NATS at nats://127.0.0.1:1 (KRT_NATS_SERVER)" in out
    assert time.monotonic() - started < 40


async def test_cli_never_logs_the_nats_password(nats_server, workflow_stream):
    env = node_env("nats://kre:s3cr3t-pw@127.0.0.1:1", "greet.py")
    proc = start_process(env)
    out = _stop(proc, None, timeout=60)
    assert "s3cr3t-pw" not in out
    assert "kre:***@127.0.0.1:1" in out


def test_mongo_writer_cli_config_error_and_unreachable_nats():
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRT_")}
    bad = subprocess.run([sys.executable, "-m", "kre_runner", "mongo-writer"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "KRT_NATS_MONGO_WRITER is not set" in bad.stderr
    env.update({"KRT_NATS_SERVER": "nats://127.0.0.1:1", "KRT_NATS_MONGO_WRITER": "mongo_writer_data.demo",
                "KRT_MONGO_URI": "mongodb://127.0.0.1:1", "KRT_RUNTIME_ID": "demo"})
    unreachable = subprocess.run([sys.executable, "-m", "kre_runner", "mongo-writer"], env=env, capture_output=True,
                                 text=True, timeout=60)
    assert unreachable.returncode == 1
    assert "cannot connect to NATS at nats://127.0.0.1:1" in unreachable.stdout


def _output_until(proc: subprocess.Popen[bytes], text: str, timeout: float = 60) -> str:
    """What ``proc`` printed up to a line holding ``text`` (its start-up may take seconds on a loaded machine)."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"no {text!r} within {timeout}s:\n{seen.decode(errors='replace')}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            seen += os.read(proc.stdout.fileno(), 65536)
    return seen.decode(errors="replace")


def test_sigterm_while_starting_stops_at_once():
    proc = start_process(node_env("nats://127.0.0.1:1", "greet.py"))
    # Its handler is loaded (its signal handlers are in place): it now retries its first connection.
    before = _output_until(proc, "loaded handler")
    started = time.monotonic()
    out = before + _stop(proc, timeout=10)
    assert proc.returncode == 0, out
    assert time.monotonic() - started < 5
    assert "stopped while starting" in out


def test_the_demo_workflow_answers_every_request():
    """The README's first command ends in `kre-runner demo`: it must work end to end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRT_")}
    proc = subprocess.run([sys.executable, "-m", "kre_runner", "demo", "--requests", "40"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "40/40 replies (40 matched by tracking id, 0 errors)" in proc.stdout, proc.stdout[-3000:]
    assert "via entrypoint -> services -> greeter -> decorator" in proc.stdout


def _descendants(root: int) -> dict[int, str]:
    """Every process below ``root`` (pid -> start time, so a reused pid is not mistaken for it), from /proc."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        starts[int(entry)] = fields[19]
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def _still_running(processes: dict[int, str]) -> dict[int, str]:
    alive = {}
    for pid, start in processes.items():
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                alive[pid] = cmdline.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL])
def test_up_leaves_no_process_behind_when_its_terminal_closes_or_it_is_killed(tmp_path, sig):
    """Closing the terminal (SIGHUP) stops everything as Ctrl-C does; after SIGKILL the children follow `up`."""
    from kre_helpers import HANDLERS, PROTOS

    (tmp_path / "workflow.yaml").write_text(
        f"workflow: wf\nnodes:\n  - {{name: a, handler: {HANDLERS / 'greet.py'}}}\n"
        f"  - {{name: b, handler: {HANDLERS / 'greet.py'}, replicas: 2}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(PROTOS), env.get("PYTHONPATH", "")])
    up = subprocess.Popen([sys.executable, "-m", "kre_runner", "up", str(tmp_path / "workflow.yaml"), "--services"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert up.stdout is not None
    output = b""
    deadline = time.monotonic() + 60
    while b"is ready" not in output:
        line = up.stdout.readline()
        assert line and time.monotonic() < deadline, output.decode(errors="replace")
        output += line
    children = _descendants(up.pid)
    if sig == signal.SIGHUP:  # what the services hold, read through up's state file
        stored = subprocess.run([sys.executable, "-m", "kre_runner", "stored", str(tmp_path / "workflow.yaml")],
                                env=env, capture_output=True, text=True, timeout=60)
        assert stored.returncode == 0, stored.stderr
        assert "MongoDB mongodb://127.0.0.1:" in stored.stdout and "time series at http://127.0.0.1:" in stored.stdout
    # nats-server, nx-27017, VictoriaMetrics and three nodes (some may have children of their own).
    assert len(children) >= 6, (children, output.decode(errors="replace"))
    up.send_signal(sig)
    deadline = time.monotonic() + 30
    while _still_running(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _still_running(children)
    for pid in left:  # do not leak them into the other tests
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    up.stdout.close()
    code = up.wait(30)
    assert not left, f"{len(left)} of {len(children)} processes outlived up after {sig.name}: {left}"
    assert code == (0 if sig == signal.SIGHUP else -signal.SIGKILL)
