"""A KRE 3.x module whose handlers are all sync: they run on the event loop, in place (the fastest path)."""

from greeter_pb2 import Request, Response


def default_handler(ctx, data):
    request = Request()
    data.Unpack(request)
    if request.name == "boom":
        raise RuntimeError("sync boom")
    if request.name == "half":  # a send, then a failure: the send goes out first, then the error envelope
        ctx.send_output(Response(greeting="sync half"))
        raise RuntimeError("sync half boom")
    ctx.send_output(Response(greeting=f"sync {request.name}"))
    ctx.send_output(Response(greeting=f"sync {request.name} again"), channel="copy")
