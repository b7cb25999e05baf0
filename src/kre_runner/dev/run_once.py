"""``kre-runner run-once``: a handler on one input (or many), in this process, without NATS.

``init`` runs once, then ``handler`` per input, with a real ``ctx``: ``ctx.path``, ``get``/``set``,
``ctx.logger`` (to stderr, so stdout carries only the answers) and the data services when their
usual ``KRT_*`` variables are set. Each output is printed as one line of JSON.

Every handler shape runs as ``kre-runner run`` runs it, with one input: a sync handler is called,
an async one awaited; a batch handler gets a list of one through the adapter ``run`` uses with
``KRT_BATCH_SIZE=1`` (``batching.one_at_a_time``: same list contract); ``ctx.early_reply`` is built and
checked by the node's own ``Outcomes`` (one per request, a protobuf message, within the size limit),
printed to stderr at once and returns an awaitable that need not be awaited; ``ctx.early_exit`` and
``ctx.batch_tracking_ids`` work, and are refused where a node refuses them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, TextIO

from google.protobuf.message import Message

from ..config import Settings
from ..context import Context, Retry
from ..handler import UserCode
from ..node.batching import one_at_a_time
from ..node.envelope import TrackingClock
from ..node.outcome import Outcomes, user_traceback
from ..node.settlement import Job
from .calling import request_envelope
from .messages import to_json

__all__ = ["run_once", "services_settings"]

# Placeholders for the variables a pod must have but a handler run alone never uses.
_PLACEHOLDERS = {
    "KRT_WORKFLOW_NAME": "local", "KRT_RUNTIME_ID": "local", "KRT_VERSION_ID": "v1-id", "KRT_VERSION": "v1",
    "KRT_NATS_SERVER": "nats://127.0.0.1:4222", "KRT_NATS_STREAM": "local", "KRT_NATS_INPUT": "local.in",
    "KRT_NATS_OUTPUT": "local.out",
}


def services_settings(env: dict[str, str], node_name: str, handler_path: str) -> Settings:
    """Settings from ``env`` where the NATS/workflow variables a local run does not need may be missing."""
    merged = {**_PLACEHOLDERS, "KRT_NODE_NAME": node_name, "KRT_HANDLER_PATH": handler_path}
    merged.update({k: v for k, v in env.items() if v.strip()})
    return Settings.from_env(merged)


async def run_once(code: UserCode, messages: Sequence[Message], out: TextIO, err: TextIO,
                   env: dict[str, str] | None = None) -> int:
    """Run ``init`` then ``handler`` on each message; 0 when every call succeeded, 1 otherwise."""
    from ..services import open_services

    env = dict(os.environ if env is None else env)
    settings = services_settings(env, code.path.stem, str(code.path))
    logger = logging.getLogger("kre_runner")
    nc = None
    if settings.mongo_writer_subject:
        from ..nats.connection import connect

        nc = await connect(settings.nats_servers, logger, name="kre-runner run-once", attempts=1)
    services = await open_services(settings, nc, logger)
    batch = code.batch
    if batch:
        code = one_at_a_time(code)  # a batch of one, as `run` calls a batch handler with KRT_BATCH_SIZE=1
    outcomes = Outcomes(settings, TrackingClock(), logger)
    running: list[Job] = []  # the input whose handler is running (one at a time here)

    def current(what: str) -> Job:
        """The running input, or the error a node raises for ``ctx.<what>`` here (consumer.Consumer._current)."""
        if batch:
            raise RuntimeError(f"ctx.{what} acts on one message: it is not available in a batch handler")
        if not running:
            raise RuntimeError(f"ctx.{what} must be called from within a handler")
        return running[0]

    def early_reply(response: Message) -> Awaitable[None]:
        job = current("early_reply")
        outcomes.early_reply(job, response)  # raises to the handler exactly when a node's would
        job.replied = True
        err.write(f"early reply: {to_json(response)}\n")
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sent.set_result(None)  # already "published": awaiting it is optional, as in a node
        return sent

    def early_exit() -> None:
        current("early_exit").early_exit = True
        err.write("early exit: in a workflow this output goes to the entrypoint; later nodes never see the request\n")

    def batch_tracking_ids() -> list[str]:
        if not running:
            raise RuntimeError("ctx.batch_tracking_ids() must be called from within a batch handler")
        return [running[0].envelope.tracking_id if running[0].envelope is not None else ""]

    ctx = Context(base_path=Path(env.get("KRT_BASE_PATH") or code.path.parent), db=services.db,
                  logger=logging.getLogger(f"kre_runner.handler.{code.path.stem}"),
                  measurement=services.measurement, prediction=services.prediction, early_reply=early_reply,
                  early_exit=early_exit, batch_tracking_ids=batch_tracking_ids if batch else None)
    failed = 0
    try:
        if code.init is not None:
            try:
                await _call(code.init, ctx)
            except Exception as exc:
                err.write(f"init(ctx) in {code.path} failed:\n{_user_traceback(exc)}")
                return 1
        for i, message in enumerate(messages, 1):
            job = Job("", f"run-once:{i}", time.monotonic())
            job.envelope = request_envelope(message)
            payload = job.envelope.payload
            where = f" on input {i}" if len(messages) > 1 else ""
            running.append(job)
            try:
                # As the consumer calls it: a coroutine function awaited, anything else called (and not awaited).
                result = await code.handler(ctx, payload) if code.handler_is_async else code.handler(ctx, payload)
                if result is not None and not isinstance(result, Message):
                    raise TypeError(f"the handler returned {type(result).__name__}: expected a protobuf message, "
                                    f"a google.protobuf.Any or None")
            except Retry as exc:
                failed += 1
                err.write(f"handler{where} asked for a retry: {exc or 'Retry'} (a node hands the input back and "
                          f"runs it again in {exc.delay:g}s, up to KRT_MAX_DELIVER times)\n")
                continue
            except Exception as exc:
                failed += 1
                err.write(f"handler{where} failed:\n{_user_traceback(exc)}")
                continue
            finally:
                running.clear()
            out.write(to_json(result) + "\n")
            out.flush()
    finally:
        await services.close(5.0)
        if nc is not None:
            await nc.close()
    return 1 if failed else 0


async def _call(function: Any, *args: Any) -> Any:
    result = function(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the user's code on, as the node logs it (outcome.user_traceback)."""
    trimmed = user_traceback(exc)
    return "".join(traceback.format_exception(type(trimmed), trimmed, trimmed.__traceback__))
