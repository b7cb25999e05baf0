"""The KRE 3.x example's nodes tested through the real pipeline: `pytest examples/` (kre-runner's pytest plugin).

A module with `default_handler` starts as a 3.x node; `node.call` returns every output it sent for the
request, with its channel and message type. Each node has its own configuration buckets and object store.
"""

from words_pb2 import Result, Text


async def test_splitter_counts_prefixes_and_sends_on_the_loud_channel(kre_node):
    node = await kre_node.start("splitter.py")
    await node.set_configuration("prefix", ">> ", scope="workflow")
    outputs = await node.call(Text(text="hello kre three"), Result)
    assert [(o.channel, o.message_type) for o in outputs] == [("", "OK"), ("loud", "OK")]
    assert (outputs[0].message.text, outputs[0].message.words) == (">> hello kre three", 3)
    loud = Text()
    assert outputs[1].payload.Unpack(loud) and loud.text == "hello kre three"


async def test_an_empty_text_is_an_error_envelope(kre_node):
    node = await kre_node.start("splitter.py")
    [output] = await node.call(Text(text=" "))
    assert output.message_type == "ERROR" and "empty text" in output.error


async def test_exitpoint_has_a_handler_per_upstream_node_and_keeps_the_shout(kre_node):
    node = await kre_node.start("exitpoint.py", inputs=["splitter", "shouter"])
    [from_shouter] = await node.call_v3(Result(text="HI THERE", words=2, source="shouter"), Result,
                                        from_node="shouter")
    assert from_shouter.message.source == "shouter"
    assert await node.get_object(f"shout-{from_shouter.request_id}") == b"HI THERE"
    [failed] = await node.call_v3(None, from_node="splitter", message_type="ERROR", error="splitter broke")
    assert failed.message_type == "ERROR" and "upstream failed" in failed.error
