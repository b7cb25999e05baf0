"""Units of operating a node: settings for HTTP/logs/auth, metrics, health, JSON logs, rate-limited tracebacks."""

from __future__ import annotations

import io
import json
import logging

import pytest
from kre_helpers import services_settings
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kre_runner.config import ConfigError, redacted_settings
from kre_runner.node.counters import DurationHistogram, NodeMetrics
from kre_runner.node.failures import RateLimitedLog
from kre_runner.ops.health import DRAINING, INIT, READY, Health
from kre_runner.ops.logs import JsonFormatter, TrackingFilter
from kre_runner.ops.metrics import metrics_registry


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ settings

def test_new_settings_defaults_and_warn_alias():
    s = services_settings(KRT_LOG_LEVEL="warn")
    assert s.log_level == "WARNING"
    assert (s.log_format, s.http_port, s.health_reconnect_grace) == ("text", 8080, 60.0)
    assert services_settings(KRT_HTTP_PORT="0").http_port == 0
    assert s.nats_auth.variable is None and not s.nats_auth.uses_tls


def test_auth_problems_name_the_variable_and_never_show_a_secret(tmp_path):
    with pytest.raises(ConfigError) as err:
        services_settings(KRT_NATS_TOKEN="tok-SECRET", KRT_NATS_USER="bob", KRT_NATS_TLS_CERT=str(tmp_path / "no.crt"),
                          KRT_NATS_NKEY_SEED=str(tmp_path / "missing.nk"), KRT_HTTP_PORT="99999",
                          KRT_LOG_FORMAT="xml")
    text = str(err.value)
    assert "tok-SECRET" not in text
    assert "KRT_NATS_NKEY_SEED=" in text and "expected an existing file" in text
    assert "KRT_NATS_TLS_CERT=" in text
    assert "KRT_NATS_TOKEN and KRT_NATS_USER are both set" in text
    assert "KRT_NATS_PASSWORD is not set" in text
    assert "KRT_NATS_TLS_KEY is not set" in text
    assert "KRT_HTTP_PORT='99999' is invalid" in text and "KRT_LOG_FORMAT='xml' is invalid" in text


def test_redacted_settings_hide_every_secret(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    s = services_settings(
        KRT_NATS_USER="bob", KRT_NATS_PASSWORD="pw-SECRET", KRT_INFLUX_URI="http://influx:8086?token=q1-SECRET",
        KRT_INFLUX_TOKEN="influx-SECRET",
        KRT_MONGO_URI="mongodb://u:mongo-SECRET@db1:27017,db2:27017/x?tlsCertificateKeyFilePassword=q2-SECRET"
                      "&authSource=admin&authMechanismProperties=AWS_SESSION_TOKEN:q3-SECRET",
        KRT_NATS_SERVER="nats://a:url1-SECRET@h1:4222?token=q4-SECRET,nats://b:url2-SECRET@h2:4222,"
                        "tls://c:url3-SECRET@h3:4222,d:url4-SECRET@h4:4222",
        KRT_NATS_TLS_CA=str(ca))
    shown = redacted_settings(s)
    text = json.dumps(shown)
    assert "SECRET" not in text, text
    assert "SECRET" not in repr(s), repr(s)
    assert shown["nats_auth"]["password"] == "***" and shown["influx_token"] == "***"
    assert shown["nats_auth"]["tls_ca"] == str(ca) and shown["nats_auth"]["user"] == "bob"
    # Every URL of the list is there, each with its user and host kept.
    assert shown["nats_servers"] == ["nats://a:***@h1:4222?token=***", "nats://b:***@h2:4222",
                                     "tls://c:***@h3:4222", "d:***@h4:4222"]
    assert shown["mongo_uri"] == ("mongodb://u:***@db1:27017,db2:27017/x?tlsCertificateKeyFilePassword=***"
                                  "&authSource=admin&authMechanismProperties=***")
    assert shown["influx_uri"] == "http://influx:8086?token=***"
    token = services_settings(KRT_NATS_TOKEN="tok-SECRET")
    assert "tok-SECRET" not in json.dumps(redacted_settings(token)) and "tok-SECRET" not in repr(token)
    url_token = services_settings(KRT_NATS_SERVER="nats://tok-SECRET@h:4222")
    assert redacted_settings(url_token)["nats_servers"] == ["nats://***@h:4222"] and "tok-SECRET" not in repr(url_token)


def test_the_mongo_writers_settings_keep_their_secrets_out_of_repr():
    from kre_runner.services.mongo_writer import WriterSettings

    s = WriterSettings.from_env({"KRT_NATS_SERVER": "nats://a:n-SECRET@h:4222", "KRT_NATS_MONGO_WRITER": "w.demo",
                                 "KRT_MONGO_URI": "mongodb://u:m-SECRET@db:27017", "KRT_RUNTIME_ID": "demo"})
    assert s.mongo_uri.endswith("@db:27017") and "SECRET" not in repr(s), repr(s)


def test_info_settings_are_an_allow_list():
    """Every settings field is shown as is, shown redacted or hidden: a field added later is not shown by default."""
    from dataclasses import fields

    from kre_runner.config import NatsAuth, Settings, shown_fields

    s = services_settings()
    shown = redacted_settings(s)
    for cls, values in ((Settings, shown), (NatsAuth, shown["nats_auth"])):
        for item in fields(cls):
            assert (item.name in values) == (item.name in shown_fields(cls)), item.name
    assert set(shown) <= {item.name for item in fields(Settings)}


def test_an_invalid_server_list_hides_the_password_of_every_url():
    with pytest.raises(ConfigError) as err:
        services_settings(KRT_NATS_SERVER="nats://a:pw1-SECRET@h1:4222,nats://b:pw2-SECRET@h2:4222,"
                                          "nats://c:pw3-SECRET@h3:notaport?token=q-SECRET")
    text = str(err.value)
    assert "SECRET" not in text, text
    assert "nats://a:***@h1:4222,nats://b:***@h2:4222,nats://c:***@h3:notaport?token=***" in text


def test_http_host_defaults_to_every_interface_and_is_validated():
    assert services_settings().http_host == "0.0.0.0"
    assert services_settings(KRT_HTTP_HOST="127.0.0.1").http_host == "127.0.0.1"
    assert services_settings(KRT_HTTP_HOST="::1").http_host == "::1"
    with pytest.raises(ConfigError) as err:
        services_settings(KRT_HTTP_HOST="http://x:1")
    assert "KRT_HTTP_HOST='http://x:1' is invalid: expected an address to listen on" in str(err.value)


def test_influx_credentials_in_the_url_and_a_token_refuse_to_start():
    with pytest.raises(ConfigError) as err:
        services_settings(KRT_INFLUX_URI="http://user:pw-SECRET@influx:8086", KRT_INFLUX_TOKEN="tok-SECRET")
    text = str(err.value)
    assert "SECRET" not in text
    assert "KRT_INFLUX_URI carries a user and password and KRT_INFLUX_TOKEN is set" in text
    # Either alone is fine.
    assert services_settings(KRT_INFLUX_URI="http://user:pw@influx:8086").influx_uri == "http://user:pw@influx:8086"
    assert services_settings(KRT_INFLUX_URI="http://influx:8086", KRT_INFLUX_TOKEN="t").influx_token == "t"


# ------------------------------------------------------------------ metrics

def test_duration_histogram_buckets_are_cumulative():
    h = DurationHistogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0):
        h.observe(value)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.count == 4 and h.sum == pytest.approx(2.65)


def test_duration_histogram_gives_the_mean_since_the_last_look_for_the_pace():
    h = DurationHistogram((0.1, 1.0))
    assert h.take_mean() == 0.0  # nothing observed: an idle node keeps its pace
    h.observe(0.001)
    h.observe(0.003)
    h.cumulative()  # a scrape folds too: the mean still covers what it folded
    h.observe(0.005)
    assert h.take_mean() == pytest.approx(0.003)
    assert h.take_mean() == 0.0 and h.count == 3


def test_metrics_exposition_parses_with_labels_and_every_family():
    m = NodeMetrics()
    m.ok, m.error, m.invalid, m.filtered, m.retried = 5, 2, 1, 3, 4
    m.publish_failures, m.redeliveries = 6, 7
    m.interrupted, m.internal_errors, m.never_settled = 13, 14, 15
    m.dead_letter_failures, m.dead_letters_held = 16, lambda: 2
    m.observe_handler(0.002)
    m.observe_handler(3.0)
    m.observe_workflow(0.2)
    m.inflight = lambda: 9
    m.consumer_pending, m.consumer_ack_pending = 100, 10
    m.influx_dropped = lambda: 11
    m.db_errors = lambda: 12
    text = generate_latest(metrics_registry(m, node="n 1", workflow="wf", version="v1")).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = {"node": "n 1", "workflow": "wf", "version": "v1"}

    def value(family: str, sample: str | None = None, **extra: str) -> float:
        for s in families[family].samples:
            if s.name == (sample or family) and s.labels == {**labels, **extra}:
                return s.value
        raise AssertionError(f"{sample or family} {extra} not in {families[family].samples}")

    for outcome, expected in (("ok", 5), ("error", 2), ("invalid", 1), ("filtered", 3), ("retried", 4)):
        assert value("kre_messages", "kre_messages_total", outcome=outcome) == expected
    assert value("kre_handler_duration_seconds", "kre_handler_duration_seconds_count") == 2
    assert value("kre_handler_duration_seconds", "kre_handler_duration_seconds_bucket", le="0.0025") == 1
    assert value("kre_handler_duration_seconds", "kre_handler_duration_seconds_bucket", le="+Inf") == 2
    assert value("kre_workflow_duration_seconds", "kre_workflow_duration_seconds_sum") == pytest.approx(0.2)
    assert value("kre_inflight_messages") == 9
    assert value("kre_publish_failures", "kre_publish_failures_total") == 6
    assert value("kre_redeliveries", "kre_redeliveries_total") == 7
    assert value("kre_interrupted", "kre_interrupted_total") == 13
    assert value("kre_internal_errors", "kre_internal_errors_total") == 14
    assert value("kre_never_settled", "kre_never_settled_total") == 15
    assert value("kre_dead_letter_failures", "kre_dead_letter_failures_total") == 16
    assert value("kre_dead_letter_held_messages") == 2
    assert value("kre_consumer_pending_messages") == 100
    assert value("kre_consumer_ack_pending_messages") == 10
    assert value("kre_influx_points_dropped", "kre_influx_points_dropped_total") == 11
    assert value("kre_db_errors", "kre_db_errors_total") == 12
    assert "process_cpu_seconds" in families and "process_resident_memory_bytes" in families
    assert (m.processed, m.errors) == (11, 3)


def test_consumer_lag_is_absent_until_known():
    text = generate_latest(metrics_registry(NodeMetrics(), node="n", workflow="w", version="v")).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["kre_consumer_pending_messages"].samples == []  # unknown is not zero


# ------------------------------------------------------------------ health

def test_liveness_allows_the_reconnect_grace_and_readiness_follows_phase_and_connection():
    clock = _Clock()
    health = Health(reconnect_grace=60, clock=clock)
    assert health.readiness()[0] is False and health.liveness()[0] is True  # connecting
    health.connected()
    health.phase = INIT
    assert health.readiness() == (False, "init(ctx) is running")
    health.phase = READY
    assert health.readiness() == (True, "consuming")
    health.disconnected()
    clock.now += 59
    health.beat()  # the event loop runs meanwhile
    assert health.liveness()[0] is True and health.readiness()[0] is False
    clock.now += 2
    health.beat()
    alive, reason = health.liveness()
    assert not alive and "KRT_HEALTH_RECONNECT_GRACE=60" in reason
    health.connected()
    assert health.liveness()[0] and health.readiness()[0]
    health.phase = DRAINING
    assert health.readiness()[0] is False and health.liveness()[0] is True


def test_liveness_fails_once_the_event_loop_is_stuck_longer_than_the_stall_limit_but_not_during_init():
    clock = _Clock()
    health = Health(reconnect_grace=60, clock=clock, stall_limit=60)
    health.connected()
    health.phase = INIT
    clock.now += 600  # a sync init holds the loop while a model loads: alive all along
    assert health.liveness() == (True, "connected to NATS")
    health.phase = READY
    health.beat()
    clock.now += 60
    assert health.liveness()[0] is True
    clock.now += 1.5
    alive, reason = health.liveness()
    assert not alive and "the event loop has not run for 62s" in reason
    health.beat()
    assert health.liveness()[0] is True


def test_readiness_fails_while_the_node_cannot_dead_letter_and_liveness_does_not():
    health = Health(reconnect_grace=60, clock=_Clock())
    health.connected()
    health.phase = READY
    problem: list[str] = ["stream dl refuses dead letters: 1 input(s) held"]
    health.cannot_dead_letter = lambda: problem[0] if problem else None
    assert health.readiness() == (False, "cannot dead-letter: stream dl refuses dead letters: 1 input(s) held")
    assert health.liveness()[0] is True  # a restart would not help, and would spend the held input's deliveries
    problem.clear()
    assert health.readiness() == (True, "consuming")


# ------------------------------------------------------------------ logs

def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("kre_runner", logging.WARNING, __file__, 1, msg, (), None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_node_workflow_tracking_id_seq_and_traceback():
    formatter = JsonFormatter({"node": "greeter", "workflow": "wf"})
    line = json.loads(formatter.format(_record("handler failed", tracking_id="t-1", seq=8)))
    assert line["level"] == "WARN" and line["logger"] == "kre_runner" and line["message"] == "handler failed"
    assert (line["node"], line["workflow"], line["tracking_id"], line["seq"]) == ("greeter", "wf", "t-1", 8)
    assert line["time"].endswith("Z") and "T" in line["time"]
    try:
        {}["threshold"]
    except KeyError:
        import sys

        record = _record("boom")
        record.exc_info = sys.exc_info()
    line = json.loads(formatter.format(record))
    assert "Traceback" in line["exception"] and "KeyError: 'threshold'" in line["exception"]
    assert "tracking_id" not in json.loads(formatter.format(_record("start")))


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_handler_lines_get_the_tracking_id_of_the_current_message(fmt):
    from kre_runner.ops.logs import _TextFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter())
    logger = logging.getLogger(f"kre_runner.handler.test-{fmt}")
    logger.propagate = False
    logger.addHandler(handler)
    current: list[str | None] = ["abc-123"]
    logger.addFilter(TrackingFilter(lambda: current[0]))
    logger.warning("scoring")
    current[0] = None
    logger.warning("between messages")
    first, second = stream.getvalue().splitlines()
    if fmt == "json":
        assert json.loads(first)["tracking_id"] == "abc-123" and "tracking_id" not in json.loads(second)
    else:
        assert first.endswith("WARN scoring [tracking_id=abc-123]") and second.endswith("WARN between messages")


def test_rate_limited_tracebacks_count_the_rest_in_one_line(caplog):
    clock = _Clock()
    limiter = RateLimitedLog(logging.getLogger("kre_runner.limit"), "handler failures", per_minute=3, clock=clock)
    caplog.set_level(logging.INFO, "kre_runner.limit")
    try:
        raise KeyError("threshold")
    except KeyError as exc:
        error = exc
    logged = [limiter.log(logging.WARNING, "handler failed on input seq %d", i, exc_info=error) for i in range(10)]
    assert logged == [True] * 3 + [False] * 7
    assert all(r.exc_info for r in caplog.records) and len(caplog.records) == 3
    limiter.flush()
    assert len(caplog.records) == 3  # the minute is not over
    clock.now += 61
    limiter.flush()
    assert len(caplog.records) == 4
    assert caplog.records[-1].getMessage().startswith("7 more handler failures in the last 61 s")
    assert limiter.log(logging.WARNING, "again") is True and limiter.suppressed_total == 7


def test_the_demo_says_in_one_line_what_it_needs_when_nats_server_is_missing(monkeypatch, capsys):
    from kre_runner import cli
    from kre_runner.dev import embedded

    find = embedded._find_script
    monkeypatch.setattr(embedded, "_find_script", lambda name, hint: find(f"no-such-{name}", hint))
    assert cli.main(["demo", "--no-services", "--requests", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'kre-runner[demo]'" in err, err
