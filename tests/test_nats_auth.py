"""Every way to authenticate to NATS and verify it, each against a real nats-server configured for it.

A node started with the right credentials consumes; with wrong ones it exits 1 with one line naming
the variable to fix; no secret (password, token, seed) ever appears in its output or in /info.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import nats
import nkeys
import pytest
from kre_helpers import STREAM, Collector, greeting, node_env, request_envelope, start_process, wait_ready
from nats.js.api import RetentionPolicy, StreamConfig
from nats_auth import Certificates, ConfiguredNats, Operator, new_seed, public_key

from kre_runner.config import NatsAuth
from kre_runner.dev.embedded import free_port
from kre_runner.nats.connection import nats_options

pytestmark = pytest.mark.integration


@dataclass
class Setup:
    server: ConfiguredNats
    good: dict[str, str]  # KRT_* for the right credentials
    bad: dict[str, str]  # KRT_* for wrong ones
    client: NatsAuth  # what the test's own client uses
    secrets: list[str]  # must never be printed
    names: str  # the variable(s) the failure line must name
    extra: list[object] = field(default_factory=list)


def _setup(mode: str, tmp: Path) -> Setup:
    certs = Certificates.create(tmp)
    if mode == "user-password":
        server = ConfiguredNats('authorization { user: bob, password: "pw-SECRET-1" }')
        return Setup(server, {"KRT_NATS_USER": "bob", "KRT_NATS_PASSWORD": "pw-SECRET-1"},
                     {"KRT_NATS_USER": "bob", "KRT_NATS_PASSWORD": "wrong-SECRET-1"},
                     NatsAuth(user="bob", password="pw-SECRET-1"), ["pw-SECRET-1", "wrong-SECRET-1"],
                     "KRT_NATS_USER/KRT_NATS_PASSWORD")
    if mode == "token":
        server = ConfiguredNats('authorization { token: "tok-SECRET-2" }')
        return Setup(server, {"KRT_NATS_TOKEN": "tok-SECRET-2"}, {"KRT_NATS_TOKEN": "wrong-SECRET-2"},
                     NatsAuth(token="tok-SECRET-2"), ["tok-SECRET-2", "wrong-SECRET-2"], "KRT_NATS_TOKEN")
    if mode == "nkey":
        seed, other = new_seed(nkeys.PREFIX_BYTE_USER), new_seed(nkeys.PREFIX_BYTE_USER)
        good, bad = tmp / "user.nk", tmp / "other.nk"
        good.write_bytes(seed)
        bad.write_bytes(other)
        server = ConfiguredNats(f"authorization {{ users: [ {{ nkey: {public_key(seed)} }} ] }}")
        return Setup(server, {"KRT_NATS_NKEY_SEED": str(good)}, {"KRT_NATS_NKEY_SEED": str(bad)},
                     NatsAuth(nkey_seed=good), [seed.decode(), other.decode()], "KRT_NATS_NKEY_SEED")
    if mode == "creds":
        operator, stranger = Operator.create(), Operator.create()  # the stranger's user is unknown here
        server = ConfiguredNats(operator.server_config(tmp))
        good, bad = tmp / "node.creds", tmp / "stranger.creds"
        good.write_text(operator.creds())
        bad.write_text(stranger.creds())
        return Setup(server, {"KRT_NATS_CREDS": str(good)}, {"KRT_NATS_CREDS": str(bad)}, NatsAuth(creds=good),
                     [operator.user_seed.decode(), stranger.user_seed.decode()], "KRT_NATS_CREDS")
    tls = f'cert_file: "{certs.server_cert}", key_file: "{certs.server_key}"'
    if mode == "tls":
        server = ConfiguredNats(f"tls {{ {tls} }}")
        return Setup(server, {"KRT_NATS_TLS_CA": str(certs.ca)}, {"KRT_NATS_TLS_CA": str(certs.other_ca)},
                     NatsAuth(tls_ca=certs.ca), [], "KRT_NATS_TLS_CA")
    assert mode == "mutual-tls"
    server = ConfiguredNats(f'tls {{ {tls}, ca_file: "{certs.ca}", verify: true }}')
    good = {"KRT_NATS_TLS_CA": str(certs.ca), "KRT_NATS_TLS_CERT": str(certs.client_cert),
            "KRT_NATS_TLS_KEY": str(certs.client_key)}
    return Setup(server, good, {"KRT_NATS_TLS_CA": str(certs.ca)},
                 NatsAuth(tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key),
                 [certs.client_key.read_text().splitlines()[1]], "KRT_NATS_TLS_CERT/KRT_NATS_TLS_KEY")


def _output(proc: subprocess.Popen[bytes], sig: int | None) -> str:
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.decode(errors="replace")


MODES = ["user-password", "token", "nkey", "creds", "tls", "mutual-tls"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_node_consumes_with_the_right_credentials_and_never_prints_them(mode, tmp_path):
    setup = _setup(mode, tmp_path)
    setup.server.start()
    nc = await nats.connect(setup.server.url, **nats_options(setup.client))
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.*"], retention=RetentionPolicy.INTEREST))
        out = await Collector(js, f"{STREAM}.out").start()
        port = free_port()
        proc = start_process(node_env(setup.server.url, "greet.py", KRT_HTTP_PORT=str(port), KRT_LOG_LEVEL="DEBUG",
                                      **setup.good))
        try:
            await wait_ready(js, "v1-greeter", timeout=30)
            await js.publish(f"{STREAM}.greeter", request_envelope("auth").SerializeToString())
            results = await out.take(1)
            assert results and greeting(results[0]).startswith("Hello, auth!")
            async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/info") as response:
                info = await response.text()
            assert json.loads(info)["settings"]["nats_auth"]
        finally:
            log = _output(proc, signal.SIGTERM)
        assert proc.returncode == 0, log
        for secret in setup.secrets:
            assert secret not in log and secret not in info
    finally:
        await nc.close()
        setup.server.cleanup()


@pytest.mark.parametrize("mode", MODES)
async def test_wrong_credentials_stop_the_start_in_one_line_naming_the_variable(mode, tmp_path):
    setup = _setup(mode, tmp_path)
    setup.server.start()
    try:
        started = asyncio.get_running_loop().time()
        proc = start_process(node_env(setup.server.url, "greet.py", KRT_LOG_LEVEL="DEBUG", **setup.bad))
        log = await asyncio.get_running_loop().run_in_executor(None, _output, proc, None)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        setup.server.cleanup()
    assert proc.returncode == 1, log
    assert "Traceback" not in log
    last = log.strip().splitlines()[-1]
    assert "ERROR cannot start: " in last and setup.names in last, log
    assert elapsed < 30, f"the first connect must be bounded ({elapsed:.0f}s)"
    for secret in setup.secrets:
        assert secret not in log


async def test_a_user_without_jetstream_permissions_stops_the_start_in_one_line(tmp_path):
    server = ConfiguredNats('authorization { users: [ { user: limited, password: "pw-SECRET-3", '
                            'permissions: { publish: { deny: ["$JS.API.>"] } } } ] }')
    server.start()
    try:
        proc = start_process(node_env(server.url, "greet.py", KRT_NATS_USER="limited", KRT_NATS_PASSWORD="pw-SECRET-3"))
        log = await asyncio.get_running_loop().run_in_executor(None, _output, proc, None)
    finally:
        server.cleanup()
    assert proc.returncode == 1, log
    last = log.strip().splitlines()[-1]
    assert "cannot start: the JetStream API of NATS" in last and "permission to publish to $JS.API.>" in last, log
    assert "Traceback" not in log and "pw-SECRET-3" not in log
