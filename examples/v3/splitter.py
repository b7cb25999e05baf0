"""KRE 3.x node: counts the words of a Text, prefixed by the live configuration value ``prefix``; sends the
Result on its output and the Text on channel ``loud``. An empty text is an error (the runner sends it on)."""

from words_pb2 import Result, Text


async def default_handler(ctx, data):
    request = Text()
    data.Unpack(request)
    if not request.text.strip():
        raise ValueError("empty text")
    try:
        prefix = await ctx.configuration.get("prefix")  # node, then workflow, then project scope
    except Exception:  # no value in any scope
        prefix = ""
    await ctx.send_output(Result(text=prefix + request.text, words=len(request.text.split()), source="splitter"))
    await ctx.send_output(request, channel="loud")
