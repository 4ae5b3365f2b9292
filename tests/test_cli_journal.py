"""The operator commands on a real SQLite journal: status, inspect, channels, reconcile."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import failover
from failover.cli import main
from failover.journal import SCHEMA_VERSION
from failover.testing import (
    Collected,
    FakeClock,
    FaultProfile,
    MemoryLedger,
    ScriptedChannel,
    SimulatedChannel,
    SQLiteLedger,
)

from .conftest import repayment

CONFIG = """
[channels.primary]
priority = 1
adapter = "failover.testing:SimulatedChannel"
options = {{ idempotent = false, ledger = "{ledger}" }}

[channels.backup]
priority = 2
adapter = "failover.testing:SimulatedChannel"
options = {{ idempotent = true, ledger = "{ledger}" }}
"""


@pytest.fixture
def pending_journal(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A journal with 3 repayments PENDING on 'primary' (collected, queries failing),
    1 that failed over to 'backup', and the config that heals them."""
    journal, ledger = tmp_path / "journal.db", tmp_path / "ledger.db"
    config = tmp_path / "failover.toml"
    config.write_text(CONFIG.format(ledger=ledger))
    in_doubt = FaultProfile(unknown_collected=1.0, query_failure=1.0)
    primary = SimulatedChannel("primary", in_doubt, idempotent=False, ledger=SQLiteLedger(ledger))
    backup = SimulatedChannel("backup", idempotent=True, ledger=SQLiteLedger(ledger))

    async def fill() -> None:
        async with failover.Router([primary, backup], failover.SQLiteJournal(journal),
                                   clock=FakeClock()) as router:
            for i in range(3):
                await router.repay(repayment(key=f"pending-{i}"))
            primary.profile = FaultProfile(unavailable=1.0)
            await router.repay(repayment(key="moved"))

    asyncio.run(fill())
    return journal, ledger, config


async def fill_late(journal: failover.Journal) -> FakeClock:
    """Three repayments collected twice: card and gateway collected but answered a timeout,
    their status queries said NOT_FOUND, and the router failed over to wallet.  The sweep
    finds the late collections: gateway's is refunded; card cannot refund, so its two go
    on the manual-refund list."""
    clock, ledger = FakeClock(), MemoryLedger()
    lost = Collected(failover.ChannelResult.unknown("timeout"))
    not_found = failover.ChannelResult.not_found()
    card = ScriptedChannel("card", [lost, lost], queries=[not_found] * 2, refunds=False,
                           ledger=ledger)
    gateway = ScriptedChannel("gateway", [lost], queries=[not_found], ledger=ledger)
    wallet = ScriptedChannel("wallet", ledger=ledger)
    config = failover.RouterConfig.model_validate({
        "channels": {name: {"settle_s": 0, "retry": {"max_attempts": 1}}
                     for name in ("card", "gateway", "wallet")},
        "late": {"checks_s": [0, 3600]}})
    async with failover.Router([card, gateway, wallet], journal, config, clock=clock,
                               background=False) as router:
        for key in ("manual-1", "manual-2"):
            await router.repay(repayment(key=key), channels=["card", "wallet"])
        clock.advance(60)
        await router.repay(repayment(key="refunded"), channels=["gateway", "wallet"])
        await router.sweep()
    assert ["refunded"] == [r.repayment_key for r in ledger.refunds()]
    return clock


def manual_row(key: str, channel_reference: str, since: str) -> dict[str, str]:
    return {"key": key, "channel": "card", "reference": failover.make_reference(key, 1, "card"),
            "channel_reference": channel_reference, "reason": "no_refund_capability",
            "since": since}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_status_counts_pending_and_failovers(pending_journal, capsys):
    """status shows counts by status, the pending ones and the recent failover."""
    journal, _, _ = pending_journal

    code, out, _ = run(capsys, "status", "--journal", str(journal), "--json")

    data = json.loads(out)
    assert 0 == code
    assert {"pending": 3, "succeeded": 1, "failed": 0} == data["by_status"]
    assert {"pending-0", "pending-1", "pending-2"} == {p["key"] for p in data["pending"]}
    assert {("awaiting_channel", "primary")} == {(p["reason"], p["channel"])
                                                 for p in data["pending"]}
    assert [("moved", "primary", "backup")] == [(m["key"], m["from"], m["to"])
                                                for m in data["recent_failovers"]]


def test_status_as_a_table(pending_journal, capsys):
    """Without --json, status prints readable lines."""
    journal, _, _ = pending_journal

    code, out, _ = run(capsys, "status", "--journal", str(journal))

    assert 0 == code
    assert "pending 3, succeeded 1, failed 0" in out
    assert "recent failovers:" in out


@pytest.fixture
def late_journal(tmp_path: Path) -> tuple[Path, FakeClock]:
    journal = tmp_path / "journal.db"
    clock = asyncio.run(fill_late(failover.SQLiteJournal(journal)))
    return journal, clock


def test_status_lists_the_manual_refunds_and_counts_late_collections(late_journal, capsys):
    """status counts the late collections found and refunded, and lists those a person
    must refund by hand (key, channel, reference, reason, since), without accounts."""
    journal, clock = late_journal

    code, out, _ = run(capsys, "status", "--journal", str(journal), "--json")

    data = json.loads(out)
    assert 0 == code
    assert {"found": 3, "refunded": 1, "refunding": 0, "manual": 2} == data["late_collections"]
    since = clock.now().isoformat()
    # (the scripted channels number their collections across the ledger they share)
    assert [manual_row("manual-1", "card-1", since), manual_row("manual-2", "card-3", since)] \
        == data["manual_refunds"]
    assert "6222021234567890" not in out


def test_status_prints_the_manual_refund_list(late_journal, capsys):
    """Without --json: the late-collection counts, then the manual refunds as a table;
    with --limit, the count stays whole and the oldest are shown."""
    journal, _ = late_journal

    code, out, _ = run(capsys, "status", "--journal", str(journal))
    _, limited, _ = run(capsys, "status", "--journal", str(journal), "--limit", "1")

    assert 0 == code
    assert "late collections: found 3, refunded 1, refunding 0, manual 2" in out
    table = out.split("manual refunds (2, to give back by hand):\n")[1].splitlines()
    assert ["key", "channel", "reference", "reason", "since"] == table[0].split()
    assert [["manual-1", "card", failover.make_reference("manual-1", 1, "card"),
             "no_refund_capability"], ["manual-2", "card",
                                       failover.make_reference("manual-2", 1, "card"),
                                       "no_refund_capability"]] \
        == [row.split()[:4] for row in table[2:]]
    assert "manual refunds (2, to give back by hand; the oldest 1 shown):" in limited
    assert "manual-1" in limited
    assert "manual-2" not in limited
    assert "6222021234567890" not in out


def test_status_without_late_collections_says_none(pending_journal, capsys):
    """A journal with no late collections shows zero counts and no manual list."""
    journal, _, _ = pending_journal

    code, out, _ = run(capsys, "status", "--journal", str(journal))

    assert 0 == code
    assert "late collections: found 0, refunded 0, refunding 0, manual 0" in out
    assert "manual refunds" not in out


def test_inspect_shows_attempts_and_masks_the_account(pending_journal, capsys):
    """inspect lists every attempt with outcome and resolution; the account is masked."""
    journal, _, _ = pending_journal

    code, out, _ = run(capsys, "inspect", "moved", "--journal", str(journal), "--json")

    data = json.loads(out)
    assert 0 == code
    *before, last = [(a["channel"], a["outcome"]) for a in data["attempts"]]
    assert ("backup", "succeeded") == last
    assert before
    assert {("primary", "unavailable")} == set(before)
    assert "6222021234567890" not in out
    assert data["account"].endswith("7890")


def test_inspect_unknown_key_is_exit_1(pending_journal, capsys):
    """inspect of a key the journal lacks exits 1 with a message."""
    journal, _, _ = pending_journal

    code, _, err = run(capsys, "inspect", "nope", "--journal", str(journal))

    assert 1 == code
    assert "no repayment 'nope'" in err


def test_missing_journal_is_exit_2_and_creates_nothing(tmp_path, capsys):
    """status on a path without a journal exits 2 and does not create one."""
    code, _, err = run(capsys, "status", "--journal", str(tmp_path / "none.db"))

    assert 2 == code
    assert "no journal" in err
    assert not (tmp_path / "none.db").exists()


def test_reconcile_resolves_pending_against_the_channels(pending_journal, capsys):
    """reconcile asks the channels (now answering) and settles every pending repayment;
    the ledger shows each collected exactly once."""
    journal, ledger, config = pending_journal

    code, out, err = run(capsys, "reconcile", str(config), "--journal", str(journal), "--json")

    data = json.loads(out)
    assert 0 == code, err
    assert {"succeeded": 3, "failed": 0, "pending": 0} == data["outcomes"]
    keys = [c.repayment_key for c in SQLiteLedger(ledger).collections()]
    assert sorted(["pending-0", "pending-1", "pending-2", "moved"]) == sorted(keys)


def test_channels_explains_skips_at_a_moment(capsys):
    """channels shows the order and the reason for each skipped channel at --at."""
    example = Path(__file__).parent.parent / "examples" / "failover.toml"

    code, out, _ = run(capsys, "channels", str(example), "--at", "2026-12-06T02:30+08:00",
                       "--amount", "4000", "--currency", "USD", "--json")

    data = json.loads(out)
    assert 0 == code
    assert ["wallet"] == data["order"]
    assert {"auto_debit": "limits", "bank_card": "limits", "wallet": None} == {
        c["channel"]: c["reason"] for c in data["channels"]}


def test_channels_needs_an_offset(capsys):
    """An --at without a UTC offset is refused with a hint, exit 2."""
    example = Path(__file__).parent.parent / "examples" / "failover.toml"

    code, _, err = run(capsys, "channels", str(example), "--at", "2026-12-06T02:30")

    assert 2 == code
    assert "UTC offset" in err


def test_console_script_entry_point(tmp_path):
    """The installed `failover` command runs (validate on the example file)."""
    beside_python = Path(sys.executable).with_name("failover")
    command = str(beside_python) if beside_python.exists() else shutil.which("failover")
    if command is None:
        pytest.skip("the failover console script is not installed on PATH")
    example = Path(__file__).parent.parent / "examples" / "failover.toml"

    done = subprocess.run([command, "validate", str(example)], capture_output=True, text=True,
                          timeout=60)

    assert 0 == done.returncode, done.stderr
    assert "valid" in done.stdout


def test_status_reads_while_the_service_runs_and_reconcile_is_refused(pending_journal, capsys):
    """With a service holding the journal, status still reads it; reconcile is refused
    (exit 2) instead of racing the service on the same repayments."""
    journal, _, config = pending_journal

    async def while_running() -> tuple[tuple[int, str, str], tuple[int, str, str]]:
        service = failover.SQLiteJournal(journal)
        await service.open()
        try:
            status = await asyncio.to_thread(run, capsys, "status", "--journal", str(journal))
            reconcile = await asyncio.to_thread(run, capsys, "reconcile", str(config),
                                                "--journal", str(journal))
        finally:
            await service.close()
        return status, reconcile

    (status_code, status_out, _), (code, _, err) = asyncio.run(while_running())

    assert 0 == status_code
    assert "pending 3" in status_out
    assert 2 == code
    assert "another process" in err


def test_migrate_creates_a_file_journal(tmp_path, capsys):
    """migrate on a path without a journal creates one (version 0 -> 1) that status reads."""
    journal = tmp_path / "journal.db"

    code, out, err = run(capsys, "migrate", str(journal), "--json")
    status_code, status_out, _ = run(capsys, "status", "--journal", str(journal), "--json")

    assert 0 == code, err
    assert {"journal": str(journal), "before": 0, "after": SCHEMA_VERSION,
            "migrated": True} == json.loads(out)
    assert 0 == status_code
    assert {"pending": 0, "succeeded": 0, "failed": 0} == json.loads(status_out)["by_status"]


def test_migrate_of_a_current_file_journal_changes_nothing(pending_journal, capsys):
    """migrate on a journal already at this version says so and leaves it as it was."""
    journal, _, _ = pending_journal
    before = journal.read_bytes()

    code, out, _ = run(capsys, "migrate", str(journal))

    assert 0 == code
    assert [f"{journal}: version {SCHEMA_VERSION}, up to date (nothing to do)"] == out.splitlines()
    assert before == journal.read_bytes()


def test_migrate_refuses_an_sqlite_database_that_is_not_a_journal(tmp_path, capsys):
    """migrate does not write failover's tables into someone else's SQLite database."""
    import sqlite3

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE loans (id INTEGER)")
    before = other.read_bytes()

    code, _, err = run(capsys, "migrate", str(other))

    assert 2 == code
    assert [f"failover migrate: --journal: {other} is an SQLite database but not a failover"
            " journal"] == err.splitlines()
    assert before == other.read_bytes()


@pytest.mark.parametrize("command", [["status"], ["inspect", "k"], ["migrate"], ["demo"]])
def test_schema_is_refused_for_a_file_journal(tmp_path, capsys, command):
    """--schema names a PostgreSQL schema: with an SQLite file it is a usage error, exit 2."""
    journal = tmp_path / "journal.db"
    where = [str(journal)] if command == ["migrate"] else ["--journal", str(journal)]

    code, _, err = run(capsys, *command, *where, "--schema", "other")

    assert 2 == code
    assert "--schema: only for a PostgreSQL journal" in err
    assert not journal.exists()


def test_demo_refuses_a_journal_that_holds_repayments(pending_journal, capsys):
    """The demo audits its own repayments only: a journal already holding some is refused
    (exit 2) instead of reporting their collections as false successes."""
    journal, _, _ = pending_journal

    code, out, err = run(capsys, "demo", "--repayments", "10", "--journal", str(journal))

    assert 2 == code
    assert "" == out
    assert [f"failover demo: --journal: {journal} already holds 4 repayments; the demo needs"
            " an empty journal (a new file or schema)"] == err.splitlines()
