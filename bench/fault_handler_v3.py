"""The 3.x fault rows' user code (``bench/v3_faults.py``), written as a kre-py 3.4.1 module: one output per input.

``default_handler`` (async, awaiting ``ctx.send_output``) answers the entrypoint and nodeB; nodeA has
its own handler in ``custom_handlers``. The greeting names the handler, so the tally can tell that
routing by ``from_node`` held across the faults. Each handler works on for a while after its send (as
a node with more to do would), so a kill -9 lands between stored outputs and their inputs' acks: the
redelivered inputs send again, and only the per-send Nats-Msg-Id keeps that from storing twice.
"""

from __future__ import annotations

import asyncio
from typing import Any

from greeter_pb2 import Request, Response

_AFTER_SEND = 0.1  # seconds each input stays unacked after its output is stored


def _name(data: Any) -> str:
    request = Request()
    data.Unpack(request)
    return request.name


async def default_handler(ctx: Any, data: Any) -> None:
    await ctx.send_output(Response(greeting=f"default {_name(data)}"))
    await asyncio.sleep(_AFTER_SEND)


async def handle_a(ctx: Any, data: Any) -> None:
    await ctx.send_output(Response(greeting=f"nodeA {_name(data)}"))
    await asyncio.sleep(_AFTER_SEND)


custom_handlers = {"nodeA": handle_a}
