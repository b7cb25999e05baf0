"""Handlers whose call takes as long as the input's name says ("0.12:7" sleeps 0.12 s), each call logged to
the file KRE_TEST_CALLS names (one line per input per call): a second line for an input is a second call."""

import asyncio
import os
import time

from greeter_pb2 import Request, Response


def _parse(data) -> tuple[str, float]:
    request = Request()
    data.Unpack(request)
    return request.name, float(request.name.split(":")[0])


def _called(names: list[str]) -> None:
    with open(os.environ["KRE_TEST_CALLS"], "a") as calls:
        calls.write("".join(f"{name}\n" for name in names))


def handler(ctx, data):
    name, seconds = _parse(data)
    _called([name])
    time.sleep(seconds)
    return Response(greeting=name)


async def handler_async(ctx, data):
    name, seconds = _parse(data)
    _called([name])
    await asyncio.sleep(seconds)
    return Response(greeting=name)


def handler_batch(ctx, batch):
    parsed = [_parse(data) for data in batch]
    _called([name for name, _ in parsed])
    time.sleep(max(seconds for _, seconds in parsed))
    return [Response(greeting=name) for name, _ in parsed]
