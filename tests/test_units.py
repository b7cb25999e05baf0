"""Unit tests: configuration, envelope framing, handler loading, tracking points, ack subjects."""

from __future__ import annotations

import gzip
import sys
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from kre_helpers import request_envelope

from kre_runner.cli import main as cli_main
from kre_runner.config import VARIABLES, ConfigError, Settings, consumer_name, redact_url
from kre_runner.handler import HandlerLoadError, load_user_code
from kre_runner.nats.streams import subject_in
from kre_runner.node.envelope import EnvelopeError, KreNatsMessage, decode, encode, parse_iso
from kre_runner.node.settlement import parse_ack_subject
from kre_runner.ops.elapsed import ElapsedRecorder

BASE_ENV = {
    "KRT_WORKFLOW_NAME": "wf",
    "KRT_RUNTIME_ID": "rt",
    "KRT_VERSION_ID": "vid",
    "KRT_VERSION": "v1.2.0",
    "KRT_NODE_NAME": "node a",
    "KRT_NATS_SERVER": "nats://localhost:4222",
    "KRT_NATS_STREAM": "rt-v1-wf",
    "KRT_NATS_INPUT": "rt-v1-wf.node-a",
    "KRT_NATS_OUTPUT": "rt-v1-wf.node-b",
    "KRT_HANDLER_PATH": "src/handler.py",
}


# ---------------------------------------------------------------- configuration


def test_settings_from_the_original_variables():
    settings = Settings.from_env({**BASE_ENV, "KRT_IS_LAST_NODE": "true", "KRT_MAX_INFLIGHT": "64"})
    assert settings.is_last_node and settings.max_inflight == 64
    assert settings.nats_servers == ("nats://localhost:4222",)
    assert settings.mongo_db == "rt-data" and settings.influx_bucket == "rt"
    assert settings.consumer_name == "v1_2_0-node_a"  # dots and spaces are not allowed in JetStream names
    assert settings.entrypoint_subject is None and settings.mongo_uri is None
    with pytest.raises(AttributeError):
        settings.max_inflight = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", [name for name, required, *_ in VARIABLES if required])
def test_each_missing_required_variable_is_named_with_an_example(name):
    env = dict(BASE_ENV)
    del env[name]
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    [problem] = caught.value.problems
    example = next(ex for n, _, _, ex in VARIABLES if n == name)
    assert problem.startswith(f"{name} is not set: expected ")
    assert problem.endswith(f"e.g. {name}={example}")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("KRT_NATS_SERVER", "http://localhost:4222", "a nats:// URL"),
        ("KRT_NATS_SERVER", "nats://localhost:notaport", "a nats:// URL"),
        ("KRT_NATS_STREAM", "has.dots", "a stream name without . * > or spaces"),
        ("KRT_NATS_INPUT", "wf.*", "a subject without wildcards"),
        ("KRT_NATS_OUTPUT", "wf out", "a subject without wildcards"),
        ("KRT_NATS_ENTRYPOINT_SUBJECT", "wf.>", "a subject without wildcards"),
        ("KRT_NATS_MONGO_WRITER", "a..b", "a subject without wildcards"),
        ("KRT_IS_LAST_NODE", "maybe", "true or false"),
        ("KRT_MONGO_URI", "localhost:27017", "a mongodb:// URI"),
        ("KRT_INFLUX_URI", "localhost:8086", "an http(s):// URL"),
        ("KRT_MAX_INFLIGHT", "0", "an integer ≥ 1"),
        ("KRT_HANDLER_THREADS", "-1", "an integer ≥ 0"),
        ("KRT_ACK_WAIT", "soon", "seconds > 0"),
        ("KRT_PUBLISH_TIMEOUT", "-5", "seconds > 0"),
        ("KRT_SHUTDOWN_GRACE", "inf", "seconds > 0"),
        ("KRT_DELIVER_POLICY", "last", "new or all"),
        ("KRT_LOG_LEVEL", "LOUD", "DEBUG, INFO, WARNING (or WARN) or ERROR"),
        ("KRT_INFLUX_BATCH_SIZE", "1.5", "an integer ≥ 1"),
        ("KRT_INFLUX_FLUSH_INTERVAL", "0", "seconds > 0"),
        ("KRT_INFLUX_BUFFER", "x", "an integer ≥ 1"),
        ("KRT_ELAPSED_METRICS", "on", "true or false"),
        ("KRT_DB_TIMEOUT", "never", "seconds > 0"),
    ],
)
def test_each_malformed_variable_is_named_with_what_was_expected(name, value, expected):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE_ENV, name: value})
    [problem] = caught.value.problems
    assert problem.startswith(f"{name}=")
    assert f"is invalid: expected {expected}, e.g. {name}=" in problem


def test_all_problems_are_reported_at_once():
    env = {**BASE_ENV, "KRT_MAX_INFLIGHT": "-3"}
    del env["KRT_NODE_NAME"]
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert [p.split()[0].split("=")[0] for p in caught.value.problems] == ["KRT_NODE_NAME", "KRT_MAX_INFLIGHT"]
    assert str(caught.value).startswith("invalid configuration:\n  KRT_NODE_NAME")


def test_secrets_in_urls_are_redacted_in_errors():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE_ENV, "KRT_MONGO_URI": "mongo://admin:hunter2@db:27017"})
    assert "hunter2" not in str(caught.value) and "admin:***@db:27017" in str(caught.value)
    assert redact_url("nats://u:p@h:4222") == "nats://u:***@h:4222"
    assert redact_url("nats://token@h:4222") == "nats://***@h:4222"
    assert redact_url("nats://h:4222") == "nats://h:4222"


def test_consumer_name_is_sanitised_like_the_original_durable():
    assert consumer_name("v1", "greeter") == "v1-greeter"
    assert consumer_name("v1.0.0", "my node/x") == "v1_0_0-my_node_x"


def test_help_lists_every_command_and_run_help_every_variable(capsys):
    with pytest.raises(SystemExit) as caught:
        cli_main(["--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    for command in ("run", "up", "call", "trace", "dead-letter", "stored", "demo", "mongo-writer"):
        assert command in text
    assert "examples:" in text and "KRT_NATS_SERVER" not in text  # the variable table is run's
    with pytest.raises(SystemExit) as caught:
        cli_main(["run", "--help"])
    text = capsys.readouterr().out
    for name, *_ in VARIABLES:
        assert name in text


# ---------------------------------------------------------------- envelope


def test_small_envelopes_are_not_compressed_and_large_ones_are():
    envelope = request_envelope("x" * 10)
    assert encode(envelope, 1000) == envelope.SerializeToString()
    big = KreNatsMessage(tracking_id="t", error="e" * 5000)
    data = encode(big, 1000)
    assert data[:2] == b"\x1f\x8b" and len(data) < 1000
    assert decode(data) == big


def test_incompressible_envelope_over_the_limit_is_refused():
    import os

    with pytest.raises(EnvelopeError, match="over the 1000-byte limit"):
        encode(KreNatsMessage(error=os.urandom(3000).hex()), 1000)


# mtime=0: the ids of parameters must not depend on the second they were made in (xdist workers
# collect separately and must agree).
@pytest.mark.parametrize(
    "data",
    [b"\xff\xff\xff", b"\x1f\x8b\x08\x00garbage", gzip.compress(b"\xff\xff\xff", mtime=0),
     gzip.compress(b"x" * 100, mtime=0)[:-10]],
    ids=["not-gzip", "bad-gzip-header", "gzip-of-garbage", "truncated-gzip"],
)
def test_garbage_is_an_envelope_error(data):
    with pytest.raises(EnvelopeError):
        decode(data)


def test_gzip_bombs_are_refused():
    with pytest.raises(EnvelopeError, match="inflates to more than 1000 bytes, the limit KRT_MAX_INFLATED_BYTES"):
        decode(gzip.compress(b"\x00" * 5000), 1000)
    envelope = KreNatsMessage(error="x" * 990)
    assert decode(gzip.compress(envelope.SerializeToString()), envelope.ByteSize()) == envelope  # exactly the limit


def test_tracking_timestamps_parse_naive_utc():
    assert parse_iso("2022-06-01T12:00:00.123456") == datetime(2022, 6, 1, 12, 0, 0, 123456)
    assert parse_iso("2022-06-01T12:00:00+02:00") == datetime(2022, 6, 1, 10, 0, 0)
    assert parse_iso("") is None and parse_iso("yesterday") is None


# ---------------------------------------------------------------- elapsed-time points


def test_elapsed_points_carry_the_original_tags_and_fields():
    lines: list[str] = []
    settings = Settings.from_env({**BASE_ENV, "KRT_IS_LAST_NODE": "true"})
    record = ElapsedRecorder(settings, lines.append)
    envelope = request_envelope("a", tracking_id='t"1')
    started = datetime(2026, 1, 1, 0, 0, 1, tzinfo=timezone.utc).timestamp()
    record(envelope, started, started + 0.0025)
    node_line, workflow_line = lines
    assert node_line.startswith("node_elapsed_time,node=node\\ a,version=v1.2.0,workflow=wf elapsed_ms=2.500,")
    assert 'node_from="entrypoint"' in node_line and 'tracking_id="t\\"1"' in node_line
    assert "waiting_ms=999.998" in node_line  # 00:00:01 - 00:00:00.000002
    assert workflow_line.startswith("workflow_elapsed_time,version=v1.2.0,workflow=wf elapsed_ms=")


def test_elapsed_points_do_not_crash_without_tracking():
    lines: list[str] = []
    record = ElapsedRecorder(Settings.from_env({**BASE_ENV, "KRT_IS_LAST_NODE": "true"}), lines.append)
    record(KreNatsMessage(tracking_id="t"), 1767225600.0, 1767225600.001)
    assert len(lines) == 1 and 'node_from=""' in lines[0] and "waiting_ms=0.0" in lines[0]


# ---------------------------------------------------------------- handler loading


def test_handler_files_named_like_stdlib_modules_do_not_clash(tmp_path):
    (tmp_path / "os.py").write_text("import json\n\ndef handler(ctx, data):\n    return json.dumps(data)\n")
    code = load_user_code(tmp_path, "os.py")
    import os

    assert code.handler(None, [1]) == "[1]"
    assert sys.modules["os"] is os and hasattr(os, "getpid")


def test_handler_spec_with_a_function_name_and_own_modules(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mylib.py").write_text("VALUE = 41\n")
    (tmp_path / "models" / "main.py").write_text(
        "import mylib\n\nasync def init(ctx):\n    pass\n\ndef predict(ctx, data):\n    return mylib.VALUE + data\n"
    )
    code = load_user_code(tmp_path, "models/main.py:predict")
    assert code.handler(None, 1) == 42 and not code.handler_is_async
    assert code.init is not None and code.init_is_async


@pytest.mark.parametrize(
    ("source", "spec", "message"),
    [
        (None, "missing.py", "does not exist"),
        ("def handler(ctx, data)\n", "h.py", "syntax error in .*h.py:1"),
        ("raise ImportError('no torch')\n", "h.py", "importing .*h.py failed: ImportError: no torch"),
        ("def other(ctx, data):\n    pass\n", "h.py", "defines no function handler"),
        ("def handler(ctx, data):\n    pass\n", "h.py:predict", "defines no function predict"),
        ("init = 3\ndef handler(ctx, data):\n    pass\n", "h.py", "init is not a function"),
    ],
)
def test_handler_load_errors_are_clear(tmp_path, source, spec, message):
    if source is not None:
        (tmp_path / "h.py").write_text(source)
    with pytest.raises(HandlerLoadError, match=message):
        load_user_code(tmp_path, spec)


# ---------------------------------------------------------------- subjects


def test_ack_subject_parsing_v1_and_v2():
    assert parse_ack_subject("$JS.ACK.S.C.3.41.40.1700000000.0") == ("S", 41, 3)
    assert parse_ack_subject("$JS.ACK.dom.acchash.S.C.2.41.40.1700000000.0.tok") == ("S", 41, 2)
    assert parse_ack_subject("weird") == ("unknown", 0, 1)


def test_subject_matching_for_the_output_stream():
    assert subject_in("wf.out", ["wf.*"])
    assert subject_in("wf.a.b", ["wf.>"])
    assert not subject_in("wf.a.b", ["wf.*"])
    assert not subject_in("other.out", ["wf.*"])


def test_readme_documents_every_variable():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [name for name, *_ in VARIABLES if f"`{name}`" not in readme]
    assert not missing, f"README lacks {missing}"


def test_tracking_clock_matches_the_original_timestamp_format():
    from datetime import timezone as tz

    from kre_runner.node.envelope import TrackingClock

    clock = TrackingClock()
    ts, text = clock.now()
    parsed = datetime.fromisoformat(text)
    assert parsed.tzinfo is None and len(text) == 26  # 2026-01-01T00:00:00.000000
    assert abs(parsed.replace(tzinfo=tz.utc).timestamp() - ts) < 1e-5
    later = clock.now()[1]
    assert later >= text


@pytest.mark.parametrize("times", [
    [1_767_225_599.999_998, 1_767_225_600.000_001],  # into a new second, minute, hour, day and year
    [1_767_225_600.5, 1_767_225_599.25],  # the system clock stepped back across a second
    [1_767_225_600.5, 1_767_225_600.25],  # ... and within one
    [1_767_225_600.5, 1_767_225_630.75],  # a jump ahead
])
def test_tracking_clock_is_exact_across_seconds_and_clock_steps(monkeypatch, times):
    from kre_runner.node import envelope as envelope_module
    from kre_runner.node.envelope import TrackingClock

    clock = TrackingClock()
    for ts in times:
        monkeypatch.setattr(envelope_module, "time", SimpleNamespace(time=lambda ts=ts: ts, gmtime=time.gmtime,
                                                                     strftime=time.strftime))
        expected = datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None)
        got_ts, text = clock.now()
        got = datetime.fromisoformat(text)
        assert got_ts == ts and len(text) == 26
        assert got.replace(microsecond=0) == expected.replace(microsecond=0)  # the right second, after any step
        assert abs(got.microsecond - expected.microsecond) <= 1  # float rounding of the fraction
