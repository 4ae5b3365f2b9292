"""The failover command through its entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest

from failover.cli import main


def test_demo_audits_clean_through_python_m(tmp_path):
    """python -m failover demo runs a simulated day and reports a clean ledger audit."""
    journal = tmp_path / "demo.db"
    done = subprocess.run(
        [sys.executable, "-m", "failover", "demo", "--repayments", "400", "--seed", "3",
         "--journal", str(journal)],
        capture_output=True, text=True, timeout=120,
    )

    assert 0 == done.returncode, done.stderr
    assert "duplicates 0, lost 0, false successes 0 -> OK" in done.stdout
    assert "pending 0" in done.stdout.split("after reconcile:")[1]
    assert journal.exists()


def test_demo_counts_add_up(capsys):
    """The demo's final counts cover every repayment it made."""
    code = main(["demo", "--repayments", "300", "--seed", "5"])

    out = capsys.readouterr().out
    line = out.split("after reconcile:")[1].splitlines()[0]
    numbers = [int(part.split()[-1]) for part in line.split(",")]
    assert 0 == code
    assert 300 == sum(numbers)


def test_unknown_command_is_a_usage_error(capsys):
    """A bad command exits 2 with a usage message."""
    with pytest.raises(SystemExit) as caught:
        main(["frobnicate"])

    assert 2 == caught.value.code
