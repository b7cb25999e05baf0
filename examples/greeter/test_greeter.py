"""The greeter's nodes tested through the real pipeline: `pytest examples/` (kre-runner's pytest plugin).

`kre_node.start` runs a handler as a node in the test's event loop, on an embedded JetStream server:
the real consumer, envelope and acks. `node.call` sends a request as the KRE entrypoint does.
"""

import pytest
from greeter_pb2 import Request, Response

from kre_runner.testing import HandlerError


async def test_greeter_greets_by_name(kre_node):
    node = await kre_node.start("greeter.py")
    answer = await node.call(Request(name="Ann"), Response)
    assert answer.greeting == "Hello, Ann!"


async def test_decorator_decorates_with_threads(kre_node):
    node = await kre_node.start("decorator.py", env={"KRT_HANDLER_THREADS": "2"})
    answers = await node.call_many([Response(greeting=f"hi {i}") for i in range(10)], Response)
    assert [a.greeting for a in answers] == [f"✨ hi {i} ✨" for i in range(10)]


async def test_a_handler_error_reaches_the_caller(kre_node, tmp_path):
    (tmp_path / "strict.py").write_text(
        "from greeter_pb2 import Request, Response\n"
        "def handler(ctx, data):\n"
        "    request = Request()\n"
        "    data.Unpack(request)\n"
        "    if not request.name:\n"
        "        raise ValueError('a name is required')\n"
        "    return Response(greeting=request.name)\n"
    )
    node = await kre_node.start(tmp_path / "strict.py")
    with pytest.raises(HandlerError, match="a name is required"):
        await node.call(Request(), Response)
