"""The local loop for KRE 3.x workflows (issue 18 item 4, issue 19 item 3): workflow files with inputs:, up, call,
config on a workflow file, the example workflow, as a user runs them."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from test_local_tools import Up, kre

from kre_runner.config import Settings
from kre_runner.dev.workflow import WorkflowError, load_workflow

EXAMPLE = Path(__file__).parents[1] / "examples" / "v3"

GREET = """
workflow: Greet
runtime: runtime1
version: greeter-v1
nodes:
  - {name: nodeA, handler: h.py, inputs: [entrypoint]}
  - {name: nodeB, handler: h.py, inputs: [nodeA.left]}
  - {name: exitpoint, handler: h.py, inputs: [nodeA, nodeB]}
"""


def _file(tmp_path: Path, text: str) -> Path:
    (tmp_path / "h.py").write_text("async def default_handler(ctx, data):\n    await ctx.send_output(data)\n")
    path = tmp_path / "workflow.yaml"
    path.write_text(text)
    return path


def test_a_node_with_inputs_makes_the_file_3x_laid_out_as_the_manager_does(tmp_path):
    workflow = load_workflow(_file(tmp_path, GREET))
    assert workflow.generation == "v3" and workflow.stream == "runtime1_greeter-v1_Greet"
    assert workflow.stream_subjects == ["runtime1_greeter-v1_Greet.*", "runtime1_greeter-v1_Greet.nodeA.*",
                                        "runtime1_greeter-v1_Greet.nodeB.*", "runtime1_greeter-v1_Greet.exitpoint.*"]
    assert (workflow.input_subject, workflow.answer_subject) == ("runtime1_greeter-v1_Greet.entrypoint",
                                                                 "runtime1_greeter-v1_Greet.exitpoint")
    envs = {node.name: workflow.node_env(node, "nats://127.0.0.1:4222") for node in workflow.nodes}
    s = "runtime1_greeter-v1_Greet"
    assert envs["nodeA"]["KRT_NATS_INPUTS"] == f"{s}.entrypoint" and envs["nodeA"]["KRT_NATS_OUTPUT"] == f"{s}.nodeA"
    assert envs["nodeB"]["KRT_NATS_INPUTS"] == f"{s}.nodeA.left"
    assert envs["exitpoint"]["KRT_NATS_INPUTS"] == f"{s}.nodeA,{s}.nodeB"
    assert envs["exitpoint"]["KRT_NATS_OUTPUT"] == f"{s}.exitpoint"
    assert envs["nodeA"]["KRT_NATS_KEY_VALUE_STORE_PROJECT"] == "key-store_runtime1_greeter-v1"
    assert envs["nodeA"]["KRT_NATS_KEY_VALUE_STORE_WORKFLOW"] == "key-store_runtime1_greeter-v1_Greet"
    assert envs["nodeA"]["KRT_NATS_KEY_VALUE_STORE_NODE"] == "key-store_runtime1_greeter-v1_Greet_nodeA"
    assert envs["nodeA"]["KRT_NATS_OBJECT_STORE"] == "object-store_runtime1_greeter-v1_Greet"
    for env in envs.values():
        assert "KRT_NATS_INPUT" not in env and "KRT_IS_LAST_NODE" not in env
        settings = Settings.from_env(env)  # what the node itself will read: a 3.x node with every bucket
        assert settings.generation == "v3" and len(settings.configuration_buckets) == 3 and settings.object_store


def test_a_v2_file_gets_the_buckets_when_it_asks(tmp_path):
    plain = load_workflow(_file(tmp_path, "workflow: wf\nnodes: [{name: a, handler: h.py}]\n"))
    assert plain.generation == "v2" and not plain.buckets(plain.nodes[0])
    asked = load_workflow(_file(tmp_path, "workflow: wf\nconfiguration: true\nobject_store: true\n"
                                          "nodes: [{name: a, handler: h.py}]\n"))
    env = asked.node_env(asked.nodes[0], "nats://x:4222")
    assert env["KRT_NATS_KEY_VALUE_STORE_NODE"] == "key-store_local_v1_wf_a"
    assert env["KRT_NATS_OBJECT_STORE"] == "object-store_local_v1_wf" and env["KRT_NATS_INPUT"] == "local-v1-wf.a"


@pytest.mark.parametrize(("text", "message"), [
    (GREET.replace("[nodeA, nodeB]", "[nodeA, nodeC]"), "input 'nodeC' names no node"),
    (GREET.replace(", inputs: [nodeA.left]", ""), "nodes nodeB have no inputs"),
    (GREET.replace("name: exitpoint", "name: last"), "no node is called 'exitpoint'"),
    (GREET.replace("[nodeA.left]", "[nodeB]"), "input 'nodeB' is its own output"),
    (GREET.replace("[nodeA.left]", "[nodeA..x]"), "inputs: ['nodeA..x'] is invalid"),
])
def test_a_bad_3x_file_is_named_in_one_line(tmp_path, text, message):
    with pytest.raises(WorkflowError) as caught:
        load_workflow(_file(tmp_path, text))
    assert message in str(caught.value), str(caught.value)
    called = kre("call", str(tmp_path / "workflow.yaml"), "--json", "{}")
    assert called.returncode == 2 and message in called.stderr, called.stderr


def _all(workflow: Path, text: str) -> list[dict]:
    proc = kre("call", str(workflow), "--all", "--json", json.dumps({"text": text}))
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.integration
def test_up_runs_the_3x_example_call_answers_config_and_objects_work(tmp_path):
    example = tmp_path / "v3"
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("__pycache__", "test_*"))
    workflow = example / "workflow.yaml"
    up = Up(str(workflow))
    try:
        up.wait_for("is ready")
        assert "stream demo_v1_words (created, subjects demo_v1_words.* demo_v1_words.splitter.*" in up.output
        assert "key-store_demo_v1_words_splitter" in up.output and "object-store_demo_v1_words" in up.output
        assert "ready: reads demo_v1_words.splitter.loud, writes demo_v1_words.shouter" in up.output, up.output
        one = kre("call", str(workflow), "--json", '{"text": "hello kre three"}')
        assert one.returncode == 0, one.stderr
        answer = json.loads(one.stdout)
        assert answer["words"] == 3 and answer["source"] in ("splitter", "shouter"), answer
        # Every envelope of the request, per node and channel: fan-out, the channel, fan-in.
        seen = {(e["node"], e["channel"], e["message_type"], e["payload"].get("source", "")) for e in _all(
            workflow, "a b")}
        assert seen == {("splitter", "", "OK", "splitter"), ("splitter", "loud", "OK", ""),
                        ("shouter", "", "OK", "shouter"), ("exitpoint", "", "OK", "splitter"),
                        ("exitpoint", "", "OK", "shouter")}, seen
        # Live configuration through the workflow file: the splitter sees it within a second.
        set_ = kre("config", "set", str(workflow), "prefix", ">> ")
        assert set_.returncode == 0, set_.stderr
        got = kre("config", "get", str(workflow), "prefix", "--node", "splitter")
        assert got.returncode == 0 and got.stdout == ">> \n", (got.stdout, got.stderr)
        deadline = time.monotonic() + 5
        while True:
            texts = [e["payload"]["text"] for e in _all(workflow, "x y") if e["node"] == "splitter" and not
                     e["channel"]]
            if texts == [">> x y"] or time.monotonic() > deadline:
                break
        assert texts == [">> x y"]
        # An upstream error reaches the exitpoint's handler, which answers with an ERROR: exit 1, its text.
        bad = kre("call", str(workflow), "--json", '{"text": " "}')
        assert bad.returncode == 1 and "Error in node 'exitpoint' executing handler for node 'splitter': upstream " \
            "failed" in bad.stderr, bad.stderr
        unknown = kre("config", "get", str(workflow), "prefix", "--node", "nope")
        assert unknown.returncode == 2 and "no node 'nope'" in unknown.stderr, unknown.stderr
    finally:
        code = up.stop()
    assert code == 0, up.output
