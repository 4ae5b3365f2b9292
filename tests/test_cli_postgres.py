"""The failover command on a PostgreSQL journal: migrate, status, inspect, reconcile, demo.

Each test works in a schema of its own (``pg_schema``: a random name, dropped at the end
of the run).  Without a server at FAILOVER_TEST_POSTGRES_DSN the tests that need one
skip, or fail when FAILOVER_REQUIRE_POSTGRES=1 (``postgres_dsn``, tests/pg.py).  The
error tests need no server: nothing listens on port 1.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import failover
from failover.cli import main
from failover.events import AttemptStarted, Event
from failover.testing import (
    HANG,
    FakeClock,
    FaultProfile,
    ScriptedChannel,
    SimulatedChannel,
    SQLiteLedger,
)

from .conftest import fast, repayment
from .test_cli_journal import CONFIG, fill_late, manual_row

asyncpg = pytest.importorskip("asyncpg")

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1
PASSWORD = "s3cr3t-Pa55"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def _fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    return asyncio.run(_fetch(dsn, query, *args))


def schema_exists(dsn: str, schema: str) -> bool:
    return bool(fetch(dsn, "SELECT 1 FROM pg_namespace WHERE nspname = $1", schema))


def schema_snapshot(dsn: str, schema: str) -> list[tuple[Any, ...]]:
    """The schema's tables and columns, and its meta rows: what a write would change."""
    columns = fetch(dsn, "SELECT table_name, column_name, data_type FROM"
                         " information_schema.columns WHERE table_schema = $1 ORDER BY 1, 2",
                    schema)
    meta = fetch(dsn, f'SELECT * FROM "{schema}".meta')
    return [tuple(r) for r in columns] + [tuple(r) for r in meta]


def with_password(dsn: str) -> str:
    """The DSN with a password in it (the test server trusts, so any password does)."""
    scheme, _, rest = dsn.partition("://")
    userinfo, at, hosts = rest.rpartition("@")
    if at and ":" in userinfo:
        return dsn
    user = userinfo if at else "postgres"
    return f"{scheme}://{user}:{PASSWORD}@{hosts}"


def password_of(dsn: str) -> str:
    return dsn.partition("://")[2].rpartition("@")[0].partition(":")[2]


def masked(dsn: str) -> str:
    """How the command names ``dsn`` (these DSNs hold a password in the user part, if any)."""
    password = password_of(dsn)
    return dsn.replace(f":{password}@", ":***@", 1) if password else dsn


@pytest.fixture
def pending_pg(postgres_dsn: str, pg_schema: str, tmp_path: Path) -> tuple[str, Path, Path]:
    """A PostgreSQL journal with 3 repayments PENDING on 'primary' (collected, queries
    failing), 1 that failed over to 'backup', and the config that heals them."""
    ledger, config = tmp_path / "ledger.db", tmp_path / "failover.toml"
    config.write_text(CONFIG.format(ledger=ledger))
    in_doubt = FaultProfile(unknown_collected=1.0, query_failure=1.0)
    primary = SimulatedChannel("primary", in_doubt, idempotent=False, ledger=SQLiteLedger(ledger))
    backup = SimulatedChannel("backup", idempotent=True, ledger=SQLiteLedger(ledger))

    async def fill() -> None:
        journal = failover.PostgresJournal(postgres_dsn, schema=pg_schema, migrate=True)
        async with failover.Router([primary, backup], journal, clock=FakeClock(),
                                   background=False) as router:
            for i in range(3):
                await router.repay(repayment(key=f"pending-{i}"))
            primary.profile = FaultProfile(unavailable=1.0)
            await router.repay(repayment(key="moved"))

    asyncio.run(fill())
    return postgres_dsn, ledger, config


# ---- migrate -------------------------------------------------------------------------------

def test_migrate_creates_the_schema(postgres_dsn, pg_schema, capsys):
    """migrate on a fresh schema applies every migration: version 0 -> 1, exit 0."""
    code, out, err = run(capsys, "migrate", postgres_dsn, "--schema", pg_schema, "--json")

    assert 0 == code, err
    assert {"journal": masked(postgres_dsn), "schema": pg_schema, "before": 0,
            "after": failover.journal.PG_SCHEMA_VERSION, "migrated": True} == json.loads(out)
    assert [(failover.journal.PG_SCHEMA_VERSION,)] == [
        tuple(r) for r in fetch(postgres_dsn, f'SELECT version FROM "{pg_schema}".meta')]


def test_migrate_twice_is_a_no_op(postgres_dsn, pg_schema, capsys):
    """A second migrate finds the schema current, says so, exits 0 and changes nothing."""
    run(capsys, "migrate", postgres_dsn, "--schema", pg_schema)
    before = schema_snapshot(postgres_dsn, pg_schema)

    code, out, _ = run(capsys, "migrate", postgres_dsn, "--schema", pg_schema)

    version = failover.journal.PG_SCHEMA_VERSION
    assert 0 == code
    assert out.rstrip().endswith(f": version {version}, up to date (nothing to do)")
    assert before == schema_snapshot(postgres_dsn, pg_schema)


def test_migrate_prints_the_versions(postgres_dsn, pg_schema, capsys):
    """Without --json, migrate names the schema and the versions it went between."""
    code, out, _ = run(capsys, "migrate", postgres_dsn, "--schema", pg_schema)

    assert 0 == code
    assert [f"schema {pg_schema!r} in {masked(postgres_dsn)}: version 0 -> "
            f"{failover.journal.PG_SCHEMA_VERSION} (created)"] == out.splitlines()


def test_migrate_refuses_a_newer_schema(postgres_dsn, pg_schema, capsys):
    """A schema written by a newer failover (meta version above the code's) is refused:
    exit 2, one line naming the versions, nothing written."""
    run(capsys, "migrate", postgres_dsn, "--schema", pg_schema)
    newer = failover.journal.PG_SCHEMA_VERSION + 1
    fetch(postgres_dsn, f'UPDATE "{pg_schema}".meta SET version = $1', newer)
    before = schema_snapshot(postgres_dsn, pg_schema)

    code, out, err = run(capsys, "migrate", postgres_dsn, "--schema", pg_schema)

    assert 2 == code
    assert "" == out
    [line] = err.splitlines()
    assert line.startswith("failover migrate: ")
    assert str(newer) in line
    assert before == schema_snapshot(postgres_dsn, pg_schema)


@pytest.mark.parametrize("command", [["status"], ["inspect", "pending-0"]])
def test_readers_refuse_a_newer_schema(pending_pg, pg_schema, capsys, command):
    """status and inspect refuse a schema newer than the code: exit 2, one line."""
    dsn, _, _ = pending_pg
    fetch(dsn, f'UPDATE "{pg_schema}".meta SET version = $1',
          failover.journal.PG_SCHEMA_VERSION + 1)

    code, _, err = run(capsys, *command, "--journal", dsn, "--schema", pg_schema)

    assert 2 == code
    assert 1 == len(err.splitlines())
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["status"], ["inspect", "k"]])
def test_readers_of_a_missing_schema_fail_and_create_nothing(postgres_dsn, pg_schema, capsys,
                                                            command):
    """status and inspect on a schema that was never migrated: exit 2, one line pointing
    at failover migrate, and the schema is still absent (they open read-only)."""
    code, _, err = run(capsys, *command, "--journal", postgres_dsn, "--schema", pg_schema)

    assert 2 == code
    [line] = err.splitlines()
    assert line.startswith(f"failover {command[0]}: ")
    assert "failover migrate" in line
    assert not schema_exists(postgres_dsn, pg_schema)


def test_reconcile_of_a_missing_schema_does_not_create_it(postgres_dsn, pg_schema, tmp_path,
                                                         capsys):
    """reconcile does not migrate: on a schema never migrated it fails (exit 2), creating
    nothing."""
    config = tmp_path / "failover.toml"
    config.write_text(CONFIG.format(ledger=tmp_path / "ledger.db"))

    code, _, err = run(capsys, "reconcile", str(config), "--journal", postgres_dsn,
                       "--schema", pg_schema)

    assert 2 == code
    assert 1 == len(err.splitlines())
    assert not schema_exists(postgres_dsn, pg_schema)


# ---- status / inspect ----------------------------------------------------------------------

def test_status_counts_pending_and_failovers(pending_pg, pg_schema, capsys):
    """status on PostgreSQL shows counts by status, the pending ones and the failover."""
    dsn, _, _ = pending_pg

    code, out, err = run(capsys, "status", "--journal", dsn, "--schema", pg_schema, "--json")

    data = json.loads(out)
    assert 0 == code, err
    assert {"pending": 3, "succeeded": 1, "failed": 0} == data["by_status"]
    assert {"pending-0", "pending-1", "pending-2"} == {p["key"] for p in data["pending"]}
    assert [("moved", "primary", "backup")] == [(m["key"], m["from"], m["to"])
                                                for m in data["recent_failovers"]]
    assert pg_schema == data["schema"]


def test_status_lists_the_manual_refunds(postgres_dsn, pg_schema, capsys):
    """status on PostgreSQL counts the late collections and lists the manual refunds,
    as on SQLite, without accounts."""
    clock = asyncio.run(fill_late(failover.PostgresJournal(postgres_dsn, schema=pg_schema,
                                                           migrate=True)))

    code, out, err = run(capsys, "status", "--journal", postgres_dsn, "--schema", pg_schema,
                         "--json")
    text_code, text, _ = run(capsys, "status", "--journal", postgres_dsn, "--schema", pg_schema)

    data = json.loads(out)
    assert (0, 0) == (code, text_code), err
    assert {"found": 3, "refunded": 1, "refunding": 0, "manual": 2} == data["late_collections"]
    since = clock.now().isoformat()
    assert [manual_row("manual-1", "card-1", since), manual_row("manual-2", "card-3", since)] \
        == data["manual_refunds"]
    assert "manual refunds (2, to give back by hand):" in text
    assert "6222021234567890" not in out + text


def test_status_masks_the_password(pending_pg, pg_schema, capsys):
    """The journal is named by its DSN with the password shown as ***."""
    dsn = with_password(pending_pg[0])

    code, out, err = run(capsys, "status", "--journal", dsn, "--schema", pg_schema)
    json_code, json_out, _ = run(capsys, "status", "--journal", dsn, "--schema", pg_schema,
                                 "--json")

    assert (0, 0) == (code, json_code), err
    assert password_of(dsn) not in out + json_out
    assert ":***@" in out.splitlines()[0]
    assert ":***@" in json.loads(json_out)["journal"]
    assert f"(schema {pg_schema}): pending 3, succeeded 1, failed 0" in out


def test_inspect_shows_attempts(pending_pg, pg_schema, capsys):
    """inspect on PostgreSQL lists the attempts; the account is masked."""
    dsn, _, _ = pending_pg

    code, out, _ = run(capsys, "inspect", "moved", "--journal", dsn, "--schema", pg_schema,
                       "--json")

    data = json.loads(out)
    assert 0 == code
    assert ("backup", "succeeded") == (data["attempts"][-1]["channel"],
                                       data["attempts"][-1]["outcome"])
    assert {("primary", "unavailable")} == {(a["channel"], a["outcome"])
                                            for a in data["attempts"][:-1]}
    assert "6222021234567890" not in out


def test_inspect_unknown_key_is_exit_1(pending_pg, pg_schema, capsys):
    """inspect of a key the PostgreSQL journal lacks exits 1, naming the masked journal."""
    dsn = with_password(pending_pg[0])

    code, _, err = run(capsys, "inspect", "nope", "--journal", dsn, "--schema", pg_schema)

    assert 1 == code
    assert "no repayment 'nope' in " in err
    assert password_of(dsn) not in err


def test_readers_write_nothing(pending_pg, pg_schema, capsys):
    """status and inspect leave the journal as they found it (read-only)."""
    dsn, _, _ = pending_pg
    rows = f'SELECT * FROM "{pg_schema}".repayments ORDER BY key'
    before = [tuple(r) for r in fetch(dsn, rows)]

    run(capsys, "status", "--journal", dsn, "--schema", pg_schema)
    run(capsys, "inspect", "pending-0", "--journal", dsn, "--schema", pg_schema)

    assert before == [tuple(r) for r in fetch(dsn, rows)]


# ---- reconcile -----------------------------------------------------------------------------

def test_reconcile_resolves_pending(pending_pg, pg_schema, capsys):
    """reconcile on PostgreSQL settles every pending repayment; the ledger shows each
    collected exactly once."""
    dsn, ledger, config = pending_pg

    code, out, err = run(capsys, "reconcile", str(config), "--journal", dsn,
                         "--schema", pg_schema, "--json")

    data = json.loads(out)
    assert 0 == code, err
    assert {"succeeded": 3, "failed": 0, "pending": 0} == data["outcomes"]
    keys = [c.repayment_key for c in SQLiteLedger(ledger).collections()]
    assert sorted(["pending-0", "pending-1", "pending-2", "moved"]) == sorted(keys)


def service_channels() -> list[ScriptedChannel]:
    """A running service's channels, still broken: queries prove nothing (the service
    lets go of the pending repayments after trying them), submits never answer."""
    unknown = failover.ChannelResult.unknown()
    return [ScriptedChannel("primary", [HANG], queries=[unknown] * 50),
            ScriptedChannel("backup", [HANG], queries=[unknown] * 50)]


def service_router(dsn: str, schema: str, **kw: Any) -> failover.Router:
    """A service instance on the journal, on the real clock, its background loop on."""
    journal = failover.PostgresJournal(dsn, schema=schema, instance="service")
    return failover.Router(service_channels(), journal,
                           fast(primary={"timeout_s": 20}, backup={"timeout_s": 20}), **kw)


def test_reconcile_works_beside_a_running_service(pending_pg, pg_schema, capsys):
    """Unlike an SQLite file, a PostgreSQL journal is shared: reconcile runs while a
    service has it open, and settles the pending repayments once each."""
    dsn, ledger, config = pending_pg

    async def while_running() -> tuple[int, str, str]:
        async with service_router(dsn, pg_schema) as service:
            await service.wait_recovered()  # it tried them, could not settle them, let go
            return await asyncio.to_thread(run, capsys, "reconcile", str(config),
                                           "--journal", dsn, "--schema", pg_schema, "--json")

    code, out, err = asyncio.run(while_running())

    assert 0 == code, out + err
    assert {"succeeded": 3, "failed": 0, "pending": 0} == json.loads(out)["outcomes"]
    keys = [c.repayment_key for c in SQLiteLedger(ledger).collections()]
    assert sorted(["pending-0", "pending-1", "pending-2", "moved"]) == sorted(keys)


def test_reconcile_leaves_a_repayment_another_instance_is_driving(pending_pg, pg_schema,
                                                                  capsys):
    """A repayment in flight on a running service (its lease is live) is left to it:
    reconcile names it, calls no channel for it, and exits 0 for what it could settle."""
    dsn, ledger, config = pending_pg

    async def while_in_flight() -> tuple[int, str, str]:
        sent = asyncio.Event()

        def watch(event: Event) -> None:
            if isinstance(event, AttemptStarted) and event.key == "busy":
                sent.set()

        async with service_router(dsn, pg_schema, hooks=[watch]) as service:
            await service.wait_recovered()
            busy = asyncio.create_task(service.repay(repayment(key="busy")))
            await sent.wait()  # its call is in the air
            outcome = await asyncio.to_thread(run, capsys, "reconcile", str(config),
                                              "--journal", dsn, "--schema", pg_schema,
                                              "--json")
            busy.cancel()
            await service.close(grace_s=0)  # no need to wait for the hanging call
            return outcome

    code, out, err = asyncio.run(while_in_flight())

    data = json.loads(out)
    assert 0 == code, out + err
    assert ["busy"] == data["held_elsewhere"]
    assert {"succeeded": 3, "failed": 0, "pending": 0} == data["outcomes"]
    assert "busy" not in [c.repayment_key for c in SQLiteLedger(ledger).collections()]


# ---- demo ----------------------------------------------------------------------------------

def test_demo_on_postgres_audits_clean(postgres_dsn, pg_schema, capsys):
    """demo --journal postgresql://... migrates the schema, runs the day on it and the
    ledger audit is clean; a second run on the now full schema is refused (exit 2)."""
    code, out, err = run(capsys, "demo", "--repayments", "200", "--seed", "3",
                         "--journal", postgres_dsn, "--schema", pg_schema)
    again, _, again_err = run(capsys, "demo", "--repayments", "200", "--seed", "3",
                              "--journal", postgres_dsn, "--schema", pg_schema)

    assert 0 == code, err
    assert "PostgreSQL journal" in out
    assert "duplicates 0, lost 0, false successes 0 -> OK" in out
    assert [(200,)] == [tuple(r) for r in fetch(
        postgres_dsn, f'SELECT count(*) FROM "{pg_schema}".repayments')]
    assert 2 == again
    assert "already holds 200 repayments" in again_err


# ---- errors without a server ---------------------------------------------------------------

def _commands(tmp_path: Path, dsn: str) -> dict[str, list[str]]:
    config = tmp_path / "failover.toml"
    config.write_text(CONFIG.format(ledger=tmp_path / "ledger.db"))
    return {
        "status": ["status", "--journal", dsn],
        "inspect": ["inspect", "k", "--journal", dsn],
        "reconcile": ["reconcile", str(config), "--journal", dsn],
        "migrate": ["migrate", dsn],
        "demo": ["demo", "--repayments", "10", "--journal", dsn],
    }


@pytest.mark.parametrize("command", ["status", "inspect", "reconcile", "migrate", "demo"])
def test_unreachable_server_is_one_line_and_exit_2(tmp_path, capsys, command):
    """A server that does not answer: exit 2, one line naming the journal, no traceback."""
    code, out, err = run(capsys, *_commands(tmp_path, UNREACHABLE)[command])

    assert 2 == code
    assert "" == out
    [line] = err.splitlines()
    assert line.startswith(f"failover {command}: cannot connect to journal {UNREACHABLE}: ")


@pytest.mark.parametrize("dsn", [
    f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/test",
    f"postgres://postgres:{PASSWORD}@127.0.0.1:1/test",
    f"postgresql://postgres@127.0.0.1:1/test?password={PASSWORD}&sslmode=disable",
])
@pytest.mark.parametrize("command", ["status", "migrate", "demo"])
def test_errors_mask_the_password(tmp_path, capsys, dsn, command):
    """An error names the journal with its password masked, in whichever form it was given."""
    code, _, err = run(capsys, *_commands(tmp_path, dsn)[command])

    assert 2 == code
    assert PASSWORD not in err
    assert "***" in err


@pytest.mark.parametrize("command", ["status", "migrate", "demo"])
def test_a_schema_name_the_journal_refuses_is_exit_2(tmp_path, capsys, command):
    """--schema takes a plain lower-case SQL name; anything else is refused before any
    connection: exit 2, one line naming the schema."""
    argv = _commands(tmp_path, UNREACHABLE)[command]

    code, _, err = run(capsys, *argv, "--schema", 'x"; DROP TABLE y; --')

    assert 2 == code
    [line] = err.splitlines()
    assert line.startswith(f"failover {command}: schema must be")
