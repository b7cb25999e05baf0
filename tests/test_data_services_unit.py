"""ctx.db / ctx.measurement / ctx.prediction argument checks and encodings: no server needed."""

from __future__ import annotations

import gzip
import logging
import time
from datetime import datetime, timedelta, timezone

import pytest
from bson import ObjectId
from influxdb_client import Point
from kre_helpers import services_settings as settings

from kre_runner.config import ConfigError
from kre_runner.context import ServiceNotConfigured
from kre_runner.services import open_services
from kre_runner.services.influx import InfluxSink, Measurement, escape_field_str, escape_measurement, escape_tag
from kre_runner.services.mongo import (
    DatabaseError,
    DirectWriter,
    MongoConnection,
    MongoDB,
    MongoWriterClient,
    decode_writer_payload,
    encode_writer_request,
)
from kre_runner.services.mongo_writer import WriterSettings
from kre_runner.services.prediction import ERR_NEW_LABELS, Prediction


def unreachable_db() -> MongoDB:
    connection = MongoConnection("mongodb://127.0.0.1:1", "demo-data", 0.5)
    return MongoDB(DirectWriter(connection), connection)


# --- ctx.db -------------------------------------------------------------------------------------

@pytest.mark.parametrize("coll", ["", None, 3, b"c"])
async def test_db_save_rejects_bad_collection(coll: object) -> None:
    with pytest.raises(ValueError, match="coll must be a non-empty string"):
        await unreachable_db().save(coll, {"a": 1})  # type: ignore[arg-type]


@pytest.mark.parametrize("doc", [None, [("a", 1)], "a=1", 3])
async def test_db_save_rejects_non_dict_doc(doc: object) -> None:
    with pytest.raises(TypeError, match="doc must be a dict"):
        await unreachable_db().save("c", doc)  # type: ignore[arg-type]


@pytest.mark.parametrize("query", [{}, None, [("a", 1)], "a"])
async def test_db_find_rejects_empty_or_non_dict_query(query: object) -> None:
    with pytest.raises(ValueError, match="query must be a non-empty dict"):
        await unreachable_db().find("c", query)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"sort": [("a", 2)]}, ValueError), ({"sort": 3}, TypeError), ({"sort": [(1, 1)]}, ValueError),
    ({"limit": -1}, ValueError), ({"limit": 1.5}, ValueError), ({"projection": "a"}, TypeError),
])
async def test_db_find_rejects_bad_options(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        await unreachable_db().find("c", {"a": 1}, **kwargs)  # type: ignore[arg-type]


async def test_db_find_without_uri_in_writer_mode_says_what_to_set() -> None:
    db = MongoDB(MongoWriterClient(None, "writer", 1.0), None)  # type: ignore[arg-type]
    with pytest.raises(ServiceNotConfigured, match="KRT_MONGO_URI"):
        await db.find("c", {"a": 1})


def test_writer_request_is_plain_json_when_small_and_gzip_when_large() -> None:
    small = encode_writer_request("c", {"a": 1, "s": "é"})
    assert small == b'{"coll":"c","doc":{"a":1,"s":"\\u00e9"}}'
    big_doc = {"blob": "x" * 5000}
    big = encode_writer_request("c", big_doc, gzip_threshold=1000)
    assert big[:2] == b"\x1f\x8b" and len(big) < 1000
    assert gzip.decompress(big).startswith(b'{"coll":"c"')
    assert decode_writer_payload(big) == {"coll": "c", "doc": big_doc}


def test_writer_request_carries_bson_values_as_extended_json() -> None:
    when = datetime(2024, 5, 1, 12, 0, 0, 123000)
    oid = ObjectId()
    decoded = decode_writer_payload(encode_writer_request("c", {"when": when, "ref": oid}))
    assert decoded["doc"]["ref"] == oid
    assert decoded["doc"]["when"].replace(tzinfo=None) == when


def test_writer_request_rejects_unserializable_doc() -> None:
    with pytest.raises(TypeError, match="cannot be sent to the mongo-writer"):
        encode_writer_request("c", {"x": object()})


# --- ctx.measurement ----------------------------------------------------------------------------

def measurement() -> tuple[Measurement, InfluxSink]:
    sink = InfluxSink(url="http://127.0.0.1:1", token="t", org="", bucket="b", buffer=10)
    return Measurement(sink, version="v1", workflow="wf", node="node a"), sink


def test_measurement_line_has_system_tags_that_win_over_user_tags() -> None:
    m, sink = measurement()
    m.save("cpu", {"value": 1.5, "n": 3, "ok": True, "label": 'a "b"'}, tags={"host": "h 1", "node": "fake"},
           time=1_700_000_000, precision=m.PRECISION_S)
    assert list(sink._buffer) == [
        'cpu,host=h\\ 1,node=node\\ a,version=v1,workflow=wf label="a \\"b\\"",n=3i,ok=true,value=1.5 '
        "1700000000000000000"
    ]


@pytest.mark.parametrize(("precision", "value", "ns"), [
    ("s", 2, 2_000_000_000), ("ms", 2, 2_000_000), ("us", 2, 2_000), ("ns", 2, 2), ("ms", 1.5, 1_500_000),
])
def test_measurement_times_are_converted_to_ns(precision: str, value: float, ns: int) -> None:
    m, _ = measurement()
    assert m.line("m", {"f": 1}, time=value, precision=precision).endswith(f" {ns}")


def test_measurement_datetime_naive_is_utc_and_default_is_now() -> None:
    m, _ = measurement()
    when = datetime(2024, 1, 2, 3, 4, 5, 6)
    expected = int(when.replace(tzinfo=timezone.utc).timestamp()) * 10**9 + 6000
    assert m.line("m", {"f": 1}, time=when).endswith(f" {expected}")
    before = time.time_ns()
    stamp = int(m.line("m", {"f": 1}).rsplit(" ", 1)[1])
    assert before <= stamp <= time.time_ns()


@pytest.mark.parametrize(("args", "kwargs", "error"), [
    (("", {"f": 1}), {}, ValueError),
    ((None, {"f": 1}), {}, ValueError),
    (("m", {}), {}, ValueError),
    (("m", None), {}, ValueError),
    (("m", {"f": float("nan")}), {}, ValueError),
    (("m", {"f": None}), {}, ValueError),
    (("m", {"f": [1]}), {}, ValueError),
    (("m", {"f": 1}), {"tags": ["a"]}, TypeError),
    (("m", {"f": 1}), {"tags": []}, TypeError),  # empty, but still not a dict
    (("m", {"f": 1}), {"tags": ""}, TypeError),
    (("m", {"f": 1}), {"precision": "h"}, ValueError),
    (("m", {"f": 1}), {"time": True}, TypeError),
    (("m", {"f": 1}), {"time": object()}, TypeError),
])
def test_measurement_rejects_bad_arguments(args: tuple[object, ...], kwargs: dict[str, object],
                                           error: type[Exception]) -> None:
    m, sink = measurement()
    with pytest.raises(error):
        m.save(*args, **kwargs)  # type: ignore[arg-type]
    assert sink.pending == 0


def test_escaping_matches_point() -> None:
    nasty = 'a b,c=d"e\\f'
    line = Point(nasty).tag(nasty, nasty).field("s", nasty).time(1).to_line_protocol()
    assert line == (f"{escape_measurement(nasty)},{escape_tag(nasty)}={escape_tag(nasty)} "
                    f's="{escape_field_str(nasty)}" 1')
    trailing = Point("m").tag("t", "x\\").field("f", 1).time(1).to_line_protocol()
    assert trailing == f"m,t={escape_tag('x' + chr(92))} f=1i 1"


def test_sink_drops_oldest_and_counts_when_full_without_raising() -> None:
    sink = InfluxSink(url="http://127.0.0.1:1", token="", org="", bucket="b", buffer=3, batch_size=2)
    for i in range(5):
        sink.add(f"m f={i}")
    assert list(sink._buffer) == ["m f=2", "m f=3", "m f=4"]
    assert sink.dropped == 2 and sink.pending == 3


# --- ctx.prediction -----------------------------------------------------------------------------

async def test_prediction_document_shape_and_date_format() -> None:
    saved: list[tuple[str, dict[str, object]]] = []

    async def save(coll: str, doc: dict[str, object]) -> None:
        saved.append((coll, doc))

    prediction = Prediction(save, version_id="v1-id", version_name="v1")
    await prediction.save("cat", "dog", extra={"score": 0.5}, utcdate=datetime(2022, 6, 1, 12, 0, 0, 7))
    assert saved == [("classificationMetrics", {
        "date": "2022-06-01T12:00:00.000007Z", "error": "", "predictedValue": "cat", "trueValue": "dog",
        "extra": {"score": 0.5}, "versionId": "v1-id", "versionName": "v1",
    })]
    # The error constants are the strings the original stored, and the ones a handler reaches via ctx work.
    await prediction.save(error=prediction.ERR_MISSING_VALUES, utcdate=datetime(2022, 6, 1))
    await prediction.save(error=ERR_NEW_LABELS, utcdate=datetime(2022, 6, 1))
    assert [doc["error"] for _, doc in saved[1:]] == ["missing_values", "new_labels"]


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"predicted_value": "", "true_value": "x"}, ValueError, "must be non-empty strings"),
    ({"predicted_value": "x", "true_value": ""}, ValueError, "must be non-empty strings"),
    ({"predicted_value": "x", "true_value": "y", "error": "boom"}, ValueError, "error must be ''"),
    ({"predicted_value": 1, "true_value": "y"}, TypeError, "must be strings"),
    ({"predicted_value": "x", "true_value": "y", "extra": [1]}, TypeError, "extra must be a dict or None, got list"),
    ({"predicted_value": "x", "true_value": "y", "utcdate": "2022-01-01"}, TypeError,
     "utcdate must be a datetime, got str"),
    ({"predicted_value": "x", "true_value": "y", "utcdate": datetime(2022, 1, 1, tzinfo=timezone(timedelta(hours=2)))},
     ValueError, "utcdate must be in UTC, got offset 2:00:00"),
])
def test_prediction_rejects_bad_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    prediction = Prediction(None, version_id="i", version_name="n")  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        prediction.document(**kwargs)  # type: ignore[arg-type]


def test_prediction_accepts_errors_without_values_and_utc_aware_dates() -> None:
    prediction = Prediction(None, version_id="i", version_name="n")  # type: ignore[arg-type]
    doc = prediction.document(error=ERR_NEW_LABELS, utcdate=datetime(2022, 1, 1, 1, tzinfo=timezone.utc))
    assert doc["date"] == "2022-01-01T01:00:00.000000Z" and doc["error"] == "new_labels"
    assert doc["extra"] is None


# --- open_services / mongo-writer settings ------------------------------------------------------

async def test_open_services_enables_only_what_is_configured(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.services")
    with caplog.at_level(logging.INFO, logger="test.services"):
        services = await open_services(settings(), None, logger)
    assert (services.db, services.measurement, services.prediction, services.influx) == (None, None, None, None)
    assert "ctx.db: disabled" in caplog.text and "ctx.measurement: disabled" in caplog.text
    await services.close(1)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test.services"):
        services = await open_services(
            settings(KRT_MONGO_URI="mongodb://user:secret@127.0.0.1:1", KRT_INFLUX_URI="http://127.0.0.1:1"),
            None, logger)
    try:
        assert services.db is not None and services.prediction is not None
        assert services.measurement is not None and services.influx is not None
        assert "secret" not in caplog.text and "user:***@127.0.0.1:1" in caplog.text
        assert "'demo-data'" in caplog.text
    finally:
        await services.close(0.1)


def test_writer_settings_name_every_missing_variable() -> None:
    with pytest.raises(ConfigError) as info:
        WriterSettings.from_env({"KRT_MONGO_URI": "http://x"})
    text = str(info.value)
    for name in ("KRT_NATS_SERVER", "KRT_NATS_MONGO_WRITER", "KRT_MONGO_URI", "KRT_MONGO_DB"):
        assert name in text
    ok = WriterSettings.from_env({"KRT_NATS_SERVER": "nats://h:4222", "KRT_NATS_MONGO_WRITER": "w.demo",
                                  "KRT_MONGO_URI": "mongodb://h", "KRT_RUNTIME_ID": "demo"})
    assert ok.mongo_db == "demo-data" and ok.db_timeout == 5.0


async def test_db_errors_never_show_the_password() -> None:
    connection = MongoConnection("mongodb://user:s3cret@127.0.0.1:1/?authSource=admin", "demo-data", 0.3)
    db = MongoDB(DirectWriter(connection), connection)
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseError) as info:
            await db.save("c", {"a": 1})
        assert "s3cret" not in str(info.value)
        with pytest.raises(DatabaseError) as info:
            await db.find("c", {"a": 1})
        assert "s3cret" not in str(info.value)
        assert time.monotonic() - started < 2.5
    finally:
        db.close()


# ---------------------------------------------------------------- line protocol vs influxdb-client's Point


def _point_oracle(measurement, fields, tags, timestamp_ns):
    """What influxdb-client's Point writes for the same point (system tags win over user tags)."""
    point = Point(measurement)
    for key, value in {**(tags or {}), "version": "v1", "workflow": "wf x", "node": "n,1"}.items():
        point.tag(key, value)
    for key, value in fields.items():
        point.field(key, value)
    point.time(timestamp_ns, "ns")
    return point.to_line_protocol()


LINE_CASES = [
    ("m", {"v": 1.0}, None),
    ("cpu load", {"a": 1, "b": -2.5, "c": True, "d": False, "e": 'say "hi" \\ there'}, {"host": "a b"}),
    ("m,x", {"big": 1e20, "small": 1.5e-7, "neg0": -0.0, "nan": float("nan"), "none": None, "x": 3}, {"t": "x=y"}),
    ("m", {"f key": 2.0, "g,=": "v"}, {"trail": "ends\\", "empty": "", "node": "user-node-is-overridden"}),
    ("#m", {"v": 10**18}, {"z": "last", "a": "first"}),
]


@pytest.mark.parametrize(("measurement", "fields", "tags"), LINE_CASES)
def test_measurement_lines_match_influxdb_clients_point(measurement, fields, tags):
    import warnings

    measurement_api = Measurement(InfluxSink(url="http://x", token="", org="", bucket="b"),
                                  version="v1", workflow="wf x", node="n,1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # Point warns about a leading '#'
        expected = _point_oracle(measurement, fields, tags, 1_700_000_000_123_456_789)
    assert measurement_api.line(measurement, fields, tags, time=1_700_000_000_123_456_789) == expected


def test_measurement_lines_match_point_on_random_points():
    import random
    import string

    rng = random.Random(7)
    alphabet = string.ascii_letters + ' ,="\\=#\t'
    measurement_api = Measurement(InfluxSink(url="http://x", token="", org="", bucket="b"),
                                  version="v1", workflow="wf x", node="n,1")

    def text(n):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, n)))

    for _ in range(500):
        fields = {text(6): rng.choice([rng.random() * 1e6, rng.randint(-10**12, 10**12), rng.random() < 0.5, text(8)])
                  for _ in range(rng.randint(1, 4))}
        tags = {text(5): text(5) for _ in range(rng.randint(0, 3))}
        name = text(8).lstrip("#") or "m"
        assert measurement_api.line(name, fields, tags, time=1_000) == _point_oracle(name, fields, tags, 1_000)
