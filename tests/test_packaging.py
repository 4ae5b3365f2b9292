"""The installed package as a user's project sees it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("mypy")


def test_type_checker_finds_the_installed_package(tmp_path):
    """mypy, run in a user's project outside this repository, finds `failover` and its
    types after the README's install (`pip install -e .`)."""
    user = tmp_path / "user.py"
    user.write_text("import failover\n\nreveal_type(failover.Router)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}

    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--no-error-summary", "user.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )

    revealed = [line.rsplit(" -> ", 1)[-1] for line in done.stdout.splitlines()
                if "Revealed type is" in line]
    assert "import-not-found" not in done.stdout, done.stdout
    assert ['failover._router.Router"'] == revealed, done.stdout
