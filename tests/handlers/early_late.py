"""ctx.early_reply from where it cannot act on the input: a thread the handler started, a task that outlives
the handler. What each attempt raised goes to the file KRE_TEST_OUTCOMES names, one line each."""

import asyncio
import os
import threading

from greeter_pb2 import Request, Response


def _record(line: str) -> None:
    with open(os.environ["KRE_TEST_OUTCOMES"], "a") as outcomes:
        outcomes.write(line.replace("\n", " ") + "\n")


def _try_reply(ctx, what: str) -> None:
    try:
        ctx.early_reply(Response(greeting=f"early from {what}"))
    except Exception as exc:
        _record(f"{what} {type(exc).__name__}: {exc}")
    else:
        _record(f"{what} sent")


def handler(ctx, data):
    """Sync: a thread of its own replies while the handler waits for it."""
    request = Request()
    data.Unpack(request)
    thread = threading.Thread(target=_try_reply, args=(ctx, "thread"))
    thread.start()
    thread.join()
    return Response(greeting=f"late {request.name}")


async def handler_task(ctx, data):
    """Async: a task replies once the handler has returned."""
    request = Request()
    data.Unpack(request)
    returned = asyncio.Event()

    async def later() -> None:
        await returned.wait()
        _try_reply(ctx, "task")

    asyncio.get_running_loop().create_task(later())
    returned.set()  # the task wakes on the next loop iteration, once this call has returned
    return Response(greeting=f"late {request.name}")
