"""The failover command through its entry points."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from failover import _demo
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
    *_, evidence, causes = done.stdout.splitlines()
    assert evidence.startswith("evidence report: ")
    assert re.fullmatch(r"late because of: channel faults \d+, the borrower's own declines"
                        r" \d+, mixed \d+, no fault journaled \d+", causes)


def test_demo_counts_add_up(capsys):
    """The demo's final counts cover every repayment it made."""
    code = main(["demo", "--repayments", "300", "--seed", "5"])

    out = capsys.readouterr().out
    line = out.split("after reconcile:")[1].splitlines()[0]
    numbers = [int(part.split()[-1]) for part in line.split(",")]
    assert 0 == code
    assert 300 == sum(numbers)


def test_demo_evidence_counts_add_up(capsys):
    """The evidence report covers the repayments with a due date (some, not all): each
    on time or late, and each late one with one cause."""
    code = main(["demo", "--repayments", "300", "--seed", "5", "--json"])

    data = json.loads(capsys.readouterr().out)
    evidence = data["evidence"]
    assert 0 == code
    assert 0 < evidence["repayments"] < 300
    assert evidence["repayments"] == evidence["on_time"] + evidence["late"]
    assert evidence["late"] == sum(evidence[c] for c in ("channel", "borrower", "mixed", "none"))


async def test_the_end_of_day_sweep_settles_late_collections_before_the_audit(monkeypatch):
    """With the auto-debit applying 5% of requests after its status queries missed them,
    the sweep at the end of the day finds each one and refunds it, corrects the repayment
    it belongs to, or lists it for a manual refund: both audits are clean."""
    channels = _demo._channels

    def late_prone(*args: Any) -> Any:
        made = channels(*args)
        made[0].profile = dataclasses.replace(made[0].profile, late_apply_after_query=0.05)
        return made

    monkeypatch.setattr(_demo, "_channels", late_prone)

    report = await _demo.run_demo(300, seed=7)

    late = report.late
    assert late["found"] >= 5
    assert late["found"] == late["refunded"] + late["corrected"] + late["manual"]
    assert (True, True) == (report.audit_before.ok, report.audit_after.ok)
    assert late["refunded"] == report.audit_after.refunds == sum(report.refunded.values())
    assert late["manual"] == len(report.audit_after.manual)


def test_unknown_command_is_a_usage_error(capsys):
    """A bad command exits 2 with a usage message."""
    with pytest.raises(SystemExit) as caught:
        main(["frobnicate"])

    assert 2 == caught.value.code


EXAMPLE = Path(__file__).parent.parent / "examples" / "failover.toml"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_empty_file_is_a_one_line_error(tmp_path, capsys):
    """validate on an empty file: exit 2, one line naming the file, no traceback."""
    path = tmp_path / "failover.toml"
    path.write_text("")

    code, _, err = _run(capsys, "validate", str(path))

    assert 2 == code
    assert [f"failover validate: {path}: the file is empty"] == err.splitlines()


def test_validate_file_without_channels_is_a_one_line_error(tmp_path, capsys):
    """validate on a file that configures no channel: exit 2, one line naming the file."""
    path = tmp_path / "failover.toml"
    path.write_text("# nothing yet\ndeadline_s = 10\n")

    code, _, err = _run(capsys, "validate", str(path))

    assert 2 == code
    assert [f"failover validate: {path}: no channels configured ([channels.NAME] tables)"
            ] == err.splitlines()


@pytest.mark.parametrize("name", ["failover.toml", "failover.yaml"])
def test_validate_binary_file_is_a_one_line_error(tmp_path, capsys, name):
    """validate on a binary (not UTF-8) file: exit 2, one line naming the file."""
    path = tmp_path / name
    path.write_bytes(bytes(range(256)))

    code, _, err = _run(capsys, "validate", str(path))

    assert 2 == code
    assert [f"failover validate: {path}: not UTF-8 text (invalid byte 0x80 at offset 128)"
            ] == err.splitlines()


def test_validate_reports_every_adapter_problem(tmp_path, capsys):
    """validate names every channel whose adapter cannot be built, not only the first."""
    path = tmp_path / "failover.toml"
    path.write_text('[channels.a]\nadapter = "nowhere_a.mod:A"\n'
                    '[channels.b]\nadapter = "nowhere_b.mod:B"\n'
                    '[channels.c]\n')

    code, _, err = _run(capsys, "validate", str(path))

    assert 2 == code
    assert [f"{path}: channels.a.adapter", f"{path}: channels.b.adapter",
            f"{path}: channels.c.adapter"] == [
        line.removeprefix("failover validate: ").split(": cannot")[0].split(": missing")[0]
        for line in err.splitlines()]


def test_validate_reports_every_invalid_value(tmp_path, capsys):
    """validate prints one line per invalid value, each with its key path."""
    path = tmp_path / "failover.toml"
    path.write_text("deadline_s = -1\n[channels.a]\ntimeout_s = 0\nbogus = 1\n"
                    "[channels.a.retry]\nmax_attempts = 0\n")

    code, _, err = _run(capsys, "validate", str(path))

    assert 2 == code
    assert ["deadline_s", "channels.a.timeout_s", "channels.a.retry.max_attempts",
            "channels.a.bogus"] == [line.split(": ")[2] for line in err.splitlines()]


def test_bad_environment_override_is_blamed_on_the_variable(monkeypatch, capsys):
    """An invalid FAILOVER_* value is reported under the variable's name, not the file's."""
    monkeypatch.setenv("FAILOVER_CHANNELS__WALLET__TIMEOUT_S", "-3")

    code, _, err = _run(capsys, "validate", str(EXAMPLE))

    assert 2 == code
    assert ["failover validate: environment variable FAILOVER_CHANNELS__WALLET__TIMEOUT_S:"
            " channels.wallet.timeout_s: Input should be greater than 0 (got -3)"
            ] == err.splitlines()


def test_unparsable_environment_override_is_blamed_on_the_variable(monkeypatch, capsys):
    """A FAILOVER_* value that is not valid JSON for a table is named, without a traceback."""
    monkeypatch.setenv("FAILOVER_CHANNELS", "not json")

    code, _, err = _run(capsys, "validate", str(EXAMPLE))

    assert 2 == code
    assert ["failover validate: environment variable FAILOVER_CHANNELS:"
            " not valid JSON for the channels table"] == err.splitlines()


def test_file_error_with_overrides_is_still_blamed_on_the_file(tmp_path, monkeypatch, capsys):
    """With an unrelated override set, a bad value in the file is still the file's."""
    path = tmp_path / "failover.toml"
    path.write_text('[channels.a]\nadapter = "m:A"\ntimeout_s = 0\n')
    monkeypatch.setenv("FAILOVER_DEADLINE_S", "5")

    code, _, err = _run(capsys, "validate", str(path))

    assert 2 == code
    assert [f"failover validate: {path}: channels.a.timeout_s: Input should be greater"
            " than 0 (got 0)"] == err.splitlines()


def test_version_prints_the_installed_version(capsys):
    """failover --version prints the package version from its metadata, exit 0."""
    with pytest.raises(SystemExit) as caught:
        main(["--version"])

    assert 0 == caught.value.code
    assert f"failover {version('failover')}\n" == capsys.readouterr().out


def test_json_into_a_closed_pipe_exits_without_traceback():
    """--json output into a reader that has gone (`| head`) ends quietly: no traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "failover", "validate", str(EXAMPLE), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    process.stdout.close()  # the reader is gone before anything is written
    err = process.stderr.read().decode()
    process.wait(timeout=60)

    assert "" == err
    assert 1 == process.returncode


@pytest.mark.parametrize(("amount", "currency", "field"), [
    ("0", "USD", "--amount"),
    ("-5", "USD", "--amount"),
    ("1.001", "USD", "--amount"),
    ("10.5", "JPY", "--amount"),
    ("NaN", "USD", "--amount"),
    ("Infinity", "USD", "--amount"),
    ("1", "ZZZ", "--currency"),
])
def test_channels_rejects_what_repayment_rejects(capsys, amount, currency, field):
    """channels refuses an amount or currency that failover.Repayment refuses: exit 2,
    one line naming the option."""
    code, out, err = _run(capsys, "channels", str(EXAMPLE), "--amount", amount,
                          "--currency", currency)

    assert 2 == code
    assert "" == out
    assert [f"failover channels: {field}"] == [
        ": ".join(line.split(": ")[:2]) for line in err.splitlines()]


def test_validate_reports_a_priority_clash_beside_invalid_values(tmp_path, capsys):
    """Two channels sharing a priority are reported with the file's invalid values."""
    path = tmp_path / "failover.toml"
    path.write_text("[channels.a]\npriority = 1\ntimeout_s = 0\n"
                    "[channels.b]\npriority = 1\n")

    code, _, err = _run(capsys, "validate", str(path))

    assert 2 == code
    assert [f"failover validate: {path}: channels.a.timeout_s: Input should be greater than 0"
            " (got 0)",
            f"failover validate: {path}: channels 'a' and 'b' share priority 1"] == err.splitlines()
