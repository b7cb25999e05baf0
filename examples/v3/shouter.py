"""KRE 3.x node on the splitter's ``loud`` channel: the text in capitals, counted again."""

from words_pb2 import Result, Text


async def default_handler(ctx, data):
    request = Text()
    data.Unpack(request)
    await ctx.send_output(Result(text=request.text.upper(), words=len(request.text.split()), source="shouter"))
