"""Settings: one typed, frozen object built once from the ``KRT_*`` environment.

The names are those of the original KRE runner so kre-runner can replace it in an existing
workflow. Every problem is reported with the variable's name, what was expected and an example,
and all problems are reported at once so a user fixes a manifest in one round trip.

Over 400 lines, deliberately: every variable's name, type, default, validation and help text sit
in one table here, so none can drift from the others (README's table is checked against it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .errors import ConfigError

__all__ = ["SECRET_VARIABLES", "VARIABLES", "ConfigError", "NatsAuth", "Settings", "consumer_name", "redact_url",
           "redacted_settings", "secret_field", "shown_fields", "url_field"]

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
    ("KRT_NATS_INPUT", True, "KRE v2: subject this node consumes (a KRE 3.x node sets KRT_NATS_INPUTS instead)",
     "demo-v1-greeter.greeter"),
    ("KRT_NATS_INPUTS", False, "KRE 3.x: subjects this node consumes, comma separated; set instead of "
     "KRT_NATS_INPUT, it makes the node speak KRE 3.x", "demo-v1-greeter.entrypoint,demo-v1-greeter.nodeA"),
    ("KRT_NATS_OUTPUT", True, "subject this node publishes its results to", "demo-v1-greeter.next"),
    ("KRT_HANDLER_PATH", True, "handler file relative to KRT_BASE_PATH, or path/to/file.py:func",
     "src/handler.py"),
    ("KRT_BASE_PATH", False, "base directory for the handler and ctx.path() (default: cwd)", "/krt-files"),
    ("KRT_IS_LAST_NODE", False, "true on the workflow's last node (default false)", "false"),
    ("KRT_NATS_ENTRYPOINT_SUBJECT", False, "entrypoint subject for early replies and errors",
     "demo-v1-greeter.entrypoint"),
    ("KRT_NATS_MONGO_WRITER", False, "mongo-writer subject; when set ctx.db.save goes through it",
     "mongo_writer_data.demo"),
    ("KRT_NATS_KEY_VALUE_STORE_PROJECT", False, "key-value bucket of ctx.configuration's project scope",
     "key-store_demo_v1"),
    ("KRT_NATS_KEY_VALUE_STORE_WORKFLOW", False, "key-value bucket of ctx.configuration's workflow scope",
     "key-store_demo_v1_greeter"),
    ("KRT_NATS_KEY_VALUE_STORE_NODE", False, "key-value bucket of ctx.configuration's node scope",
     "key-store_demo_v1_greeter_greeter"),
    ("KRT_NATS_OBJECT_STORE", False, "object store bucket of ctx.object_store", "object-store_demo_v1_greeter"),
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
    ("KRT_MAX_DELIVER", False, "handler attempts per input (default 5); then it is dead-lettered", "5"),
    ("KRT_DEAD_LETTER_STREAM", False, "stream keeping dead-lettered inputs (default {KRT_NATS_STREAM}-dead-letter; "
     "created if missing)", "demo-v1-greeter-dead-letter"),
    ("KRT_MAX_INFLIGHT_BYTES", False, "bytes of input held in flight per replica, and asked for per pull request "
     "(default 16777216); keeps large messages far below the server's slow-consumer limit", "16777216"),
    ("KRT_MAX_INFLATED_BYTES", False, "the most a gzip-compressed input may inflate to; a larger one gets an error "
     "envelope and is never inflated whole (default 4 × the server's max_payload)", "4194304"),
    ("KRT_MIGRATE_PUSH_CONSUMER", False, "take over the original runner's push consumer without a gap (default "
     "true); false refuses to start instead", "true"),
    ("KRT_DELIVER_POLICY", False, "where a new consumer starts: new (as the original) or all (default new)",
     "new"),
    ("KRT_NATS_MAX_ACK_PENDING", False, "KRE 3.x: max_ack_pending of the node's consumer (default -1: unbounded; "
     "each replica bounds itself with KRT_MAX_INFLIGHT)", "-1"),
    ("KRT_JS_REQUEST_TIMEOUT", False, "milliseconds a JetStream API request may take at start (default 30000 in "
     "KRE 3.x, 5000 in v2)", "30000"),
    ("KRT_DB_TIMEOUT", False, "seconds a ctx.db / ctx.prediction call may take (default 5)", "5"),
    ("KRT_LOG_LEVEL", False, "DEBUG, INFO, WARNING (or WARN) or ERROR (default INFO)", "INFO"),
    ("KRT_LOG_FORMAT", False, "text (the original runner's lines) or json (one object a line) (default text)",
     "json"),
    ("KRT_HTTP_PORT", False, "port of /healthz, /readyz, /metrics and /info (default 8080; 0 turns it off)",
     "8080"),
    ("KRT_HTTP_HOST", False, "address the HTTP endpoint listens on (default 0.0.0.0: every interface, as a pod "
     "needs; kre-runner up uses 127.0.0.1)", "127.0.0.1"),
    ("KRT_HEALTH_RECONNECT_GRACE", False, "seconds /healthz stays 200 while NATS is unreachable (default 60)",
     "60"),
    ("KRT_NATS_CREDS", False, "NATS .creds file (user JWT and nkey seed)", "/etc/nats/node.creds"),
    ("KRT_NATS_NKEY_SEED", False, "file holding the user's nkey seed (SU...)", "/etc/nats/node.nk"),
    ("KRT_NATS_TOKEN", False, "NATS authentication token", "s3cr3t-token"),
    ("KRT_NATS_USER", False, "NATS user name (with KRT_NATS_PASSWORD)", "node"),
    ("KRT_NATS_PASSWORD", False, "NATS password (with KRT_NATS_USER)", "s3cr3t"),
    ("KRT_NATS_TLS_CA", False, "CA certificate (PEM) that signed the NATS server's certificate",
     "/etc/nats/tls/ca.crt"),
    ("KRT_NATS_TLS_CERT", False, "client certificate (PEM) for mutual TLS (with KRT_NATS_TLS_KEY)",
     "/etc/nats/tls/tls.crt"),
    ("KRT_NATS_TLS_KEY", False, "client private key (PEM) for mutual TLS (with KRT_NATS_TLS_CERT)",
     "/etc/nats/tls/tls.key"),
)
# Values never shown in a log line, an error or /info.
SECRET_VARIABLES = frozenset({"KRT_NATS_TOKEN", "KRT_NATS_PASSWORD", "KRT_INFLUX_TOKEN"})
_EXAMPLES = {name: example for name, _, _, example in VARIABLES}
# Query parameters whose value is a secret (case-insensitive): these names, or names containing a part below.
# authMechanismProperties may carry AWS_SESSION_TOKEN:... in a MongoDB URI.
_SECRET_PARAMS = frozenset({"password", "passwd", "pwd", "token", "secret", "key", "credentials", "apikey", "api_key",
                            "authmechanismproperties"})
_SECRET_PARAM_PARTS = ("password", "token", "secret")
_SCHEME_START_RE = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")  # a comma starting the next URL of a list
_HOST_RE = re.compile(r"^[A-Za-z0-9.:%-]+$")
_SUBJECT_RE = re.compile(r"^[^\s*>.]+(\.[^\s*>.]+)*$")
_NAME_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_-]")
_BUCKET_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_BUCKET = "a bucket name of letters, digits, - and _"


# How /info, errors and repr() may show a settings field (its metadata["show"]). A field marked SECRET or URL
# is left out of repr(); /info shows it redacted. Fields neither marked nor on _SHOWN are not in /info at all.
_SHOW = "show"
_SECRET = "secret"  # shown as *** (or "" when unset)
_URL = "url"  # a URL or tuple of URLs: shown with userinfo and secret query parameters as ***


def secret_field(default: Any) -> Any:
    """A settings field holding a secret: never in repr(), ``***`` in /info."""
    return field(default=default, repr=False, metadata={_SHOW: _SECRET})


def url_field(default: Any = MISSING) -> Any:
    """A settings field holding a URL (or a tuple of them) that may carry credentials: never in repr(),
    redacted in /info."""
    return field(default=default, repr=False, metadata={_SHOW: _URL})


@dataclass(frozen=True)
class NatsAuth:
    """How the node proves who it is to NATS, and how it checks the server (TLS). Empty: URL only."""

    creds: Path | None = None
    nkey_seed: Path | None = None
    token: str = secret_field("")
    user: str = ""
    password: str = secret_field("")
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def variable(self) -> str | None:
        """The variable naming the credentials in use (for errors), None when the URL carries them."""
        if self.creds:
            return "KRT_NATS_CREDS"
        if self.nkey_seed:
            return "KRT_NATS_NKEY_SEED"
        if self.token:
            return "KRT_NATS_TOKEN"
        if self.user:
            return "KRT_NATS_USER/KRT_NATS_PASSWORD"
        return None

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None


@dataclass(frozen=True)
class Settings:
    workflow_name: str
    runtime_id: str
    version_id: str
    version: str
    node_name: str
    nats_servers: tuple[str, ...] = url_field()
    stream: str
    input_subject: str  # KRE 3.x: the inputs comma-joined (logs, dead-letter headers); input_subjects has each
    output_subject: str
    handler_path: str
    generation: str = "v2"  # "v2" or "v3": which KRE runner's contract the node speaks (see generation_reason)
    input_subjects: tuple[str, ...] = ()
    max_ack_pending: int = -1
    js_request_timeout: float = 5.0  # seconds
    base_path: Path = Path(".")
    is_last_node: bool = False
    entrypoint_subject: str | None = None
    mongo_writer_subject: str | None = None
    kv_project: str | None = None
    kv_workflow: str | None = None
    kv_node: str | None = None
    object_store: str | None = None
    mongo_uri: str | None = url_field(None)
    mongo_db: str = ""
    influx_uri: str | None = url_field(None)
    influx_token: str = secret_field("")
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
    max_deliver: int = 5
    dead_letter_stream: str = ""
    max_inflight_bytes: int = 16 * 1024 * 1024
    max_inflated_bytes: int = 0  # 0: 4 × the server's max_payload, known once connected (inflated_limit)
    migrate_push_consumer: bool = True
    db_timeout: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"
    http_port: int = 8080
    http_host: str = "0.0.0.0"
    health_reconnect_grace: float = 60.0
    nats_auth: NatsAuth = field(default_factory=NatsAuth)

    def __post_init__(self) -> None:
        if not self.input_subjects and self.input_subject:  # built in code (tests, tools) with one input
            object.__setattr__(self, "input_subjects", tuple(self.input_subject.split(",")))

    @property
    def consumer_name(self) -> str:
        return consumer_name(self.version, self.node_name)

    @property
    def generation_reason(self) -> str:
        """One line: which generation the node speaks, and the variable that decided it (check, /info)."""
        if self.generation == "v3":
            return "KRE 3.x: KRT_NATS_INPUTS is set (and KRT_NATS_INPUT is not), as the 3.x manager sets it"
        return "KRE v2: KRT_NATS_INPUT is set (and KRT_NATS_INPUTS is not), as the v2 manager sets it"

    def inflated_limit(self, max_payload: int) -> int:
        """The most a compressed input may inflate to: KRT_MAX_INFLATED_BYTES, else 4 × the server's max_payload.

        A gzip bomb of a few hundred KB must not take the node's memory; a legitimate compressed input
        is over max_payload inflated (it was compressed because of it) and seldom shrinks 4 times.
        """
        return self.max_inflated_bytes or 4 * max_payload

    @property
    def configuration_buckets(self) -> dict[str, str]:
        """ctx.configuration's buckets: scope -> bucket name, for the scopes whose variable is set."""
        buckets = {"project": self.kv_project, "workflow": self.kv_workflow, "node": self.kv_node}
        return {scope: name for scope, name in buckets.items() if name}

    @property
    def dead_letter_subject(self) -> str:
        """Where this node's dead letters go: ``{dead-letter stream}.{node}``."""
        return f"{self.dead_letter_stream}.{_NAME_UNSAFE_RE.sub('_', self.node_name)}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from ``env`` (usually ``os.environ``) or raise :class:`ConfigError`."""
        reader = _Reader(env)
        runtime_id = reader.required("KRT_RUNTIME_ID")
        generation, inputs = _read_inputs(reader)
        v3 = generation == "v3"
        settings = cls(
            workflow_name=reader.required("KRT_WORKFLOW_NAME"),
            runtime_id=runtime_id,
            version_id=reader.required("KRT_VERSION_ID"),
            version=reader.required("KRT_VERSION"),
            node_name=reader.required("KRT_NODE_NAME"),
            nats_servers=reader.required("KRT_NATS_SERVER", _parse_servers, "a nats:// URL"),
            stream=reader.required("KRT_NATS_STREAM", _parse_stream, "a stream name without . * > or spaces"),
            input_subject=",".join(inputs) if inputs else None,  # type: ignore[arg-type]  # None: from_env raises
            output_subject=reader.required("KRT_NATS_OUTPUT", _parse_subject, "a subject without wildcards"),
            handler_path=reader.required("KRT_HANDLER_PATH"),
            generation=generation,
            input_subjects=inputs,
            max_ack_pending=reader.optional("KRT_NATS_MAX_ACK_PENDING", -1, _max_ack_pending,
                                            "-1 (unbounded) or an integer ≥ 1"),
            js_request_timeout=reader.optional("KRT_JS_REQUEST_TIMEOUT", 30.0 if v3 else 5.0, _positive_milliseconds,
                                               "milliseconds > 0"),
            base_path=Path(reader.optional("KRT_BASE_PATH", ".")),
            # The v2 manager's variables: a 3.x node has no entrypoint subject (errors go to its output) and
            # no last node (any node may answer); set in a 3.x node they are ignored, with no effect.
            is_last_node=False if v3 else reader.optional("KRT_IS_LAST_NODE", False, _parse_bool, "true or false"),
            entrypoint_subject=None if v3 else reader.optional("KRT_NATS_ENTRYPOINT_SUBJECT", None, _parse_subject,
                                                               "a subject without wildcards"),
            mongo_writer_subject=reader.optional("KRT_NATS_MONGO_WRITER", None, _parse_subject,
                                                 "a subject without wildcards"),
            kv_project=reader.optional("KRT_NATS_KEY_VALUE_STORE_PROJECT", None, _parse_bucket, _BUCKET),
            kv_workflow=reader.optional("KRT_NATS_KEY_VALUE_STORE_WORKFLOW", None, _parse_bucket, _BUCKET),
            kv_node=reader.optional("KRT_NATS_KEY_VALUE_STORE_NODE", None, _parse_bucket, _BUCKET),
            object_store=reader.optional("KRT_NATS_OBJECT_STORE", None, _parse_bucket, _BUCKET),
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
            max_deliver=reader.optional("KRT_MAX_DELIVER", 5, _positive_int, "an integer ≥ 1"),
            dead_letter_stream=reader.optional("KRT_DEAD_LETTER_STREAM",
                                               f"{env.get('KRT_NATS_STREAM', '').strip()}-dead-letter",
                                               _parse_stream, "a stream name without . * > or spaces"),
            max_inflight_bytes=reader.optional("KRT_MAX_INFLIGHT_BYTES", 16 * 1024 * 1024, _at_least(2 * 1024 * 1024),
                                               "an integer ≥ 2097152 (two 1 MiB messages)"),
            max_inflated_bytes=reader.optional("KRT_MAX_INFLATED_BYTES", 0, _at_least(1024 * 1024),
                                               "an integer ≥ 1048576 (bytes)"),
            migrate_push_consumer=reader.optional("KRT_MIGRATE_PUSH_CONSUMER", True, _parse_bool, "true or false"),
            deliver_policy=reader.optional("KRT_DELIVER_POLICY", "new", _choice("new", "all"), "new or all"),
            db_timeout=reader.optional("KRT_DB_TIMEOUT", 5.0, _positive_float, "seconds > 0"),
            log_level=reader.optional("KRT_LOG_LEVEL", "INFO", parse_log_level,
                                      "DEBUG, INFO, WARNING (or WARN) or ERROR"),
            log_format=reader.optional("KRT_LOG_FORMAT", "text", _choice("text", "json"), "text or json"),
            http_port=reader.optional("KRT_HTTP_PORT", 8080, _port, "a port 1-65535, or 0 for no HTTP endpoint"),
            http_host=reader.optional("KRT_HTTP_HOST", "0.0.0.0", _parse_host,
                                      "an address to listen on: 0.0.0.0 (every interface), 127.0.0.1, :: or a host "
                                      "name"),
            health_reconnect_grace=reader.optional("KRT_HEALTH_RECONNECT_GRACE", 60.0, _positive_float,
                                                   "seconds > 0"),
            nats_auth=read_nats_auth(reader),
        )
        if settings.influx_uri and settings.influx_token and "@" in urlsplit(settings.influx_uri).netloc:
            # aiohttp refuses a request with both ("Cannot combine AUTHORIZATION header"): not one point is written.
            reader.problems.append("KRT_INFLUX_URI carries a user and password and KRT_INFLUX_TOKEN is set: InfluxDB "
                                   "takes one credential: remove user:password@ from KRT_INFLUX_URI (for InfluxDB 1.8 "
                                   "put it in KRT_INFLUX_TOKEN as user:password), or unset KRT_INFLUX_TOKEN")
        if reader.problems:
            raise ConfigError(reader.problems)
        return settings


def _read_inputs(reader: _Reader) -> tuple[str, tuple[str, ...]]:
    """The generation and the input subjects: ``KRT_NATS_INPUT`` (v2 manager) or ``KRT_NATS_INPUTS`` (3.x manager).

    Each manager sets only its own, so exactly one must be set; either alone decides the generation.
    """
    single = reader.env.get("KRT_NATS_INPUT", "").strip()
    several = reader.env.get("KRT_NATS_INPUTS", "").strip()
    if single and several:
        reader.problems.append("KRT_NATS_INPUT and KRT_NATS_INPUTS are both set: KRT_NATS_INPUT makes a KRE v2 node, "
                               "KRT_NATS_INPUTS (comma separated) a KRE 3.x node; unset the one of the other "
                               "generation")
        return "v2", ()
    if several:
        subjects = tuple(part.strip() for part in several.split(","))
        if not all(subjects) or not all(_SUBJECT_RE.match(subject) for subject in subjects):
            reader.problems.append(f"KRT_NATS_INPUTS={several!r} is invalid: expected subjects without wildcards, "
                                   f"comma separated, e.g. KRT_NATS_INPUTS={_EXAMPLES['KRT_NATS_INPUTS']}")
            return "v3", ()
        if len(set(subjects)) != len(subjects):
            reader.problems.append(f"KRT_NATS_INPUTS={several!r} names a subject twice: list each input once")
            return "v3", ()
        return "v3", subjects
    if not single:
        reader.problems.append("KRT_NATS_INPUT is not set: expected a subject without wildcards (a KRE v2 node; a KRE "
                               "3.x node sets KRT_NATS_INPUTS instead, comma separated), "
                               f"e.g. KRT_NATS_INPUT={_EXAMPLES['KRT_NATS_INPUT']}")
        return "v2", ()
    subject = reader.required("KRT_NATS_INPUT", _parse_subject, "a subject without wildcards")
    return "v2", (subject,) if subject else ()


def read_nats_auth(reader: _Reader) -> NatsAuth:
    """The ``KRT_NATS_*`` credential and TLS variables: files must exist, modes must not be mixed."""
    file = "an existing file (where the Secret is mounted)"
    auth = NatsAuth(
        creds=reader.optional("KRT_NATS_CREDS", None, _existing_file, file),
        nkey_seed=reader.optional("KRT_NATS_NKEY_SEED", None, _existing_file, file),
        token=reader.optional("KRT_NATS_TOKEN", "", secret=True),
        user=reader.optional("KRT_NATS_USER", ""),
        password=reader.optional("KRT_NATS_PASSWORD", "", secret=True),
        tls_ca=reader.optional("KRT_NATS_TLS_CA", None, _existing_file, file),
        tls_cert=reader.optional("KRT_NATS_TLS_CERT", None, _existing_file, file),
        tls_key=reader.optional("KRT_NATS_TLS_KEY", None, _existing_file, file),
    )
    modes = [name for name, value in (("KRT_NATS_CREDS", auth.creds), ("KRT_NATS_NKEY_SEED", auth.nkey_seed),
                                      ("KRT_NATS_TOKEN", auth.token), ("KRT_NATS_USER", auth.user)) if value]
    if len(modes) > 1:
        reader.problems.append(f"{' and '.join(modes)} are both set: use one way to authenticate to NATS")
    if bool(auth.user) != bool(auth.password):
        missing = "KRT_NATS_PASSWORD" if auth.user else "KRT_NATS_USER"
        reader.problems.append(f"{missing} is not set: KRT_NATS_USER and KRT_NATS_PASSWORD go together, "
                               f"e.g. {missing}={_EXAMPLES[missing]}")
    has_cert, has_key = (bool(reader.env.get(name, "").strip()) for name in ("KRT_NATS_TLS_CERT", "KRT_NATS_TLS_KEY"))
    if has_cert != has_key:
        missing = "KRT_NATS_TLS_KEY" if has_cert else "KRT_NATS_TLS_CERT"
        reader.problems.append(f"{missing} is not set: mutual TLS needs KRT_NATS_TLS_CERT and KRT_NATS_TLS_KEY, "
                               f"e.g. {missing}={_EXAMPLES[missing]}")
    return auth


def parse_log_level(raw: str) -> str:
    """``DEBUG``, ``INFO``, ``WARNING`` (``WARN`` accepted: it is what the log lines print) or ``ERROR``."""
    value = raw.upper()
    if value == "WARN":
        return "WARNING"
    if value in ("DEBUG", "INFO", "WARNING", "ERROR"):
        return value
    raise ValueError(raw)


def redacted_settings(settings: Settings) -> dict[str, Any]:
    """``settings`` as JSON-ready values for /info: allowed fields only, every secret replaced by ``***``."""
    return _shown(settings)


def shown_fields(cls: type) -> frozenset[str]:
    """The fields of ``Settings`` or ``NatsAuth`` that /info shows: the allow-list, and the marked ones redacted."""
    return _SHOWN[cls] | {item.name for item in fields(cls) if _SHOW in item.metadata}


def _shown(value: Any) -> dict[str, Any]:
    allowed = shown_fields(type(value))
    shown: dict[str, Any] = {}
    for item in fields(value):
        if item.name not in allowed:
            continue
        field_value = getattr(value, item.name)
        how = item.metadata.get(_SHOW)
        if how == _SECRET:
            field_value = "***" if field_value else ""
        elif how == _URL:
            field_value = ([redact_url(url) for url in field_value] if isinstance(field_value, tuple)
                           else redact_url(field_value) if field_value else field_value)
        elif is_dataclass(field_value):
            field_value = _shown(field_value)
        elif isinstance(field_value, Path):
            field_value = str(field_value)
        shown[item.name] = field_value
    return shown


def consumer_name(version: str, node: str) -> str:
    """The original's durable name ``{version}-{node}``, with characters JetStream rejects replaced."""
    return _NAME_UNSAFE_RE.sub("_", f"{version}-{node}")


def redact_url(url: str) -> str:
    """``url`` (or a comma-separated list of URLs) with passwords, tokens and secret query values as ``***``.

    Safe to log. Each URL of a list is redacted; userinfo ``user:password`` keeps the user, a lone
    userinfo is a token and is hidden whole; query parameters named like a secret (password, token,
    secret, key, ...) keep their name only.
    """
    if "://" not in url:  # a list of bare host:port servers, as KRT_NATS_SERVER allows
        return ",".join(_redact_one(part, 0) for part in url.split(","))
    return ",".join(_redact_one(part, part.find("://") + 3) for part in _SCHEME_START_RE.split(url))


def _redact_one(url: str, start: int) -> str:
    """One URL whose authority begins at ``start``. Everything up to the last ``@`` before the query is
    userinfo, so a password with an unescaped ``,`` or ``/`` (or a MongoDB host list) stays hidden."""
    query_at = min((i for i in (url.find("?", start), url.find("#", start)) if i >= 0), default=len(url))
    at = url.rfind("@", start, query_at)
    if at >= 0:
        user, colon, _ = url[start:at].partition(":")
        url = f"{url[:start]}{user + ':***' if colon else '***'}{url[at:]}"
    query_at = url.find("?", start)
    if query_at < 0:
        return url
    query, hash_mark, fragment = url[query_at + 1:].partition("#")
    params = []
    for param in query.split("&"):
        name, equals, _ = param.partition("=")
        params.append(f"{name}=***" if equals and _secret_param(name) else param)
    return f"{url[:query_at + 1]}{'&'.join(params)}{hash_mark}{fragment}"


def _secret_param(name: str) -> bool:
    lowered = name.strip().lower()
    return lowered in _SECRET_PARAMS or any(part in lowered for part in _SECRET_PARAM_PARTS)


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
                 expected: str = "a value", *, secret: bool = False) -> T:
        raw = self.env.get(name, "") if secret else self.env.get(name, "").strip()
        if not raw.strip():
            return default
        return self._parse(name, raw, parse, expected, secret)

    def _parse(self, name: str, raw: str, parse: Callable[[str], T] | None, expected: str,
               secret: bool = False) -> T:
        if parse is None:
            return raw  # type: ignore[return-value]
        try:
            return parse(raw)
        except ValueError:
            if secret:
                self.problems.append(f"{name} is invalid: expected {expected}")
                return None  # type: ignore[return-value]
            shown = redact_url(raw) if "://" in raw or "@" in raw else raw
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


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < minimum:
            raise ValueError(raw)
        return value

    return parse


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(raw)
    return value


def _existing_file(raw: str) -> Path:
    path = Path(raw)
    if not path.is_file():
        raise ValueError(raw)
    return path


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError(raw)
    return value


def _max_ack_pending(raw: str) -> int:
    value = int(raw)
    if value != -1 and value < 1:
        raise ValueError(raw)
    return value


def _positive_milliseconds(raw: str) -> float:
    """Milliseconds > 0, as seconds."""
    return _positive_float(raw) / 1000


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


def _parse_bucket(raw: str) -> str:
    """A JetStream key-value or object store bucket name (what nats-py and the server accept)."""
    if not _BUCKET_RE.match(raw):
        raise ValueError(raw)
    return raw


def _parse_host(raw: str) -> str:
    """An address or host name to listen on (not a URL: no scheme, port or path)."""
    if not _HOST_RE.match(raw) or raw.count(":") == 1:  # host:port is not a host
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


# /info shows these fields as they are; the SECRET and URL fields are shown redacted; any other field, not at all.
_SHOWN: dict[type, frozenset[str]] = {
    NatsAuth: frozenset({"creds", "nkey_seed", "user", "tls_ca", "tls_cert", "tls_key"}),
    Settings: frozenset({
        "workflow_name", "runtime_id", "version_id", "version", "node_name", "stream", "input_subject",
        "output_subject", "handler_path", "generation", "input_subjects", "max_ack_pending", "js_request_timeout",
        "base_path", "is_last_node", "entrypoint_subject", "mongo_writer_subject",
        "kv_project", "kv_workflow", "kv_node", "object_store",
        "mongo_db", "influx_org", "influx_bucket", "influx_batch_size", "influx_flush_interval", "influx_buffer",
        "elapsed_metrics", "max_inflight", "handler_threads", "batch_size", "batch_wait", "ack_wait",
        "publish_timeout", "shutdown_grace", "deliver_policy", "max_deliver", "dead_letter_stream",
        "max_inflight_bytes", "max_inflated_bytes", "migrate_push_consumer", "db_timeout", "log_level", "log_format",
        "http_port", "http_host", "health_reconnect_grace", "nats_auth",
    }),
}
