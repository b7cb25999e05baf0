"""The benchmark's 3.x user code: ``handler.py``'s trivial job written as a kre-py 3.x module (sends, no return)."""

from __future__ import annotations

from typing import Any

from greeter_pb2 import Request, Response


def default_handler(ctx: Any, data: Any) -> None:
    request = Request()
    data.Unpack(request)
    ctx.send_output(Response(greeting="Hello, " + request.name + "!"))
