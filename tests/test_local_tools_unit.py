"""The pieces of the local tools that need no server: workflow YAML, JSON ↔ protobuf, subjects, MemoryDB."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from kre_helpers import HANDLERS, PROTOS

from kre_runner.dev.messages import MessageTypeError, find_message_type, from_json, parse_json_inputs, to_json
from kre_runner.dev.workflow import WorkflowError, load_workflow
from kre_runner.nats.streams import subject_in
from kre_runner.testing import MemoryDB


def _yaml(tmp_path: Path, text: str) -> Path:
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text("def handler(ctx, data):\n    return None\n")
    path = tmp_path / "wf.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_node_environment_is_what_the_manager_gives_each_pod(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("def go(ctx, data):\n    return None\n")
    wf = load_workflow(_yaml(tmp_path, """
        workflow: greeter
        runtime: rt
        env: {KRT_LOG_LEVEL: DEBUG, KRT_MAX_INFLIGHT: 8}
        nodes:
          - {name: first, handler: a.py}
          - {name: middle, handler: "sub/c.py:go", base_path: ., env: {KRT_HANDLER_THREADS: 2, X: true}}
          - {name: last, handler: b.py, replicas: 2}
    """))
    assert wf.stream == "rt-v1-greeter" and wf.input_subject == "rt-v1-greeter.first"
    first, middle, last = (wf.node_env(n, "nats://h:1") for n in wf.nodes)
    assert first["KRT_NATS_INPUT"] == "rt-v1-greeter.first" and first["KRT_NATS_OUTPUT"] == "rt-v1-greeter.middle"
    assert first["KRT_IS_LAST_NODE"] == "false" and first["KRT_BASE_PATH"] == str(tmp_path)
    assert middle["KRT_HANDLER_PATH"] == "sub/c.py:go" and middle["KRT_BASE_PATH"] == str(tmp_path)
    assert middle["KRT_HANDLER_THREADS"] == "2" and middle["X"] == "true" and middle["KRT_MAX_INFLIGHT"] == "8"
    assert last["KRT_NATS_OUTPUT"] == "rt-v1-greeter.entrypoint" and last["KRT_IS_LAST_NODE"] == "true"
    assert last["KRT_NATS_ENTRYPOINT_SUBJECT"] == "rt-v1-greeter.entrypoint"
    assert {first["KRT_VERSION"], first["KRT_NATS_SERVER"], first["KRT_WORKFLOW_NAME"]} == {"v1", "nats://h:1",
                                                                                            "greeter"}
    assert wf.nodes[2].replicas == 2


def test_every_problem_of_a_workflow_is_reported_at_once(tmp_path):
    with pytest.raises(WorkflowError) as caught:
        load_workflow(_yaml(tmp_path, """
            workflow: my flow
            extra: 1
            nodes:
              - {name: a, handler: a.py}
              - {name: a, handler: b.py, replicas: -1, colour: red}
              - {name: entrypoint, handler: nope.py}
              - {handler: a.py}
        """))
    problems = caught.value.problems
    assert "workflow: 'my flow' is invalid: expected letters, digits, - or _ (it names subjects)" in problems
    assert any("unknown key 'extra'" in p for p in problems)
    assert any("name 'a' is used twice" in p for p in problems)
    assert any("node 'a': unknown key 'colour'" in p for p in problems)
    assert any("node 'a': replicas: -1 is invalid" in p for p in problems)
    assert any("nope.py does not exist" in p for p in problems)
    assert any("cannot be called 'entrypoint'" in p for p in problems)
    assert any("nodes[4].name: is missing" in p for p in problems)


def test_json_inputs_are_one_value_or_json_lines():
    assert parse_json_inputs('{"a": 1}', "--json") == [{"a": 1}]
    assert parse_json_inputs('{\n  "a": 1\n}', "--json") == [{"a": 1}]  # pretty-printed is one value
    assert parse_json_inputs('{"a": 1}\n\n{"a": 2}\n', "--json") == [{"a": 1}, {"a": 2}]
    with pytest.raises(MessageTypeError, match="--file x line 2 is not valid JSON"):
        parse_json_inputs('{"a": 1}\n{"a": \n', "--file x")


def test_message_types_by_short_full_or_module_name_and_json_both_ways():
    request = find_message_type("Request", [PROTOS])
    assert find_message_type("greeter_pb2.Request", [PROTOS]) is request
    message = from_json({"name": "Ann"}, request)
    assert to_json(message) == '{"name": "Ann"}'
    assert to_json(request()) == '{"name": ""}'  # every field shown, defaults included
    from google.protobuf.any_pb2 import Any

    packed = Any()
    packed.Pack(message)
    assert to_json(packed) == '{"name": "Ann"}'  # an Any of a known type is unpacked
    packed.type_url = "type.googleapis.com/unknown.Thing"
    assert to_json(packed).startswith('{"@type": "type.googleapis.com/unknown.Thing", "value": ')
    with pytest.raises(MessageTypeError, match="no field named"):
        from_json({"nam": "x"}, request)


@pytest.mark.parametrize(("subject", "patterns", "captured"), [
    ("s.a", ["s.*"], True), ("s.a.b", ["s.*"], False), ("s.a.b", ["s.>"], True), ("t.a", ["s.*"], False),
    ("s", ["s.>"], False), ("s.a", ["x", "s.a"], True),
])
def test_subject_in(subject, patterns, captured):
    assert subject_in(subject, patterns) is captured


async def test_memory_db_finds_as_the_handler_expects():
    db = MemoryDB()
    for name, score in (("a", 2), ("b", 1), ("a", 3)):
        await db.save("c", {"name": name, "score": score})
    assert await db.find("c", {"name": "a"}, projection={"_id": 0, "score": 1}, sort=[("score", -1)]) == [
        {"score": 3}, {"score": 2}]
    assert await db.find("c", {"name": "a"}, sort="score", limit=1) == [{"name": "a", "score": 2}]
    assert db["c"][1] == {"name": "b", "score": 1} and db["missing"] == []
    with pytest.raises(ValueError, match="non-empty dict"):
        await db.find("c", {})


def test_scripts_test_says_how_to_provide_victoria_metrics_where_it_cannot_install_it(tmp_path):
    """A machine without apt-get (macOS, other Linux): one line saying what to do, exit 1, no crash."""
    import os
    import shutil
    import subprocess

    bin_dir = tmp_path / "bin"  # what such a machine has: a shell and Python, no apt-get, no victoria-metrics
    bin_dir.mkdir()
    for tool in ("bash", "env", "dirname", "id", "python3"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    script = Path(__file__).parents[1] / "scripts" / "test"
    proc = subprocess.run([str(bin_dir / "bash"), str(script)], env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "victoria-metrics is not on PATH" in proc.stderr
    assert "KRE_TEST_INFLUX_URL" in proc.stderr and "command not found" not in proc.stderr


# ------------------------------------------------------------------ run-once: every handler shape as `run`

async def _run_once(handler: str, *names: str) -> tuple[int, list[str], str]:
    """run_once in this process: (exit code, stdout lines, stderr)."""
    import gc
    import io
    import warnings

    from greeter_pb2 import Request

    from kre_runner.dev.run_once import run_once
    from kre_runner.handler import load_user_code

    code = load_user_code(HANDLERS, handler)
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = await run_once(code, [Request(name=name) for name in names], out, err, env={})
        gc.collect()  # an un-awaited coroutine warns when it is collected
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    return result, out.getvalue().splitlines(), err.getvalue()


async def test_run_once_sends_a_sync_handlers_early_reply_as_run_does():
    code, out, err = await _run_once("early.py", "Ann")
    assert code == 0 and out == ['{"greeting": "late Ann"}']
    assert 'early reply: {"greeting": "early Ann"}' in err
    code, out, err = await _run_once("early.py", "twice")  # as in a node: one early reply per request
    assert code == 1 and "RuntimeError: an early reply was already sent for this request" in err
    code, out, err = await _run_once("early_async.py", "Bo")
    assert code == 0 and out == ['{"greeting": "late Bo"}'] and 'early reply: {"greeting": "early Bo"}' in err


async def test_run_once_early_exit_and_a_too_large_early_reply_behave_as_in_a_node():
    code, out, err = await _run_once("faults.py", "exit", "early-too-large")
    assert code == 0, err
    assert out == ['{"greeting": "left early"}', '{"greeting": "answered after EnvelopeError"}']
    assert "early exit" in err


async def test_run_once_runs_a_batch_handler_with_one_input_as_run_does():
    code, out, err = await _run_once("batch.py", "a", "tracking", "early", "none")
    assert code == 0, err
    assert out[0] == '{"greeting": "ok a"}' and out[3] == "null"
    assert out[1].startswith('{"greeting": "') and out[1] != '{"greeting": ""}'  # the input's tracking id
    assert out[2] == ('{"greeting": "ctx.early_reply acts on one message: it is not available in a batch '
                      'handler"}')
    code, out, err = await _run_once("batch.py", "exc1")  # an Exception item fails its input
    assert code == 1 and "ValueError: bad exc1" in err
    code, out, err = await _run_once("batch.py:classify_async", "b")
    assert code == 0 and out == ['{"greeting": "ok b"}'], err


def test_the_readme_first_screen_is_what_scripts_first_screen_test_walks():
    """The extraction itself (the walk on a fresh venv is scripts/first-screen-test, run by .ci/run)."""
    import importlib.machinery
    import importlib.util
    import sys

    root = Path(__file__).parents[1]
    loader = importlib.machinery.SourceFileLoader("first_screen", str(root / "scripts" / "first-screen-test"))
    spec = importlib.util.spec_from_loader("first_screen", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["first_screen"] = module
    try:
        loader.exec_module(module)
        steps = module.steps((root / "README.md").read_text(encoding="utf-8"))
    finally:
        del sys.modules["first_screen"]
    commands = [step.command.split()[0:2] for step in steps]
    assert ["pip", "install"] in commands and ["pytest", "-q"] in commands
    install = next(step.command for step in steps if step.command.startswith("pip install"))
    assert "[testing]" in install and "[test]" not in install  # the user's extra, not CI's tools
    assert [step.command.split()[1] for step in steps if step.command.startswith("kre-runner")] == [
        "run-once", "up", "call"]
    assert sum(step.background for step in steps) == 1
    call = next(step for step in steps if step.command.startswith("kre-runner call"))
    assert module.matches(call.expected[0], "kre-runner call: tracking id 7dab9f5e-c0ce-43c7-8be4-b3ac1eac7e54")
    assert not module.matches("1 passed in …s", "1 passed, 1 warning in 0.63s")
