"""A kre-py 3.4.1 handler module, as its users write one, run unchanged by kre-runner and by the
independent 3.x implementation in tests/v3_reference: the interop test runs it under both, side by side.

One module, three roles by node name (the variable the 3.x manager sets):
* ``first`` (input: the entrypoint): sets ``shared-{request}`` in the workflow scope, saves the object
  ``obj-{request}``, and sends on the channel ``left``;
* ``mid`` (inputs: the entrypoint and ``first.left``, fan-in): the default handler answers the
  entrypoint directly; ``custom_handlers["first"]`` reads the value and the object ``first`` left;
  both save ``back-{request}`` (the same bytes) before they answer; a request named ``boom`` raises
  (the runner's error envelope);
* ``exitpoint`` (input: ``mid``): reads ``back-{request}`` and forwards; an ERROR input is forwarded too.
``INTEROP_IMPL`` says which implementation runs the node, so that the answer shows who wrote what.
"""

import os

from greeter_pb2 import Request, Response

NODE = os.environ["KRT_NODE_NAME"]
IMPL = os.environ.get("INTEROP_IMPL", "?")


async def init(ctx):
    ctx.logger.info("interop node %s on %s", NODE, IMPL)


async def default_handler(ctx, data):
    rid = ctx.get_request_id()
    if NODE == "exitpoint":
        if ctx.is_message_error():
            await ctx.send_output(Response(greeting="exit saw an error"))
            return
        response = Response()
        data.Unpack(response)
        # Each of mid's two handlers saves its own object: one key replaced by both at once would race
        # with this read (a replaced object's chunks are purged), in any object-store client.
        via = "direct" if response.greeting.startswith("mid direct") else "via"
        back = (await ctx.object_store.get(f"back-{rid}-{via}")).decode()
        await ctx.send_output(Response(greeting=f"{response.greeting} | back: {back} | exit on {IMPL}"))
        return
    request = Request()
    data.Unpack(request)
    if NODE == "first":
        await ctx.configuration.set(f"shared-{rid}", f"value from {IMPL}", scope="workflow")
        await ctx.object_store.save(f"obj-{rid}", f"object of {request.name} from {IMPL}".encode())
        await ctx.send_output(Request(name=request.name), channel="left")
        return
    if request.name == "boom":
        raise ValueError("boom on purpose")
    await ctx.object_store.save(f"back-{rid}-direct", f"saved by mid on {IMPL}".encode())
    await ctx.send_output(Response(greeting=f"mid direct {request.name}"))


async def handle_first(ctx, data):
    rid = ctx.get_request_id()
    request = Request()
    data.Unpack(request)
    value = await ctx.configuration.get(f"shared-{rid}")
    stored = (await ctx.object_store.get(f"obj-{rid}")).decode()
    await ctx.object_store.save(f"back-{rid}-via", f"saved by mid on {IMPL}".encode())  # before the send: exit reads it
    await ctx.send_output(Response(greeting=f"mid via first {request.name}: {value}; {stored}"), channel="")


custom_handlers = {"first": handle_first}
