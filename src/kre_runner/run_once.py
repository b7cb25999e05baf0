"""``kre-runner run-once``: a handler on one input (or many), in this process, without NATS.

``init`` runs once, then ``handler`` per input, with a real ``ctx``: ``ctx.path``, ``get``/``set``,
``ctx.logger`` (to stderr, so stdout carries only the answers) and the data services when their
usual ``KRT_*`` variables are set. Each output is printed as one line of JSON.
"""

from __future__ import annotations

import inspect
import logging
import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message

from .config import Settings
from .context import Context
from .handler import UserCode
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
    from .services import open_services

    env = dict(os.environ if env is None else env)
    settings = services_settings(env, code.path.stem, str(code.path))
    logger = logging.getLogger("kre_runner")
    nc = None
    if settings.mongo_writer_subject:
        from .connection import connect

        nc = await connect(settings.nats_servers, logger, name="kre-runner run-once", attempts=1)
    services = await open_services(settings, nc, logger)
    early: list[Message] = []

    async def early_reply(response: Message) -> None:
        early.append(response)
        err.write(f"early reply: {to_json(response)}\n")

    ctx = Context(base_path=Path(env.get("KRT_BASE_PATH") or code.path.parent), db=services.db,
                  logger=logging.getLogger(f"kre_runner.handler.{code.path.stem}"),
                  measurement=services.measurement, prediction=services.prediction, early_reply=early_reply)
    failed = 0
    try:
        if code.init is not None:
            try:
                await _call(code.init, ctx)
            except Exception as exc:
                err.write(f"init(ctx) in {code.path} failed:\n{_user_traceback(exc)}")
                return 1
        for i, message in enumerate(messages, 1):
            payload = AnyProto()
            payload.Pack(message)
            try:
                result = await _call(code.handler, ctx, payload)
                if result is not None and not isinstance(result, Message):
                    raise TypeError(f"the handler returned {type(result).__name__}: expected a protobuf message, "
                                    f"a google.protobuf.Any or None")
            except Exception as exc:
                failed += 1
                where = f" on input {i}" if len(messages) > 1 else ""
                err.write(f"handler{where} failed:\n{_user_traceback(exc)}")
                continue
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
    """The traceback from the user's code on: the runner's own frames are noise here."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))
