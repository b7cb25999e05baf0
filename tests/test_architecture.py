"""The package's folders are its architecture, enforced: pyproject.toml's import-linter contracts hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_hot_path_never_imports_the_tools_and_reaches_operations_only_through_hooks():
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_the_public_api_is_importable_from_the_top():
    import kre_runner

    assert {name: getattr(kre_runner, name) is not None for name in kre_runner.__all__} == dict.fromkeys(
        kre_runner.__all__, True)
    from kre_runner import DatabaseError, Retry, batch_handler  # what users write

    assert issubclass(DatabaseError, Exception) and issubclass(Retry, Exception) and callable(batch_handler)
