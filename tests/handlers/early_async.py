from greeter_pb2 import Request, Response


async def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    await ctx.early_reply(Response(greeting=f"early {request.name}"))
    return Response(greeting=f"late {request.name}")
