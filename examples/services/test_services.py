"""The services node tested with its data services captured in memory: `pytest examples/`."""

import sys
from pathlib import Path

# The example shares the greeter's protobufs (services.py does the same).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "greeter"))

from greeter_pb2 import Request


async def test_each_request_is_recorded_and_passed_on(kre_node):
    node = await kre_node.start("services.py")
    for _ in range(2):
        assert (await node.call(Request(name="Ann"), Request)).name == "Ann"
    assert [doc["name"] for doc in node.db["visits"]] == ["Ann", "Ann"]
    assert node.predictions[0]["predictedValue"] == "short"
    assert node.predictions[0]["versionName"] == "v1"
    assert [p["fields"]["count"] for p in node.measurements] == [1, 2]
    assert node.measurements[0]["tags"]["node"] == "services"
