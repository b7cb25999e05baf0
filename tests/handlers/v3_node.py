"""A KRE 3.x handler module, written as a kre-py 3.4.1 user writes one: async default_handler awaiting ctx.send_output,
custom handlers per upstream node (one of them sync), init; the request's name says what to do."""

import asyncio

from greeter_pb2 import Request, Response


async def init(ctx):
    ctx.set("greeting", "Hello")  # kre-py 3.0–3.2's ctx.set/get
    ctx.set("attempts", {})


async def default_handler(ctx, data):
    if ctx.is_message_error():
        await ctx.send_output(Response(greeting=f"saw an error input {ctx.get_request_id()}"))
        return
    if ctx.is_message_early_reply():
        await ctx.send_output(Response(greeting="saw an early reply"))
        return
    request = Request()
    data.Unpack(request)
    name = request.name
    if name == "zero":
        return  # a filter: no output at all
    if name.startswith("many:"):
        for i in range(int(name[5:])):
            await ctx.send_output(Response(greeting=f"part {i}"))
        return
    if name == "channels":
        await ctx.send_output(Response(greeting="to the left"), channel="left")
        await ctx.send_early_reply(Response(greeting="early"), channel="right")
        await ctx.send_output(Response(greeting="main"))
        return
    if name == "boom":
        raise ValueError("boom")
    if name == "return":
        return Response(greeting="returned, not sent")
    if name.startswith("retry-once:"):
        # Two sends, then the first attempt fails transiently: the redelivery sends the same two again.
        from kre_runner import Retry

        await ctx.send_output(Response(greeting="first"))
        await ctx.send_output(Response(greeting="second"), channel="left")
        attempts = ctx.get("attempts")
        attempts[name] = attempts.get(name, 0) + 1
        if attempts[name] == 1:
            raise Retry("once", delay=0)
        return
    if name == "late":
        async def send_later():
            await asyncio.sleep(0.05)
            try:
                await ctx.send_output(Response(greeting="too late"))
            except RuntimeError as exc:
                ctx.set("late_error", str(exc))

        ctx.set("late_task", asyncio.ensure_future(send_later()))
        return
    if name == "report-late":
        await ctx.get("late_task")
        await ctx.send_output(Response(greeting=f"late: {ctx.get('late_error')}"))
        return
    await ctx.send_output(Response(greeting=f"{ctx.get('greeting')}, {name}! request {ctx.get_request_id()}"))


async def handle_a(ctx, data):
    request = Request()
    data.Unpack(request)
    await ctx.send_output(Response(greeting=f"from nodeA: {request.name}"))


def handle_b(ctx, data):
    # A sync custom handler: the returned awaitable need not be awaited.
    if ctx.is_message_error():
        ctx.send_output(Response(greeting="nodeB failed upstream"))
        return
    request = Request()
    data.Unpack(request)
    ctx.send_output(Response(greeting=f"from nodeB: {request.name}"))


custom_handlers = {"nodeA": handle_a, "nodeB": handle_b}
