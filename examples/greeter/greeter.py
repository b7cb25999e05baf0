"""First node: turns a Request{name} into a Response{greeting}."""

from greeter_pb2 import Request, Response


def init(ctx):
    # Runs once, before the first message: load models, open files, warm caches here.
    ctx.set("salutation", "Hello")


def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    return Response(greeting=f"{ctx.get('salutation')}, {request.name}!")
