"""``kre-runner trace WORKFLOW.yaml TRACKING_ID``: where one request is, from what the servers and ``up`` keep.

Three places can know a request (``call`` prints its tracking id):

* the workflow stream, while it is in flight: with interest retention an input stays there until
  the node consuming its subject acks it, so a stored message whose envelope has the tracking id
  is an input some node has not finished; the node's durable consumer says whether it was
  delivered (held unacked) or still waits its turn;
* the dead-letter stream(s), when a node gave up on it: which node, after how many deliveries, why;
* under ``up``, its run folder: the answers it saw on the entrypoint subject (with the nodes each
  passed, from the envelope's tracking entries) and each node's log lines that name the request.

JetStream does not expose one pending message's delivery count: under ``up`` it comes from the
node's log lines about that input sequence ("redelivered (delivery N)", "will be retried").
A request whose last node returned None, or that finished before ``up`` started, is found nowhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nats.js.errors import NotFoundError

from ..config import consumer_name
from ..node.envelope import EnvelopeError, decode
from . import deadletters as deadletter
from .workflow import Workflow

__all__ = ["SCAN_LIMIT", "trace"]

SCAN_LIMIT = 100_000  # messages of one stream read at most: an in-flight backlog, not a history


async def trace(js: Any, workflow: Workflow, tracking_id: str, nats_url: str,
                run_dir: Path | None = None) -> tuple[bool, list[str]]:
    """What is known of ``tracking_id``: (found anywhere, lines to print)."""
    lines: list[str] = []
    found = False
    layout = workflow.layout
    by_subject = {layout.node_subject(node.name): node.name for node in workflow.nodes}

    for seq, subject in await _scan(js, workflow.stream, tracking_id, lines):
        found = True
        node = by_subject.get(subject)
        if node is None:
            lines.append(f"in flight: stream {workflow.stream} seq {seq} on {subject} (no node of this workflow "
                         f"reads that subject)")
            continue
        lines.append(f"in flight: input of node {node}: stream {workflow.stream} seq {seq} on {subject}")
        lines.append(f"  {await _consumer_state(js, workflow, node, seq)}")
        lines += [f"  {line}" for line in _log_lines(run_dir, node, f"input seq {seq} ")]

    for stream in sorted(_dead_letter_streams(workflow, nats_url)):
        try:
            letters = await deadletter.read(js, stream)
        except NotFoundError:
            continue
        for letter in letters:
            envelope = letter.envelope()
            if envelope is None or envelope.tracking_id != tracking_id:
                continue
            found = True
            h = letter.headers
            lines.append(f"dead letter {letter.seq} in {stream}: node {h.get('Kre-Node', '?')} gave up after "
                         f"{h.get('Kre-Deliveries', '?')} deliveries at {h.get('Kre-Time', '?')}: "
                         f"{h.get('Kre-Error', '')}")
            lines.append(f"  replay it: kre-runner dead-letter replay {_yaml_arg(workflow)} {letter.seq}")

    if run_dir is not None:
        for answer in _answers(run_dir, tracking_id):
            found = True
            path = " -> ".join(name for name, *_ in answer.get("nodes", []))
            outcome = f" with an error ({answer['error']})" if answer.get("error") else ""
            lines.append(f"answered{outcome}, via {path}")
            for name, start, end in answer.get("nodes", []):
                lines.append(f"  {name:<12} {start} .. {end}")
        logged = _log_lines(run_dir, None, tracking_id)
        if logged:
            found = True
            lines.append("log lines naming it (under up):")
            lines += [f"  {line}" for line in logged]
    if not found:
        where = f"not in flight in {workflow.stream}, not dead-lettered"
        where += ", not answered while this `up` ran" if run_dir is not None else ""
        lines.append(f"tracking id {tracking_id}: {where}. A last node whose handler returns None answers nothing; "
                     f"in a cluster, search the nodes' logs for tracking_id={tracking_id}")
    return found, lines


async def _scan(js: Any, stream: str, tracking_id: str, lines: list[str]) -> list[tuple[int, str]]:
    """The (seq, subject) of every stored message of ``stream`` whose envelope has ``tracking_id``."""
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        lines.append(f"stream {stream} does not exist (is the workflow running?)")
        return []
    first, last = info.state.first_seq, info.state.last_seq
    if info.state.messages == 0:
        return []
    if last - first + 1 > SCAN_LIMIT:
        lines.append(f"stream {stream} holds {info.state.messages} messages: read the newest {SCAN_LIMIT} only")
        first = last - SCAN_LIMIT + 1
    matches = []
    needle = tracking_id.encode()
    for seq in range(first, last + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:
            continue  # acked and removed since
        data = msg.data or b""
        if needle not in data:  # cheap before decoding
            continue
        try:
            envelope = decode(data)
        except EnvelopeError:
            continue
        if envelope.tracking_id == tracking_id:
            matches.append((msg.seq or seq, msg.subject or ""))
    return matches


async def _consumer_state(js: Any, workflow: Workflow, node: str, seq: int) -> str:
    durable = consumer_name(workflow.version, node)
    try:
        info = await js.consumer_info(workflow.stream, durable)
    except NotFoundError:
        return f"no consumer {durable}: node {node} has never started (it creates its consumer at start)"
    delivered = info.delivered.stream_seq or 0
    counts = (f"consumer {durable}: {info.num_ack_pending} delivered and not acked, {info.num_redelivered} "
              f"redelivered, {info.num_pending} not delivered yet, {info.num_waiting} pull requests waiting")
    if seq <= delivered:  # still stored, so above the ack floor: held by the node
        state = (f"delivered to node {node} and not acked: being handled, or waiting to be redelivered after a "
                 f"failure or an ack wait (the node's log says which)")
    else:
        state = "not delivered yet: waiting its turn" + (" (no node pulls: is it running?)" if not info.num_waiting
                                                         else "")
    return f"{state}; {counts}"


def _dead_letter_streams(workflow: Workflow, nats_url: str) -> set[str]:
    return {workflow.node_env(node, nats_url).get("KRT_DEAD_LETTER_STREAM") or f"{workflow.stream}-dead-letter"
            for node in workflow.nodes}


def _answers(run_dir: Path, tracking_id: str) -> list[dict[str, Any]]:
    found = []
    try:
        with open(run_dir / "answers.jsonl", encoding="utf-8") as answers:
            for line in answers:
                if tracking_id in line:
                    try:
                        answer = json.loads(line)
                    except ValueError:
                        continue
                    if answer.get("tracking_id") == tracking_id:
                        found.append(answer)
    except OSError:
        pass
    return found


def _log_lines(run_dir: Path | None, node: str | None, needle: str, limit: int = 20) -> list[str]:
    """Lines naming ``needle`` in the nodes' log files under ``up`` (one node's, or every node's)."""
    if run_dir is None:
        return []
    lines = []
    for path in sorted(run_dir.glob("*.log")):
        label = path.stem
        if node is not None and label != node and not label.startswith(f"{node}-"):
            continue
        try:
            with open(path, encoding="utf-8", errors="replace") as log:
                lines += [f"{label} | {line.rstrip()}" for line in log if needle in line]
        except OSError:
            continue
    return lines[-limit:]


def _yaml_arg(workflow: Workflow) -> str:
    import os

    relative = os.path.relpath(workflow.path)
    return str(workflow.path) if relative.startswith("..") else relative
