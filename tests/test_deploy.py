"""The images and the Kubernetes manifests, checked without Docker or a cluster (CI has neither).

* hadolint lints every Dockerfile;
* kubernetes-validate checks every manifest against the Kubernetes schemas it bundles (strict);
  the CRDs it has no schema for (KEDA, Prometheus Operator) and the ties between files are checked here;
* the images' RUN steps that run as the non-root user are run as a non-root user, with the image's
  paths replaced by temporary ones: the venv is created, kre-runner installed into it, and then the
  derived-image recipe installs a handler's requirements.txt into the same venv.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import yaml

from kre_runner.config import VARIABLES

ROOT = Path(__file__).parents[1]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.cuda", ROOT / "deploy" / "docker" / "handler.Dockerfile"]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))


def _tool(name: str) -> str:
    path = Path(sysconfig.get_path("scripts")) / name
    found = str(path) if path.is_file() else shutil.which(name)
    assert found, f"{name} not found: install kre-runner's test extra (pip install -e '.[test]')"
    return found


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                              if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            result.append((instruction.upper(), args.strip()))
    return result


def _documents() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_hadolint_passes_on_every_dockerfile():
    proc = subprocess.run([_tool("hadolint"), *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_validate_passes_on_every_manifest():
    assert len(MANIFESTS) >= 6
    proc = subprocess.run([_tool("kubernetes-validate"), "--strict", *map(str, MANIFESTS)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Only the two CRDs may lack a schema; everything else must have been validated.
    unknown = [line for line in proc.stdout.splitlines() if "Couldn't find schema" in line]
    assert len(unknown) == 2 and all(("ScaledObject" in u or "ServiceMonitor" in u) for u in unknown), unknown


def test_the_manifests_agree_with_each_other_and_with_the_runner():
    docs = _documents()
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    config = by_kind["ConfigMap"][0]["data"]
    known = {name for name, *_ in VARIABLES}
    assert set(config) <= known, set(config) - known
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        grace = float(env.get("KRT_SHUTDOWN_GRACE") or config["KRT_SHUTDOWN_GRACE"])
        assert pod["terminationGracePeriodSeconds"] > grace + 5, name
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["ports"][0]["containerPort"] == int(config["KRT_HTTP_PORT"])
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
        assert "limits" in container["resources"] and "requests" in container["resources"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert config["KRT_NATS_CREDS"].startswith(mounts["nats-credentials"] + "/")
        assert set(env) <= known
    gpu = deployments["classifier"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1
    scaled = by_kind["ScaledObject"][0]["spec"]
    assert scaled["scaleTargetRef"]["name"] in deployments
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "nats-jetstream"
    assert trigger["metadata"]["stream"] == config["KRT_NATS_STREAM"]
    assert trigger["metadata"]["consumer"] == f"{config['KRT_VERSION']}-{config['KRT_NODE_NAME']}"
    assert int(trigger["metadata"]["lagThreshold"]) > int(config["KRT_MAX_INFLIGHT"])
    service = by_kind["Service"][0]
    monitor = by_kind["ServiceMonitor"][0]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["endpoints"][0]["path"] == "/metrics"
    for deployment in deployments.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def test_both_images_run_the_same_steps_as_the_same_non_root_user():
    cpu, cuda = (_instructions(ROOT / name) for name in ("Dockerfile", "Dockerfile.cuda"))
    after = [args for kind, args in cpu[[k for k, _ in cpu].index("USER"):] if kind in ("USER", "COPY", "RUN")]
    assert after == [args for kind, args in cuda[[k for k, _ in cuda].index("USER"):]
                     if kind in ("USER", "COPY", "RUN")]
    assert ("USER", "1000:1000") in cpu
    entrypoint = ("ENTRYPOINT", '["tini", "--", "kre-runner"]')
    assert entrypoint in cpu and entrypoint in cuda
    assert ("FROM", "python:3.12-slim") in cpu
    ignored = (ROOT / ".dockerignore").read_text()
    assert "!src/" in ignored and "!pyproject.toml" in ignored and "!LICENSE" in ignored


def _as_user(uid: int) -> dict[str, object]:
    if os.geteuid() != 0:
        return {}  # already not root
    return {"user": uid, "group": uid, "extra_groups": []}


def _user_python(uid: int) -> str:
    """A Python ≥ 3.10 with venv that ``uid`` may run (this one may live in root's home)."""
    for candidate in (str(Path(sys.executable).resolve()), "/usr/local/bin/python3", "/usr/bin/python3"):
        if not Path(candidate).is_file():
            continue
        try:
            probe = subprocess.run([candidate, "-c", "import sys, venv, ensurepip; assert sys.version_info >= (3, 10)"],
                                   capture_output=True, timeout=60, cwd="/", **_as_user(uid))
        except PermissionError:
            continue
        if probe.returncode == 0:
            return candidate
    pytest.skip(f"no Python ≥ 3.10 with venv that uid {uid} can run")


@pytest.mark.integration
def test_the_image_steps_and_the_derived_image_recipe_work_as_a_non_root_user():
    """The RUN steps after ``USER`` in Dockerfile, then handler.Dockerfile's, as uid 1000 (or this user)."""
    uid = 1000
    work = Path(tempfile.mkdtemp(prefix="kre-image-"))
    try:
        os.chmod(work, 0o1777)  # as /tmp, where the image copies the sources
        venv, src, files, home = work / "opt-kre", work / "kre-src", work / "krt-files", work / "home"
        # COPY --chown=kre:kre pyproject.toml README.md LICENSE src -> /tmp/kre-src
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy(ROOT / name, src / name)
        shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        # The derived image's handler directory: a handler and a requirements.txt.
        files.mkdir()
        shutil.copy(ROOT / "tests" / "handlers" / "greet.py", files / "handler.py")
        (files / "requirements.txt").write_text("six\n")
        venv.mkdir()
        home.mkdir()
        paths = {"/opt/kre": str(venv), "/tmp/kre-src": str(src), "/krt-files": str(files)}
        image = _instructions(ROOT / "Dockerfile")
        # What the root RUN step hands to the user (its chown), and what COPY --chown gives it.
        root_run = next(args for kind, args in image if kind == "RUN")
        owned = re.search(r"chown kre:kre ([^&]+)", root_run)
        assert owned, "the root RUN step must give the venv and /krt-files to kre"
        given = [Path(paths[p]) for p in owned.group(1).split() if p in paths]
        assert all(args.startswith("--chown=kre:kre ") for kind, args in image if kind == "COPY")
        if os.geteuid() == 0:
            for path in (*given, home, src, *src.rglob("*"), files, *files.rglob("*")):
                os.chown(path, uid, uid)
        env = {"PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "VIRTUAL_ENV": str(venv),
               "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        python = _user_python(uid)  # the image's `python` (python:3.12-slim has it on PATH)
        (home / "bin").mkdir()
        (home / "bin" / "python").symlink_to(python)
        env["PATH"] = f"{venv}/bin:{home / 'bin'}:/usr/bin:/bin"
        steps = []
        for dockerfile in (ROOT / "Dockerfile", ROOT / "deploy" / "docker" / "handler.Dockerfile"):
            instructions = _instructions(dockerfile)
            user_at = next((i for i, (k, _) in enumerate(instructions) if k == "USER"), 0)
            steps += [args for kind, args in instructions[user_at:] if kind == "RUN"]
        assert len(steps) == 2
        for step in steps:
            for image_path, here in paths.items():
                step = step.replace(image_path, here)
            proc = subprocess.run(["sh", "-c", step], env=env, cwd=work, capture_output=True, text=True,
                                  timeout=600, **_as_user(uid))
            assert proc.returncode == 0, f"{step}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        assert not src.exists(), "the install step removes the copied sources"
        check = subprocess.run([str(venv / "bin" / "kre-runner"), "--version"], env=env, capture_output=True,
                               text=True, timeout=60, **_as_user(uid))
        assert check.returncode == 0 and check.stdout.startswith("kre-runner "), check.stderr
        imports = subprocess.run([str(venv / "bin" / "python"), "-c", "import six, kre_runner.run, nkeys"],
                                 env=env, capture_output=True, text=True, timeout=60, **_as_user(uid))
        assert imports.returncode == 0, imports.stderr
        # Production installs leave the demo's nats-server out.
        assert not (venv / "bin" / "nats-server").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)
