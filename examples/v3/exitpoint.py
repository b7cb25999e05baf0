"""KRE 3.x exitpoint (fan-in): one handler per upstream node. Its output answers the caller: the first
envelope per request wins. The shouted text is kept in the object store as ``shout-{request_id}``."""

from words_pb2 import Result


def _upstream_failed(ctx):
    # Every input reaches a handler in 3.x, upstream errors too: raising passes the error to the caller.
    if ctx.is_message_error():
        raise RuntimeError("upstream failed")


async def from_splitter(ctx, data):
    _upstream_failed(ctx)
    result = Result()
    data.Unpack(result)
    await ctx.send_output(result)


async def from_shouter(ctx, data):
    _upstream_failed(ctx)
    result = Result()
    data.Unpack(result)
    await ctx.object_store.save(f"shout-{ctx.get_request_id()}", result.text.encode())
    await ctx.send_output(result)


async def default_handler(ctx, data):
    raise RuntimeError("unexpected input: only the splitter and the shouter feed the exitpoint")


custom_handlers = {"splitter": from_splitter, "shouter": from_shouter}
