"""v2 handler using the 3.x services as an extension: a configuration value and an object."""

from greeter_pb2 import Request, Response


async def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    greeting = await ctx.configuration.get("greeting")
    await ctx.object_store.save(f"greeted.{request.name}", request.name.encode())
    return Response(greeting=f"{greeting}, {request.name}!")
