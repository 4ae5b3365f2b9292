"""The examples run as a new user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_quickstart(tmp_path):
    """examples/quickstart.py fails over from the broken auto-debit to the card."""
    done = run(str(EXAMPLES / "quickstart.py"), cwd=tmp_path)

    assert 0 == done.returncode, done.stderr
    assert done.stdout.startswith("succeeded bank_card")
    assert (tmp_path / "repayments.db").exists()


def test_service_from_config_twice(tmp_path):
    """examples/service.py settles every repayment; a second run finds them settled."""
    argv = (str(EXAMPLES / "service.py"), str(EXAMPLES / "failover.toml"),
            "--journal", str(tmp_path / "service.db"))
    first, second = run(*argv, cwd=tmp_path), run(*argv, cwd=tmp_path)

    assert 0 == first.returncode, first.stderr
    assert first.stdout == second.stdout
    assert 8 == first.stdout.count("succeeded")
