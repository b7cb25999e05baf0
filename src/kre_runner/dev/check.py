"""``kre-runner check``: what would stop this node, or surprise its user, found before it runs.

Loads the ``KRT_*`` configuration and the handler, connects, checks that the stream exists and
captures the node's subjects, and reads the durable consumer through nats-py's public API (kind,
deliver policy, ack wait, filter). Each finding is one :class:`Finding` with the fix when it fails.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import AckPolicy
from nats.js.errors import NotFoundError

from ..config import ConfigError, Settings, redact_url
from ..nats.streams import subject_in

__all__ = ["Finding", "run_checks"]


@dataclass(frozen=True)
class Finding:
    ok: bool
    text: str
    fix: str = ""

    def line(self) -> str:
        mark = "✔" if self.ok else "✘"
        return f"{mark} {self.text}" + (f"\n    fix: {self.fix}" if self.fix else "")


async def run_checks(env: Mapping[str, str]) -> list[Finding]:
    """Every check that can run; a failure that makes the next ones meaningless ends the list."""
    from ..handler import HandlerLoadError, load_user_code
    from ..nats.connection import connect

    findings: list[Finding] = []
    try:
        s = Settings.from_env(env)
    except ConfigError as exc:
        return [Finding(False, f"configuration: {problem}", "set the variable (kre-runner run --help lists them)")
                for problem in exc.problems]
    findings.append(Finding(True, f"configuration: node {s.node_name} of workflow {s.workflow_name} "
                                  f"({s.version}), input {s.input_subject}, output {s.output_subject}"))
    findings.append(Finding(True, f"generation: {s.generation_reason}"))
    try:
        code = load_user_code(s.base_path, s.handler_path, s.generation)
        kind = "async" if code.handler_is_async else "sync"
        findings.append(Finding(True, f"handler: {code.path} loads ({kind} handler, "
                                      f"{'with' if code.init else 'no'} init)"))
    except HandlerLoadError as exc:
        findings.append(Finding(False, f"handler: {exc}", "fix the file, or KRT_BASE_PATH / KRT_HANDLER_PATH"))
    servers = ", ".join(redact_url(u) for u in s.nats_servers)
    try:
        nc = await connect(s.nats_servers, logging.getLogger("kre_runner.dev.check"), name="kre-runner check",
                           attempts=1)
    except Exception as exc:
        findings.append(Finding(False, f"NATS: {exc}", "start the server, or fix KRT_NATS_SERVER"))
        return findings
    findings.append(Finding(True, f"NATS: connected to {servers} (max payload {nc.max_payload} bytes)"))
    try:
        js = nc.jetstream()
        findings.extend(await _stream_checks(js, s))
        if findings[-1].ok:
            findings.append(await _consumer_check(js, s))
    finally:
        await nc.close()
    return findings


async def _stream_checks(js: JetStreamContext, s: Settings) -> list[Finding]:
    try:
        info = await js.stream_info(s.stream)
    except NotFoundError:
        return [Finding(False, f"stream {s.stream} does not exist",
                        f"kre-runner stream create (creates {s.stream} with subjects {s.stream}.*, as the manager "
                        f"does)")]
    except Exception as exc:
        return [Finding(False, f"JetStream: {type(exc).__name__}: {exc}", "start nats-server with -js")]
    subjects = list(info.config.subjects or [])
    findings = [Finding(True, f"stream {s.stream} exists (subjects {', '.join(subjects)}, "
                              f"{info.state.messages} messages, retention {_value(info.config.retention)})")]
    inputs = "KRT_NATS_INPUTS" if s.generation == "v3" else "KRT_NATS_INPUT"
    wanted = [(inputs, subject) for subject in s.input_subjects] + [("KRT_NATS_OUTPUT", s.output_subject)]
    if s.generation == "v3":
        wanted.append(("KRT_NATS_OUTPUT's channels", f"{s.output_subject}.*"))
    if s.entrypoint_subject:
        wanted.append(("KRT_NATS_ENTRYPOINT_SUBJECT", s.entrypoint_subject))
    for variable, subject in wanted:
        if subject_in(subject, subjects):
            findings.append(Finding(True, f"{variable}={subject} is captured by stream {s.stream}"))
            continue
        other = None
        if variable not in ("KRT_NATS_INPUT", "KRT_NATS_INPUTS"):
            try:
                other = await js.find_stream_name_by_subject(subject)
            except Exception:
                other = None
        if other:
            findings.append(Finding(True, f"{variable}={subject} is captured by stream {other}"))
        else:
            findings.append(Finding(False, f"{variable}={subject} is captured by no stream",
                                    f"use a subject under {s.stream}. or add it to the stream's subjects"))
    return findings


async def _consumer_check(js: JetStreamContext, s: Settings) -> Finding:
    name = s.consumer_name
    try:
        info = await js.consumer_info(s.stream, name)
    except NotFoundError:
        if s.deliver_policy == "new":
            return Finding(True, f"consumer {name} does not exist yet: the node creates it at its first start, "
                                 f"delivering from then on (KRT_DELIVER_POLICY=new): messages published to "
                                 f"{s.input_subject} before that start are NOT processed (KRT_DELIVER_POLICY=all "
                                 f"processes them)")
        return Finding(True, f"consumer {name} does not exist yet: the node creates it at its first start, "
                             f"delivering every message the stream holds (KRT_DELIVER_POLICY=all)")
    c = info.config
    if c.deliver_subject:
        return Finding(False, f"consumer {name} is a push consumer (left by the original runner?): kre-runner "
                              f"will refuse to start", f"once its messages are processed: nats consumer rm "
                                                       f"{s.stream} {name}")
    if _value(c.ack_policy) != AckPolicy.EXPLICIT.value:
        return Finding(False, f"consumer {name} has ack policy {_value(c.ack_policy)}: kre-runner needs explicit acks",
                       f"nats consumer rm {s.stream} {name} (the node recreates it)")
    notes = []
    filters = tuple(c.filter_subjects or ([c.filter_subject] if c.filter_subject else []))
    if sorted(filters) != sorted(s.input_subjects):
        notes.append(f"its filter {', '.join(filters) or '(none)'} is changed to {s.input_subject} at start")
    if c.ack_wait is not None and abs(c.ack_wait - s.ack_wait) > 1e-6:
        notes.append(f"its ack wait {c.ack_wait:g}s is changed to KRT_ACK_WAIT={s.ack_wait:g}s at start")
    policy = _value(c.deliver_policy)
    if policy != s.deliver_policy:
        notes.append(f"KRT_DELIVER_POLICY={s.deliver_policy} only applies to a new consumer: this one resumes "
                     f"where it stopped")
    text = (f"consumer {name}: durable pull consumer, deliver policy {policy}, ack wait {c.ack_wait:g}s, "
            f"filter {', '.join(filters) or '(none)'}; {info.num_pending} message(s) waiting, "
            f"{info.num_ack_pending} unacknowledged")
    return Finding(True, text + ("; " + "; ".join(notes) if notes else ""))


def _value(option: object) -> str:
    """nats-py gives some config fields as enums and some as plain strings."""
    return str(getattr(option, "value", option))
