"""The local tools as a user runs them, as processes: up, call, run-once, check, stream create, the plugin."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from kre_helpers import HANDLERS, PROTOS, STREAM, node_env, running_node

from kre_runner.dev.up import state_file

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).parents[1] / "examples"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRT_")}
    if "PYTHONPATH" in extra and env.get("PYTHONPATH"):  # keep the code under test (a checkout's src/) first
        extra["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], extra["PYTHONPATH"]])
    env.update(extra)
    return env


def kre(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kre_runner", *args], env=env or _env(), cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


async def akre(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """``kre`` without blocking the event loop (a node runs in it)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "kre_runner", *args, env=env or _env(),
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


class Up:
    """``kre-runner up`` in the background, its output collected line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kre_runner", "up", *args], env=_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines[after:]):
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"up exited with {self.proc.returncode} before {text!r}:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not printed within {timeout}s:\n{self.output}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"up did not stop within {timeout}s:\n{self.output}") from None
        self._reader.join(5)
        return self.proc.returncode


def _workflow(tmp_path: Path, yaml: str, **handlers: str) -> Path:
    shutil.copy(PROTOS / "greeter_pb2.py", tmp_path / "greeter_pb2.py")
    for name, code in handlers.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))
    path = tmp_path / "workflow.yaml"
    path.write_text(textwrap.dedent(yaml))
    return path


ECHO = """
    import os
    from greeter_pb2 import Request, Response

    def handler(ctx, data):
        request = Request()
        data.Unpack(request)
        if request.name == "boom":
            raise ValueError("no boom here")
        return Response(greeting=f"{request.name} pid={os.getpid()} port={os.environ['KRT_HTTP_PORT']} "
                                 f"threads={os.environ.get('KRT_HANDLER_THREADS')} "
                                 f"host={os.environ.get('KRT_HTTP_HOST')}")
"""
SHOUT = """
    from greeter_pb2 import Response

    async def shout(ctx, data):
        response = Response()
        data.Unpack(response)
        return Response(greeting=response.greeting.upper())
"""


def _pids_alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.add(pid)
        except ProcessLookupError:
            pass
    return alive


def test_up_runs_the_workflow_call_answers_and_ctrl_c_stops_everything(tmp_path):
    workflow = _workflow(tmp_path, """
        workflow: wf
        request: {type: Request, example: {name: Ann}}
        nodes:
          - name: echo
            handler: echo.py
            env: {KRT_HANDLER_THREADS: "2"}
            replicas: 3
          - name: shout
            handler: shout.py:shout
    """, echo=ECHO, shout=SHOUT)
    up = Up(str(workflow))
    try:
        up.wait_for("is ready")
        assert "kre-runner call" in up.output and "--type Request --json '{\"name\": \"Ann\"}'" in up.output
        # Quiet start: one line per node process (what it reads and writes, its metrics), the rest in its log file.
        for label in ("echo#1", "echo#2", "echo#3", "shout "):
            lines = [line for line in up.lines if line.startswith(label)]
            reads = "local-v1-wf.shout" if label == "shout " else "local-v1-wf.echo"
            assert len(lines) == 1 and f"ready: reads {reads}" in lines[0] and "/metrics" in lines[0], up.output
        assert "duplicate window" not in up.output and up.output.count("/readyz") == 4, up.output
        log = (state_file(workflow).with_suffix("") / "echo-1.log").read_text()
        assert "consuming local-v1-wf.echo" in log and "node echo ready" in log, log
        one = kre("call", str(workflow), "--json", '{"name": "Ann"}')
        assert one.returncode == 0, one.stderr
        assert json.loads(one.stdout)["greeting"].startswith("ANN PID=")
        lines = "\n".join(json.dumps({"name": f"n{i}"}) for i in range(60))
        many = kre("call", str(workflow), "--type", "Request", "--file", "-", stdin=lines)
        assert many.returncode == 0, many.stderr
        answers = [json.loads(line)["greeting"] for line in many.stdout.splitlines()]
        assert [a.split()[0] for a in answers] == [f"N{i}" for i in range(60)]  # in order, one each
        ports = {a.split("PID=")[1].split()[0]: a.split("PORT=")[1].split()[0] for a in answers}
        assert all("THREADS=2" in a for a in answers)
        assert all("HOST=127.0.0.1" in a for a in answers)  # up keeps the nodes' endpoints off the network
        error = kre("call", str(workflow), "--json", '{"name": "boom"}')
        assert error.returncode == 1
        assert error.stderr.strip().splitlines()[-1] == "error in 'echo': no boom here"
        assert "echo#1 | " in up.output and "shout  | " in up.output  # each line says which node
    finally:
        code = up.stop(signal.SIGINT)
    assert code == 0, up.output
    assert "kre-runner up: stopped" in up.output
    assert len(set(ports.values())) == len(ports) >= 2, ports  # replicas never share a port
    assert not _pids_alive({int(p) for p in ports}), "node processes must be stopped"
    assert not state_file(workflow).exists()
    after = kre("call", str(workflow), "--json", '{"name": "Ann"}')
    assert after.returncode == 1 and "is not running: start it with `kre-runner up" in after.stderr


def test_up_reload_restarts_a_node_when_its_file_changes(tmp_path):
    handler = """
        from greeter_pb2 import Request, Response

        def handler(ctx, data):
            return Response(greeting="VERSION")
    """
    workflow = _workflow(tmp_path, """
        workflow: wf
        nodes: [{name: only, handler: only.py}]
    """, only=handler.replace("VERSION", "first"))
    up = Up(str(workflow), "--reload")
    try:
        up.wait_for("is ready")
        first = kre("call", str(workflow), "--type", "Request", "--json", "{}")
        assert json.loads(first.stdout) == {"greeting": "first"}, first.stderr
        (tmp_path / "up.log").write_text("what the node or its user writes next to the code")
        time.sleep(1.5)  # three polls: files other than Python ones never restart a node
        assert "restarting" not in up.output
        mark = len(up.lines)
        (tmp_path / "only.py").write_text(textwrap.dedent(handler.replace("VERSION", "second")))
        up.wait_for("only.py changed: restarting only", after=mark)
        second = kre("call", str(workflow), "--type", "Request", "--json", "{}", "--timeout", "30")
        assert json.loads(second.stdout) == {"greeting": "second"}, second.stderr + up.output
        # A broken edit keeps up running (it waits for the next change) instead of stopping everything.
        mark = len(up.lines)
        (tmp_path / "only.py").write_text("def handler(ctx, data)\n")
        up.wait_for("waiting for a change to its files", after=mark)
        assert up.proc.poll() is None
    finally:
        assert up.stop(signal.SIGTERM) == 0, up.output


def test_up_on_a_given_nats_server_leaves_it_and_the_stream_running(tmp_path, nats_server):
    workflow = _workflow(tmp_path, """
        workflow: wf
        runtime: mine
        nodes: [{name: echo, handler: echo.py}]
    """, echo=ECHO)
    up = Up(str(workflow), "--nats", nats_server.url)
    try:
        up.wait_for("is ready")
        assert f"stream mine-v1-wf (created, subjects mine-v1-wf.*) on {nats_server.url}" in up.output
        proc = kre("call", str(workflow), "--type", "Request", "--json", '{"name": "Di"}')
        assert proc.returncode == 0 and json.loads(proc.stdout)["greeting"].startswith("Di pid="), proc.stderr
    finally:
        assert up.stop() == 0, up.output
    deployed = ["--nats", nats_server.url, "--stream", "mine-v1-wf", "--subject", "mine-v1-wf.echo",
                "--proto-path", str(tmp_path), "--type", "Request", "--json", "{}", "--timeout", "1"]
    after = kre("call", *deployed)  # the server and the stream outlive up; no node answers any more
    assert after.returncode == 1 and "got no answer" in after.stderr


def test_up_stops_with_exit_1_when_a_node_cannot_start(tmp_path):
    workflow = _workflow(tmp_path, """
        workflow: wf
        nodes: [{name: broken, handler: broken.py}]
    """, broken="def handler(ctx, data)\n")
    up = Up(str(workflow))
    code = up.proc.wait(60)
    up._reader.join(5)
    assert code == 1, up.output
    assert "broken | " in up.output and "cannot start: syntax error in" in up.output
    assert "node broken exited with code 1" in up.output


@pytest.mark.parametrize(("yaml", "message"), [
    (None, "no such file"),
    ("workflow: wf\nnodes: [\n", "not valid YAML at line"),
    ("workflow: wf\nnode: []\n", "unknown key 'node'"),
    ("workflow: wf\nnodes: [{name: a, handler: missing.py}]\n", "handler file"),
    ("workflow: 'w f'\nnodes: [{name: a, handler: a.py, replicas: 0}]\n", "replicas: 0 is invalid"),
])
def test_up_and_call_report_a_bad_workflow_file_in_one_line_with_exit_2(tmp_path, yaml, message):
    path = tmp_path / "workflow.yaml"
    if yaml is not None:
        (tmp_path / "a.py").write_text("def handler(ctx, data):\n    return None\n")
        path.write_text(yaml)
    for command in (["up", str(path)], ["call", str(path), "--type", "Request", "--json", "{}"]):
        proc = kre(*command)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and str(path) in proc.stderr
        assert "Traceback" not in proc.stderr


def test_the_demo_is_up_on_the_example_workflow_yaml():
    proc = kre("demo", "--requests", "30", "--no-services", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "through greeter -> decorator" in proc.stdout and "workflow.yaml" in proc.stdout
    assert "30/30 replies (30 matched by tracking id, 0 errors)" in proc.stdout
    assert "greeter   | " in proc.stdout  # the nodes' logs, prefixed by up
    missing = kre("demo", "--examples", "/nonexistent")
    assert missing.returncode == 2 and "workflow.yaml not found" in missing.stdout + missing.stderr


async def test_call_a_deployed_workflow_by_nats_stream_and_subject(nats_server, js, workflow_stream):
    env = node_env(nats_server.url, "outcomes.py", KRT_NATS_OUTPUT=f"{STREAM}.entrypoint")
    base = ["call", "--nats", nats_server.url, "--stream", STREAM, "--subject", f"{STREAM}.greeter",
            "--proto-path", str(PROTOS), "--type", "Request"]
    async with running_node(env, js):
        code, out, err = await akre(*base, "--json", '{"name": "Ann"}')
        assert code == 0, err
        assert json.loads(out) == {"greeting": "Hello, Ann!"}
        code, out, err = await akre(*base, "--json", '{"name": "boom"}')
        assert code == 1 and err.strip().splitlines() == [f"kre-runner call: tracking id {err.split()[4]}",
                                                          "error in 'greeter': cannot greet boom"]
        code, out, err = await akre(*base, "--json", '{"name": "skip"}', "--timeout", "1")
        assert code == 1 and "got no answer on demo-v1-wf.entrypoint within 1s" in err
        code, out, err = await akre(*base[:-1], "greeter_pb2.Response", "--json", '{"name": "x"}')
        assert code == 2 and "has no field named \"name\"" in err and "\n" not in err.strip()
        code, out, err = await akre(*base[:-1], "Nope", "--json", "{}")
        assert code == 2 and "--type Nope: no such message" in err and "known: Request, Response" in err
        code, out, err = await akre(*base, "--json", "{name")
        assert code == 2 and "--json is not valid JSON" in err
        code, out, err = await akre(*base, "--file", "/nonexistent.json")
        assert code == 2 and "--file /nonexistent.json: No such file or directory" in err
    code, out, err = await akre("call", "--nats", "nats://127.0.0.1:1", "--stream", STREAM, "--subject",
                                f"{STREAM}.greeter", "--proto-path", str(PROTOS), "--type", "Request", "--json", "{}")
    assert code == 1 and "cannot connect to NATS at nats://127.0.0.1:1" in err
    code, out, err = await akre("call", "--nats", nats_server.url, "--stream", "nostream", "--subject", "nostream.a",
                                "--proto-path", str(PROTOS), "--type", "Request", "--json", "{}")
    assert code == 1 and "no stream captures nostream.a" in err


def test_run_once_runs_init_once_then_each_input_and_prints_json(tmp_path):
    env = _env(PYTHONPATH=str(PROTOS))
    one = kre("run-once", str(HANDLERS / "greet.py"), "--type", "Request", "--json", '{"name": "Ann"}', env=env)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["greeting"].startswith("Hello, Ann! init=1 pid=")
    lines = '{"name": "a"}\n\n{"name": "b"}\n'
    many = kre("run-once", str(HANDLERS / "greet.py"), "--type", "Request", "--file", "-", stdin=lines, env=env)
    assert [json.loads(line)["greeting"].split(" pid=")[0] for line in many.stdout.splitlines()] == [
        "Hello, a! init=1", "Hello, b! init=1"]
    errors = kre("run-once", str(HANDLERS / "outcomes.py"), "--type", "Request", "--file", "-", env=env,
                 stdin='{"name": "Bo"}\n{"name": "boom"}\n{"name": "skip"}\n{"name": "pass"}\n')
    assert errors.returncode == 1
    assert errors.stdout.splitlines() == ['{"greeting": "Hello, Bo!"}', "null", '{"name": "pass"}']
    assert "handler on input 2 failed:" in errors.stderr and 'outcomes.py", line 11, in handler' in errors.stderr
    assert "ValueError: cannot greet boom" in errors.stderr and "run_once.py" not in errors.stderr
    function = kre("run-once", f"{PROTOS / 'decorator.py'}:handler", "--type", "Response", "--json",
                   '{"greeting": "hi"}')
    assert function.returncode == 0 and json.loads(function.stdout) == {"greeting": "✨ hi ✨"}


def test_run_once_reports_bad_input_with_exit_2():
    env = _env(PYTHONPATH=str(PROTOS))
    greet = str(HANDLERS / "greet.py")
    cases = [
        (["missing.py", "--type", "Request", "--json", "{}"], "handler file missing.py does not exist"),
        ([greet, "--json", "{}"], "--type is required"),
        ([greet, "--type", "Nope", "--json", "{}"], "--type Nope: no such message"),
        ([greet, "--type", "Request", "--json", '{"name": 1, '], "--json is not valid JSON"),
        ([greet, "--type", "Request"], "give the request with --json"),
    ]
    for args, message in cases:
        proc = kre("run-once", *args, env=env)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_run_once_gives_the_handler_the_data_services_of_the_environment(mongo_uri, mongo_db_name):
    env = _env(KRT_MONGO_URI=mongo_uri, KRT_MONGO_DB=mongo_db_name)
    proc = kre("run-once", str(EXAMPLES / "services" / "services.py"), "--type", "Request", "--file", "-", env=env,
               stdin='{"name": "Ann"}\n{"name": "Ann"}\n')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ['{"name": "Ann"}', '{"name": "Ann"}']

    from pymongo import MongoClient

    client = MongoClient(mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        assert client[mongo_db_name]["visits"].count_documents({"name": "Ann"}) == 2
        assert client[mongo_db_name]["classificationMetrics"].count_documents({}) == 2
    finally:
        client.close()


async def test_check_and_stream_create_walk_a_node_to_a_clean_bill(nats_server, js):
    env = _env(**node_env(nats_server.url, "greet.py"), PYTHONPATH=str(PROTOS))
    code, out, _ = await akre("check", env=env)
    assert code == 1, out
    assert f"✘ stream {STREAM} does not exist" in out and "fix: kre-runner stream create" in out
    assert "✔ handler:" in out and "✔ NATS: connected" in out

    code, out, err = await akre("stream", "create", env=env)
    assert code == 0 and f"stream {STREAM} created" in out, err
    code, out, _ = await akre("stream", "create", env=env)
    assert code == 0 and "already exists" in out
    info = await js.stream_info(STREAM)
    assert info.config.subjects == [f"{STREAM}.*"]
    assert str(getattr(info.config.retention, "value", info.config.retention)) == "interest"

    code, out, _ = await akre("check", env=env)
    assert code == 0, out
    assert "✘" not in out
    assert "consumer v1-greeter does not exist yet" in out and "are NOT processed" in out
    async with running_node(node_env(nats_server.url, "greet.py"), js):
        pass
    code, out, _ = await akre("check", env=env)
    assert code == 0, out
    assert "consumer v1-greeter: durable pull consumer, deliver policy new, ack wait 30s" in out

    from nats.js.api import ConsumerConfig
    await js.delete_consumer(STREAM, "v1-greeter")
    await js.add_consumer(STREAM, ConsumerConfig(durable_name="v1-greeter", deliver_subject="push.here",
                                                 filter_subject=f"{STREAM}.greeter"))
    code, out, _ = await akre("check", env=env)
    assert code == 1 and "is a push consumer" in out and f"nats consumer rm {STREAM} v1-greeter" in out

    bad = {**env, "KRT_OUTPUT": "", "KRT_NATS_OUTPUT": "elsewhere.out", "KRT_HANDLER_PATH": "nope.py"}
    code, out, _ = await akre("check", env=bad)
    assert code == 1
    assert "✘ handler: handler file" in out and "✘ KRT_NATS_OUTPUT=elsewhere.out is captured by no stream" in out


def test_check_and_stream_create_fail_clearly_without_configuration_or_server():
    proc = kre("check")
    assert proc.returncode == 1 and "✘ configuration: KRT_NODE_NAME is not set" in proc.stdout
    env = _env(**node_env("nats://127.0.0.1:1", "greet.py"), PYTHONPATH=str(PROTOS))
    proc = kre("check", env=env)
    assert proc.returncode == 1 and "✘ NATS: cannot connect to NATS at nats://127.0.0.1:1" in proc.stdout
    proc = kre("stream", "create")
    assert proc.returncode == 2 and "set KRT_NATS_SERVER and KRT_NATS_STREAM" in proc.stderr
    proc = kre("stream", "create", env=env)
    assert proc.returncode == 1 and "cannot connect to NATS at nats://127.0.0.1:1" in proc.stderr


USER_TEST = '''
import pytest
from greeter_pb2 import Request, Response
from kre_runner.testing import HandlerError


async def test_greets(kre_node):
    node = await kre_node.start("greeter.py")
    assert (await node.call(Request(name="Ann"), Response)).greeting == "Hello, Ann!"


async def test_without_a_type_the_answer_is_the_any(kre_node):
    node = await kre_node.start("greeter.py")
    answer = await node.call(Request(name="Bo"))
    response = Response()
    assert answer.Unpack(response) and response.greeting == "Hello, Bo!"


async def test_errors_raise_handler_error(kre_node):
    node = await kre_node.start("failing.py")
    with pytest.raises(HandlerError, match="^error in 'failing': no$"):
        await node.call(Request(name="x"), Response)


async def test_services_are_captured(kre_node):
    node = await kre_node.start("stores.py:handle", env={"KRT_VERSION": "v9"})
    await node.call(Request(name="Cy"), Response)
    assert node.db["people"] == [{"name": "Cy"}]
    assert node.predictions[0]["predictedValue"] == "Cy" and node.predictions[0]["versionName"] == "v9"
    assert node.measurements == [{"measurement": "seen", "fields": {"n": 1}, "tags":
                                  {"kind": "person", "version": "v9", "workflow": "test", "node": "stores"},
                                  "time": None}]


async def test_a_failing_init_is_raised_by_start(kre_node):
    with pytest.raises(Exception, match="init.ctx. in .*bad_init.py failed: RuntimeError: no model"):
        await kre_node.start("bad_init.py")


async def test_this_one_fails_on_purpose(kre_node):
    node = await kre_node.start("greeter.py")
    assert (await node.call(Request(name="Ann"), Response)).greeting == "Bonjour"
'''

STORES = '''
from greeter_pb2 import Request, Response

async def handle(ctx, data):
    request = Request()
    data.Unpack(request)
    await ctx.db.save("people", {"name": request.name})
    found = await ctx.db.find("people", {"name": request.name}, projection={"_id": 0, "name": 1})
    await ctx.prediction.save(predicted_value=request.name, true_value=request.name)
    ctx.measurement.save("seen", {"n": len(found)}, tags={"kind": "person"})
    return Response(greeting="stored")
'''


def test_the_pytest_plugin_in_a_user_project(tmp_path):
    """A user's project: their handlers, their test file, asyncio_mode = auto; nothing else configured."""
    for name in ("greeter.py", "greeter_pb2.py"):
        shutil.copy(PROTOS / name, tmp_path / name)
    (tmp_path / "failing.py").write_text("def handler(ctx, data):\n    raise ValueError('no')\n")
    (tmp_path / "stores.py").write_text(STORES)
    (tmp_path / "bad_init.py").write_text("def init(ctx):\n    raise RuntimeError('no model')\n"
                                          "def handler(ctx, data):\n    return None\n")
    (tmp_path / "test_my_handler.py").write_text(USER_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    env = _env()
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "1 failed, 5 passed" in proc.stdout, proc.stdout[-4000:]
    assert "test_this_one_fails_on_purpose" in proc.stdout and "'Hello, Ann!' == 'Bonjour'" in proc.stdout


def test_the_examples_own_tests_pass():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES)],
                          cwd=EXAMPLES.parent, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "7 passed" in proc.stdout, proc.stdout[-4000:]


@pytest.fixture
def not_nats_port():
    """A port that accepts connections and never says anything: not a NATS server."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.mark.parametrize("command", ["up", "call", "dead-letter", "stream create"])
def test_connection_errors_are_one_line_naming_the_address_and_the_fix(tmp_path, not_nats_port, command):
    workflow = _workflow(tmp_path, "workflow: wf\nnodes: [{name: echo, handler: echo.py}]\n", echo=ECHO)
    # The 5 s are the user's wait for the error; on a loaded machine the interpreter's own start-up (the
    # same command's, with --help) takes seconds too, and is not the connection's: it is taken off.
    started = time.monotonic()
    kre(*command.split(), "--help", timeout=30)
    start_up = time.monotonic() - started
    for url, says in (("nats://127.0.0.1:1,nats://kre:s3cr3t@127.0.0.1:2", "is a nats-server running there?"),
                      (f"nats://127.0.0.1:{not_nats_port}", "did not answer as a NATS server")):
        args = {
            "up": ["up", str(workflow), "--nats", url],
            "call": ["call", "--nats", url, "--stream", STREAM, "--subject", f"{STREAM}.greeter", "--proto-path",
                     str(PROTOS), "--type", "Request", "--json", "{}"],
            "dead-letter": ["dead-letter", "list", "--nats", url, "--stream", "wf-dead-letter"],
            "stream create": ["stream", "create", "--nats", url, "--stream", STREAM],
        }[command]
        started = time.monotonic()
        proc = kre(*args, timeout=30)
        took = time.monotonic() - started
        output = (proc.stdout + proc.stderr).strip()
        assert proc.returncode == 1, output
        assert len(output.splitlines()) == 1, output
        assert says in output and "kre-runner up starts one" in output, output
        assert url.split(",")[0].replace("kre:s3cr3t@", "") in output and "s3cr3t" not in output, output
        assert took - start_up < 5, f"{took:.1f}s, of which {start_up:.1f}s starting Python: {output}"


def test_up_reload_restarts_only_the_node_whose_code_changed(tmp_path):
    workflow = _workflow(tmp_path, """
        workflow: wf
        nodes: [{name: echo, handler: echo.py}, {name: shout, handler: shout.py:shout}]
    """, echo=ECHO, shout=SHOUT, helper="WORD = 'hi'\n")
    up = Up(str(workflow), "--reload")
    try:
        up.wait_for("is ready")
        (tmp_path / "test_echo.py").write_text("def test_nothing():\n    pass\n")  # a test file: no node's code
        (tmp_path / "helper.py").write_text("WORD = 'hello'\n")  # imported by no node
        time.sleep(1.5)  # three polls
        assert "restarting" not in up.output
        mark = len(up.lines)
        (tmp_path / "shout.py").write_text(textwrap.dedent(SHOUT) + "\nimport helper  # now it is shout's code\n")
        up.wait_for("shout.py changed: restarting shout", after=mark)
        up.wait_for("shout | ", after=mark)
        time.sleep(1.0)
        assert "restarting echo" not in up.output
        mark = len(up.lines)
        (tmp_path / "helper.py").write_text("WORD = 'hey'\n")
        up.wait_for("helper.py changed: restarting shout", after=mark)
        mark = len(up.lines)
        (tmp_path / "greeter_pb2.py").write_text((tmp_path / "greeter_pb2.py").read_text() + "\n")  # both import it
        up.wait_for("restarting echo", after=mark)
        up.wait_for("restarting shout", after=mark)
    finally:
        assert up.stop(signal.SIGTERM) == 0, up.output


TRACED = """
    import asyncio
    from greeter_pb2 import Request, Response
    from kre_runner import Retry

    async def handler(ctx, data):
        request = Request()
        data.Unpack(request)
        ctx.logger.info("handling %s", request.name)
        if request.name == "slow":
            await asyncio.sleep(120)
        if request.name == "retry":
            raise Retry("the model is busy", delay=0.1)
        return Response(greeting=request.name)
"""


def _tracking_id(proc: subprocess.CompletedProcess[str]) -> str:
    import re

    found = re.search(r"^kre-runner call: tracking id (\S+)$", proc.stderr, re.MULTILINE)
    assert found, proc.stderr
    return found.group(1)


def test_trace_finds_a_request_in_flight_dead_lettered_or_answered(tmp_path):
    workflow = _workflow(tmp_path, """
        workflow: wf
        request: Request
        nodes: [{name: traced, handler: traced.py, env: {KRT_MAX_DELIVER: "2"}}]
    """, traced=TRACED)
    wf = str(workflow)
    up = Up(wf)
    try:
        up.wait_for("is ready")
        answered = kre("call", wf, "--json", '{"name": "Ann"}')
        assert answered.returncode == 0, answered.stderr
        out = kre("trace", wf, _tracking_id(answered))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "answered, via entrypoint -> traced" in out.stdout and "handling Ann" in out.stdout

        dead = kre("call", wf, "--json", '{"name": "retry"}')
        assert dead.returncode == 1 and "dead-lettered after 2 deliveries" in dead.stderr, dead.stderr
        out = kre("trace", wf, _tracking_id(dead))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "in local-v1-wf-dead-letter: node traced gave up after 2 deliveries" in out.stdout, out.stdout
        assert "the model is busy" in out.stdout and f"kre-runner dead-letter replay {wf} 1" in out.stdout
        listed = kre("dead-letter", "list", wf)
        assert listed.returncode == 0 and "1 dead letter(s) in local-v1-wf-dead-letter" in listed.stdout, listed

        slow = kre("call", wf, "--json", '{"name": "slow"}', "--timeout", "1")
        assert slow.returncode == 1 and "got no answer" in slow.stderr and _tracking_id(slow) in slow.stderr
        out = kre("trace", wf, _tracking_id(slow))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "in flight: input of node traced" in out.stdout
        assert "delivered to node traced and not acked" in out.stdout, out.stdout

        nowhere = kre("trace", wf, "no-such-id")
        assert nowhere.returncode == 1 and "not in flight in local-v1-wf, not dead-lettered" in nowhere.stdout
        created = kre("stream", "create", wf)
        assert created.returncode == 0 and "stream local-v1-wf already exists" in created.stdout, created
    finally:
        assert up.stop() == 0, up.output
    stopped = kre("dead-letter", "list", wf)
    assert stopped.returncode == 1 and "is not running: start it with `kre-runner up" in stopped.stderr


def test_run_once_is_quiet_and_uses_local_data_services(tmp_path, mongo_uri, mongo_db_name):
    services = str(EXAMPLES / "services" / "services.py")
    plain = kre("run-once", str(HANDLERS / "greet.py"), "--type", "Request", "--json", '{"name": "Ann"}',
                env=_env(PYTHONPATH=str(PROTOS)))
    assert plain.returncode == 0 and plain.stderr == "", plain.stderr  # the runner's INFO lines only when asked
    asked = kre("run-once", str(HANDLERS / "greet.py"), "--type", "Request", "--json", '{"name": "Ann"}',
                env=_env(PYTHONPATH=str(PROTOS), KRT_LOG_LEVEL="INFO"))
    assert "ctx.db: disabled" in asked.stderr

    local = kre("run-once", services, "--type", "Request", "--json", '{"name": "Ann"}', "--services", timeout=90)
    assert local.returncode == 0 and local.stdout == '{"name": "Ann"}\n', local.stderr
    assert "visits: 1 document(s)" in local.stderr and "classificationMetrics: 1 document(s)" in local.stderr
    assert "visits_count: 1 point(s)" in local.stderr, local.stderr

    given = kre("run-once", services, "--type", "Request", "--json", '{"name": "Bo"}', "--mongo", mongo_uri,
                env=_env(KRT_MONGO_DB=mongo_db_name))
    assert given.returncode == 0, given.stderr
    shown = kre("stored", "--mongo", mongo_uri, "--db", mongo_db_name)
    assert shown.returncode == 0 and "visits: 1 document(s)" in shown.stdout and '"name": "Bo"' in shown.stdout
