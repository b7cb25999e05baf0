"""KRE 3.x without servers: generation detection, the module shape, the codec, the timing point (issue 18)."""

from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap

import pytest

from kre_runner.config import ConfigError, Settings
from kre_runner.errors import HandlerLoadError
from kre_runner.handler import load_user_code
from kre_runner.node.envelope import EnvelopeError, KreNatsMessageV3, decode, decode_v3, encode
from kre_runner.ops.elapsed import ElapsedRecorderV3
from kre_runner.proto.kre_nats_msg_v3_pb2 import MessageType

BASE = {
    "KRT_WORKFLOW_NAME": "Greet", "KRT_RUNTIME_ID": "runtime1", "KRT_VERSION_ID": "v-id", "KRT_VERSION": "greeter-v1",
    "KRT_NODE_NAME": "exitpoint", "KRT_NATS_SERVER": "nats://localhost:4222",
    "KRT_NATS_STREAM": "runtime1_greeter-v1_Greet", "KRT_NATS_OUTPUT": "runtime1_greeter-v1_Greet.exitpoint",
    "KRT_HANDLER_PATH": "h.py",
}
INPUTS = "runtime1_greeter-v1_Greet.nodeA,runtime1_greeter-v1_Greet.nodeC"


def test_krt_nats_inputs_alone_makes_a_3x_node():
    # The original's end-to-end set-up: no v2-only variables (entrypoint subject, is-last-node).
    s = Settings.from_env({**BASE, "KRT_NATS_INPUTS": INPUTS})
    assert s.generation == "v3"
    assert s.input_subjects == ("runtime1_greeter-v1_Greet.nodeA", "runtime1_greeter-v1_Greet.nodeC")
    assert s.consumer_name == "greeter-v1-exitpoint"  # as v2: {KRT_VERSION}-{KRT_NODE_NAME}
    assert s.js_request_timeout == 30.0 and s.max_ack_pending == -1
    assert s.entrypoint_subject is None and not s.is_last_node
    assert "KRT_NATS_INPUTS is set" in s.generation_reason and "\n" not in s.generation_reason


def test_krt_nats_input_alone_keeps_v2():
    s = Settings.from_env({**BASE, "KRT_NATS_INPUT": "runtime1_greeter-v1_Greet.nodeA"})
    assert s.generation == "v2" and s.input_subjects == ("runtime1_greeter-v1_Greet.nodeA",)
    assert s.js_request_timeout == 5.0
    assert "KRT_NATS_INPUT is set" in s.generation_reason


def test_3x_variables_are_read():
    s = Settings.from_env({**BASE, "KRT_NATS_INPUTS": INPUTS, "KRT_NATS_MAX_ACK_PENDING": "100",
                           "KRT_JS_REQUEST_TIMEOUT": "1500"})
    assert s.max_ack_pending == 100 and s.js_request_timeout == 1.5


def test_both_generations_set_is_one_clear_error():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "KRT_NATS_INPUTS": INPUTS, "KRT_NATS_INPUT": "runtime1_greeter-v1_Greet.nodeA"})
    [problem] = caught.value.problems
    assert problem.startswith("KRT_NATS_INPUT and KRT_NATS_INPUTS are both set")
    assert "unset the one of the other generation" in problem


def test_neither_generation_set_names_both_variables():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(BASE)
    [problem] = caught.value.problems
    assert problem.startswith("KRT_NATS_INPUT is not set") and "KRT_NATS_INPUTS" in problem


@pytest.mark.parametrize(("value", "says"), [
    ("a.b,c.*", "is invalid: expected subjects without wildcards"),
    ("a.b,,c.d", "is invalid"),
    ("a.b,a.b", "names a subject twice"),
])
def test_bad_inputs_are_named(value, says):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "KRT_NATS_INPUTS": value})
    [problem] = caught.value.problems
    assert problem.startswith("KRT_NATS_INPUTS=") and says in problem


@pytest.mark.parametrize(("name", "value"), [("KRT_NATS_MAX_ACK_PENDING", "0"), ("KRT_JS_REQUEST_TIMEOUT", "-5")])
def test_bad_3x_numbers_are_named(name, value):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "KRT_NATS_INPUTS": INPUTS, name: value})
    [problem] = caught.value.problems
    assert problem.startswith(f"{name}={value!r} is invalid")


V3_MODULE = """
    async def default_handler(ctx, data):
        await ctx.send_output(data)

    def handle_a(ctx, data):
        pass

    custom_handlers = {"nodeA": handle_a}
"""
V2_MODULE = """
    def handler(ctx, data):
        return data
"""


def _write(tmp_path, source: str):
    path = tmp_path / "h.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_a_3x_module_loads_with_its_routes(tmp_path):
    _write(tmp_path, V3_MODULE)
    code = load_user_code(tmp_path, "h.py", "v3")
    assert code.generation == "v3" and code.handler.__name__ == "default_handler" and code.handler_is_async
    assert list(code.custom_handlers) == ["nodeA"] and not code.batch


def test_a_3x_module_in_a_v2_node_says_what_is_expected(tmp_path):
    _write(tmp_path, V3_MODULE)
    with pytest.raises(HandlerLoadError, match=r"is a KRE 3.x handler module \(default_handler\) but this node "
                                               r"speaks KRE v2 \(KRT_NATS_INPUT is set\)"):
        load_user_code(tmp_path, "h.py")


def test_a_v2_module_in_a_3x_node_says_what_is_expected(tmp_path):
    _write(tmp_path, V2_MODULE)
    with pytest.raises(HandlerLoadError, match=r"defines no function default_handler\(ctx, data\), which a KRE 3.x "
                                               r"node \(KRT_NATS_INPUTS is set\) calls: it is a KRE v2 module"):
        load_user_code(tmp_path, "h.py", "v3")


def test_custom_handlers_must_map_node_names_to_functions(tmp_path):
    _write(tmp_path, "def default_handler(ctx, data):\n    pass\ncustom_handlers = {'nodeA': 3}\n")
    with pytest.raises(HandlerLoadError, match="custom_handlers must be a dict of upstream node name -> handler"):
        load_user_code(tmp_path, "h.py", "v3")


def test_both_envelopes_live_in_one_process():
    # Same message name, no package in either proto: the v3 copy is compiled with a package so the default
    # descriptor pool holds both. A fresh interpreter, so the import order is that of a real node.
    code = ("from kre_runner.proto import kre_nats_msg_pb2 as a, kre_nats_msg_v3_pb2 as b; "
            "print(a.KreNatsMessage.DESCRIPTOR.full_name, b.KreNatsMessage.DESCRIPTOR.full_name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["KreNatsMessage", "kre.v3.KreNatsMessage"]


def test_the_v3_codec_reads_the_original_wire_format_gzipped_and_bounded():
    # Field numbers of kre_nats_msg_v3.proto: request_id 1, payload 2, error 3, from_node 4, message_type 5.
    wire = b"\x0a\x03r-1" + b"\x1a\x04oops" + b"\x22\x05nodeA" + b"\x28\x02"
    env = decode_v3(gzip.compress(wire))
    assert (env.request_id, env.error, env.from_node, env.message_type) == ("r-1", "oops", "nodeA", MessageType.ERROR)
    big = KreNatsMessageV3(request_id="r", error="x" * 4_000_000)
    data = encode(big, 1024 * 1024)
    assert data[:2] == b"\x1f\x8b"
    with pytest.raises(EnvelopeError, match="KRT_MAX_INFLATED_BYTES"):
        decode_v3(data, 1024 * 1024)
    assert decode_v3(data, 8 * 1024 * 1024).error == big.error
    with pytest.raises(EnvelopeError, match="not a KRE 3.x KreNatsMessage"):
        decode_v3(b"\x0a\xff")
    assert decode(b"") is not None  # v2's decoder untouched


def test_the_3x_timing_point():
    lines: list[str] = []
    s = Settings.from_env({**BASE, "KRT_NATS_INPUTS": INPUTS})
    record = ElapsedRecorderV3(s, lines.append)
    record(KreNatsMessageV3(from_node="node A"), 10.0, 10.25, True)
    record(KreNatsMessageV3(from_node=""), 10.0, 10.5, False)
    first, second = lines
    assert first.startswith("node_elapsed_time,from_node=node\\ A,node=exitpoint,version=greeter-v1,workflow=Greet "
                            "elapsed_ms=250.000,success=true ")
    assert first.rsplit(" ", 1)[1].isdigit()
    assert "from_node=unknown" in second and "success=false" in second


@pytest.mark.parametrize(("version", "inputs", "refused"), [
    ("2.9.21", INPUTS, True), ("2.10.0", INPUTS, False), ("2.11.3-beta", INPUTS, False),
    ("2.8.4", "runtime1_greeter-v1_Greet.nodeA", False),  # one input: filter_subject, which 2.8 has
])
def test_several_inputs_need_nats_server_2_10(version, inputs, refused):
    from types import SimpleNamespace

    from kre_runner.errors import SetupError
    from kre_runner.node.setup import _check_server_version

    s = Settings.from_env({**BASE, "KRT_NATS_INPUTS": inputs})
    nc = SimpleNamespace(_server_info={"version": version})
    if refused:
        with pytest.raises(SetupError, match=r"nats-server 2.9.21 cannot give one consumer several subjects .* it "
                                             r"needs nats-server 2.10.0 or later"):
            _check_server_version(nc, s)  # type: ignore[arg-type]
    else:
        _check_server_version(nc, s)  # type: ignore[arg-type]
