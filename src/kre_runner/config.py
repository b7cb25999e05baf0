"""Settings: one typed, frozen object built once from the ``KRT_*`` environment.

The names are those of the original KRE runner so kre-runner can replace it in an existing
workflow. Every problem is reported with the variable's name, what was expected and an example,
and all problems are reported at once so a user fixes a manifest in one round trip.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

__all__ = ["VARIABLES", "ConfigError", "Settings", "consumer_name", "redact_url"]

T = TypeVar("T")

# (name, required, description, example) — the single source for --help and the README.
VARIABLES: tuple[tuple[str, bool, str, str], ...] = (
    ("KRT_WORKFLOW_NAME", True, "workflow name (measurement tag)", "greeter"),
    ("KRT_RUNTIME_ID", True, "runtime id (Influx bucket, Mongo database prefix)", "demo"),
    ("KRT_VERSION_ID", True, "version id (stored with predictions)", "v1-id"),
    ("KRT_VERSION", True, "version name (consumer name, measurement tag)", "v1"),
    ("KRT_NODE_NAME", True, "this node's name (tracking, consumer name)", "greeter"),
    ("KRT_NATS_SERVER", True, "NATS server URL(s), comma separated", "nats://localhost:4222"),
    ("KRT_NATS_STREAM", True, "JetStream stream holding the workflow's subjects", "demo-v1-greeter"),
    ("KRT_NATS_INPUT", True, "subject this node consumes", "demo-v1-greeter.greeter"),
    ("KRT_NATS_OUTPUT", True, "subject this node publishes its results to", "demo-v1-greeter.next"),
    ("KRT_HANDLER_PATH", True, "handler file relative to KRT_BASE_PATH, or path/to/file.py:func",
     "src/handler.py"),
    ("KRT_BASE_PATH", False, "base directory for the handler and ctx.path() (default: cwd)", "/krt-files"),
    ("KRT_IS_LAST_NODE", False, "true on the workflow's last node (default false)", "false"),
    ("KRT_NATS_ENTRYPOINT_SUBJECT", False, "entrypoint subject for early replies and errors",
     "demo-v1-greeter.entrypoint"),
    ("KRT_NATS_MONGO_WRITER", False, "mongo-writer subject; when set ctx.db.save goes through it",
     "mongo_writer_data.demo"),
    ("KRT_MONGO_URI", False, "MongoDB URI for ctx.db (direct writes and all reads)",
     "mongodb://user:pass@localhost:27017"),
    ("KRT_MONGO_DB", False, "MongoDB database (default {KRT_RUNTIME_ID}-data, as the original writer)",
     "demo-data"),
    ("KRT_INFLUX_URI", False, "InfluxDB URL for ctx.measurement and the node's elapsed-time points",
     "http://localhost:8086"),
    ("KRT_INFLUX_TOKEN", False, "InfluxDB token (2.x/3.x) or user:password (1.8)", "my-token"),
    ("KRT_INFLUX_ORG", False, "InfluxDB organization (default: empty, fine for 1.8/3.x)", "kre"),
    ("KRT_INFLUX_BUCKET", False, "InfluxDB bucket (default KRT_RUNTIME_ID)", "demo"),
    ("KRT_INFLUX_BATCH_SIZE", False, "points per write (default 1000)", "1000"),
    ("KRT_INFLUX_FLUSH_INTERVAL", False, "seconds between writes of a partial batch (default 1)", "1"),
    ("KRT_INFLUX_BUFFER", False, "points kept while InfluxDB is slow or down; oldest dropped (default 100000)",
     "100000"),
    ("KRT_ELAPSED_METRICS", False, "write node_elapsed_time/workflow_elapsed_time points (default true)",
     "true"),
    ("KRT_MAX_INFLIGHT", False, "handlers running at once in this replica (default 256); as many more "
     "messages may wait for their output's PubAck, and a quarter as many more wait ready while handlers "
     "wait on I/O", "256"),
    ("KRT_HANDLER_THREADS", False, "0: sync handlers run on the event loop; N: in a pool of N threads "
     "(default 0)", "4"),
    ("KRT_BATCH_SIZE", False, "batch handlers: most inputs per handler_batch call (default 32)", "32"),
    ("KRT_BATCH_WAIT_MS", False, "batch handlers: milliseconds a batch waits for more inputs after its first "
     "(default 5; 0: no wait)", "5"),
    ("KRT_ACK_WAIT", False, "seconds before an unacked input is redelivered (default 30); long handlers "
     "are kept alive with in-progress acks", "30"),
    ("KRT_PUBLISH_TIMEOUT", False, "seconds to wait for an output's PubAck before retrying (default 5)", "5"),
    ("KRT_SHUTDOWN_GRACE", False, "seconds in-flight messages get to finish on SIGTERM (default 25)", "25"),
    ("KRT_DELIVER_POLICY", False, "where a new consumer starts: new (as the original) or all (default new)",
     "new"),
    ("KRT_DB_TIMEOUT", False, "seconds a ctx.db / ctx.prediction call may take (default 5)", "5"),
    ("KRT_LOG_LEVEL", False, "DEBUG, INFO, WARNING or ERROR (default INFO)", "INFO"),
)
_EXAMPLES = {name: example for name, _, _, example in VARIABLES}
_SUBJECT_RE = re.compile(r"^[^\s*>.]+(\.[^\s*>.]+)*$")
_NAME_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_-]")


class ConfigError(ValueError):
    """The environment does not describe a runnable node; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Settings:
    workflow_name: str
    runtime_id: str
    version_id: str
    version: str
    node_name: str
    nats_servers: tuple[str, ...]
    stream: str
    input_subject: str
    output_subject: str
    handler_path: str
    base_path: Path = Path(".")
    is_last_node: bool = False
    entrypoint_subject: str | None = None
    mongo_writer_subject: str | None = None
    mongo_uri: str | None = None
    mongo_db: str = ""
    influx_uri: str | None = None
    influx_token: str = ""
    influx_org: str = ""
    influx_bucket: str = ""
    influx_batch_size: int = 1000
    influx_flush_interval: float = 1.0
    influx_buffer: int = 100_000
    elapsed_metrics: bool = True
    max_inflight: int = 256
    handler_threads: int = 0
    batch_size: int = 32
    batch_wait: float = 0.005  # seconds (KRT_BATCH_WAIT_MS / 1000)
    ack_wait: float = 30.0
    publish_timeout: float = 5.0
    shutdown_grace: float = 25.0
    deliver_policy: str = "new"
    db_timeout: float = 5.0
    log_level: str = "INFO"

    @property
    def consumer_name(self) -> str:
        return consumer_name(self.version, self.node_name)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from ``env`` (usually ``os.environ``) or raise :class:`ConfigError`."""
        reader = _Reader(env)
        runtime_id = reader.required("KRT_RUNTIME_ID")
        settings = cls(
            workflow_name=reader.required("KRT_WORKFLOW_NAME"),
            runtime_id=runtime_id,
            version_id=reader.required("KRT_VERSION_ID"),
            version=reader.required("KRT_VERSION"),
            node_name=reader.required("KRT_NODE_NAME"),
            nats_servers=reader.required("KRT_NATS_SERVER", _parse_servers, "a nats:// URL"),
            stream=reader.required("KRT_NATS_STREAM", _parse_stream, "a stream name without . * > or spaces"),
            input_subject=reader.required("KRT_NATS_INPUT", _parse_subject, "a subject without wildcards"),
            output_subject=reader.required("KRT_NATS_OUTPUT", _parse_subject, "a subject without wildcards"),
            handler_path=reader.required("KRT_HANDLER_PATH"),
            base_path=Path(reader.optional("KRT_BASE_PATH", ".")),
            is_last_node=reader.optional("KRT_IS_LAST_NODE", False, _parse_bool, "true or false"),
            entrypoint_subject=reader.optional("KRT_NATS_ENTRYPOINT_SUBJECT", None, _parse_subject,
                                               "a subject without wildcards"),
            mongo_writer_subject=reader.optional("KRT_NATS_MONGO_WRITER", None, _parse_subject,
                                                 "a subject without wildcards"),
            mongo_uri=reader.optional("KRT_MONGO_URI", None, _parse_mongo_uri, "a mongodb:// URI"),
            mongo_db=reader.optional("KRT_MONGO_DB", f"{runtime_id}-data"),
            influx_uri=reader.optional("KRT_INFLUX_URI", None, _parse_http_url, "an http(s):// URL"),
            influx_token=reader.optional("KRT_INFLUX_TOKEN", ""),
            influx_org=reader.optional("KRT_INFLUX_ORG", ""),
            influx_bucket=reader.optional("KRT_INFLUX_BUCKET", runtime_id),
            influx_batch_size=reader.optional("KRT_INFLUX_BATCH_SIZE", 1000, _positive_int, "an integer ≥ 1"),
            influx_flush_interval=reader.optional("KRT_INFLUX_FLUSH_INTERVAL", 1.0, _positive_float,
                                                  "seconds > 0"),
            influx_buffer=reader.optional("KRT_INFLUX_BUFFER", 100_000, _positive_int, "an integer ≥ 1"),
            elapsed_metrics=reader.optional("KRT_ELAPSED_METRICS", True, _parse_bool, "true or false"),
            max_inflight=reader.optional("KRT_MAX_INFLIGHT", 256, _positive_int, "an integer ≥ 1"),
            handler_threads=reader.optional("KRT_HANDLER_THREADS", 0, _non_negative_int, "an integer ≥ 0"),
            batch_size=reader.optional("KRT_BATCH_SIZE", 32, _positive_int, "an integer ≥ 1"),
            batch_wait=reader.optional("KRT_BATCH_WAIT_MS", 0.005, _milliseconds, "milliseconds ≥ 0"),
            ack_wait=reader.optional("KRT_ACK_WAIT", 30.0, _positive_float, "seconds > 0"),
            publish_timeout=reader.optional("KRT_PUBLISH_TIMEOUT", 5.0, _positive_float, "seconds > 0"),
            shutdown_grace=reader.optional("KRT_SHUTDOWN_GRACE", 25.0, _positive_float, "seconds > 0"),
            deliver_policy=reader.optional("KRT_DELIVER_POLICY", "new", _choice("new", "all"), "new or all"),
            db_timeout=reader.optional("KRT_DB_TIMEOUT", 5.0, _positive_float, "seconds > 0"),
            log_level=reader.optional("KRT_LOG_LEVEL", "INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR"),
                                      "DEBUG, INFO, WARNING or ERROR"),
        )
        if reader.problems:
            raise ConfigError(reader.problems)
        return settings


def consumer_name(version: str, node: str) -> str:
    """The original's durable name ``{version}-{node}``, with characters JetStream rejects replaced."""
    return _NAME_UNSAFE_RE.sub("_", f"{version}-{node}")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe to log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    # user:password keeps the user; a lone userinfo is a token and is hidden whole.
    userinfo = f"{parts.username}:***" if parts.password is not None else "***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


class _Reader:
    """Reads variables and collects problems instead of stopping at the first one."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def required(self, name: str, parse: Callable[[str], T] | None = None, expected: str = "a value") -> T:
        raw = self.env.get(name, "").strip()
        if not raw:
            self.problems.append(f"{name} is not set: expected {expected}, e.g. {name}={_EXAMPLES[name]}")
            return None  # type: ignore[return-value]  # never used: from_env raises
        return self._parse(name, raw, parse, expected)

    def optional(self, name: str, default: T, parse: Callable[[str], T] | None = None,
                 expected: str = "a value") -> T:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        return self._parse(name, raw, parse, expected)

    def _parse(self, name: str, raw: str, parse: Callable[[str], T] | None, expected: str) -> T:
        if parse is None:
            return raw  # type: ignore[return-value]
        try:
            return parse(raw)
        except ValueError:
            shown = redact_url(raw) if "://" in raw else raw
            self.problems.append(f"{name}={shown!r} is invalid: expected {expected}, e.g. {name}={_EXAMPLES[name]}")
            return None  # type: ignore[return-value]


def _parse_bool(raw: str) -> bool:
    value = raw.lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(raw)


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(raw)
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError(raw)
    return value


def _milliseconds(raw: str) -> float:
    """Milliseconds ≥ 0, as seconds."""
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError(raw)
    return value / 1000


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        for choice in choices:
            if raw.lower() == choice.lower():
                return choice
        raise ValueError(raw)

    return parse


def _parse_subject(raw: str) -> str:
    if not _SUBJECT_RE.match(raw):
        raise ValueError(raw)
    return raw


def _parse_stream(raw: str) -> str:
    if any(c in raw for c in ".*> \t/\\"):
        raise ValueError(raw)
    return raw


def _parse_servers(raw: str) -> tuple[str, ...]:
    servers = tuple(s.strip() for s in raw.split(",") if s.strip())
    for server in servers:
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
            raise ValueError(raw)
        parts.port  # noqa: B018  # raises ValueError on a bad port
    if not servers:
        raise ValueError(raw)
    return servers


def _parse_mongo_uri(raw: str) -> str:
    if not raw.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError(raw)
    return raw


def _parse_http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(raw)
    return raw.rstrip("/")
