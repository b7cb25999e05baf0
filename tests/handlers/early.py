"""Early reply: answer the entrypoint first, then continue the workflow."""

from greeter_pb2 import Request, Response


def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    ctx.early_reply(Response(greeting=f"early {request.name}"))
    if request.name.startswith("twice"):
        ctx.early_reply(Response(greeting="again"))
    return Response(greeting=f"late {request.name}")
