"""Operator commands on both journals: ``failover list`` (and ``purge`` in
tests/test_accounts_at_rest.py).  Accounts are masked in every output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from failover.cli import main

from .conftest import repayment
from .test_cli_journal import pending_journal  # noqa: F401 - the SQLite fixture
from .test_cli_postgres import pending_pg  # noqa: F401 - the PostgreSQL fixture

ACCOUNT = repayment().account


@pytest.fixture(params=["sqlite", "postgres"])
def journal_args(request: pytest.FixtureRequest) -> list[str]:
    """--journal (and --schema) of a journal holding 3 pending on 'primary' and 1 that
    succeeded on 'backup'."""
    if request.param == "sqlite":
        journal, _, _ = request.getfixturevalue("pending_journal")
        return ["--journal", str(journal)]
    dsn, _, _ = request.getfixturevalue("pending_pg")
    return ["--journal", dsn, "--schema", request.getfixturevalue("pg_schema")]


def listed(capsys: Any, *argv: str) -> list[dict[str, Any]]:
    assert 0 == main(["list", *argv, "--json"])
    out = capsys.readouterr().out
    assert ACCOUNT not in out
    return json.loads(out)["repayments"]  # type: ignore[no-any-return]


def test_list_filters_by_status_channel_and_code(journal_args, capsys):
    pending = listed(capsys, *journal_args, "--status", "pending")
    assert ["pending-0", "pending-1", "pending-2"] == sorted(r["key"] for r in pending)
    assert {("primary", "awaiting_channel")} == {(r["channel"], r["pending_reason"])
                                                  for r in pending}
    assert ["moved"] == [r["key"] for r in listed(capsys, *journal_args, "--status",
                                                   "succeeded", "--channel", "backup")]
    assert [] == listed(capsys, *journal_args, "--status", "failed")
    everything = listed(capsys, *journal_args)
    assert 4 == len(everything)
    assert {"*" * (len(ACCOUNT) - 4) + ACCOUNT[-4:]} == {r["account"] for r in everything}
    assert 2 == len(listed(capsys, *journal_args, "--limit", "2"))


def test_list_by_date_and_as_a_table(journal_args, capsys):
    assert [] == listed(capsys, *journal_args, "--since", "2100-01-01")
    assert 4 == len(listed(capsys, *journal_args, "--until", "2100-01-01"))
    assert 0 == main(["list", *journal_args, "--status", "pending"])
    out = capsys.readouterr().out
    assert "3 repayment(s)" in out
    assert "pending (awaiting_channel)" in out
    assert ACCOUNT not in out


def test_list_refuses_a_bad_date_naming_the_option(journal_args, capsys):
    assert 2 == main(["list", *journal_args, "--since", "yesterday"])
    assert "--since" in capsys.readouterr().err


def test_list_of_a_missing_sqlite_journal_is_refused(tmp_path: Path, capsys):
    assert 2 == main(["list", "--journal", str(tmp_path / "none.db")])
    assert "no journal" in capsys.readouterr().err


# ---- resolve --------------------------------------------------------------------------

def resolve(capsys: Any, journal_args: list[str], *argv: str) -> tuple[int, dict[str, Any],
                                                                        str]:
    code = main(["resolve", *argv, *journal_args, "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {}), err


def test_resolve_collected_by_hand_is_an_attributed_correction(journal_args, capsys):
    """An operator's evidence ends a pending repayment SUCCEEDED; the correction keeps
    the old state, who did it and the note."""
    code, data, err = resolve(capsys, journal_args, "pending-0", "--collected-by",
                              "primary", "--channel-reference", "BANK-778",
                              "--note", "bank statement line 42", "--by", "ops-ana")

    assert 0 == code, err
    assert ("succeeded", "primary", "BANK-778") == (data["status"], data["channel"],
                                                   data["channel_reference"])
    [row] = listed(capsys, *journal_args, "--status", "succeeded", "--channel", "primary")
    assert ("pending-0", 1) == (row["key"], row["corrections"])
    [correction] = stored(journal_args, "pending-0").corrections
    assert ("operator", "pending", "succeeded", "operator ops-ana: bank statement line 42") \
        == (correction.reason, correction.old_status.value, correction.new_status.value,
            correction.evidence)


def stored(journal_args: list[str], key: str) -> Any:
    """The record as the journal holds it, read beside the command."""
    import asyncio

    from failover.journal import open_journal

    options = {"schema": journal_args[3]} if "--schema" in journal_args else {}

    async def read() -> Any:
        journal = open_journal(journal_args[1], read_only=True, **options)
        await journal.open()
        try:
            return await journal.load(key)
        finally:
            await journal.close()

    return asyncio.run(read())


def test_resolve_not_collected_ends_it_failed(journal_args, capsys):
    code, data, err = resolve(capsys, journal_args, "pending-1", "--not-collected",
                              "--note", "gateway confirms no such payment")
    assert 0 == code, err
    assert "failed" == data["status"]
    assert ["pending-1"] == [r["key"] for r in listed(capsys, *journal_args, "--status",
                                                       "failed")]


def test_resolve_refuses_a_repayment_that_is_not_pending(journal_args, capsys):
    code, _, err = resolve(capsys, journal_args, "moved", "--not-collected", "--note", "x")
    assert 2 == code
    assert "succeeded, not pending" in err
    code, _, err = resolve(capsys, journal_args, "nobody", "--not-collected", "--note", "x")
    assert 2 == code
    assert "no repayment 'nobody'" in err


def test_resolve_needs_one_kind_of_evidence(journal_args, capsys):
    code, _, err = resolve(capsys, journal_args, "pending-0", "--note", "x")
    assert (2, True) == (code, "--not-collected" in err)
    code, _, err = resolve(capsys, journal_args, "pending-0", "--collected-by", "primary",
                           "--note", "x")
    assert (2, True) == (code, "--channel-reference" in err)


def test_resolve_warns_when_the_channels_own_query_disagrees(request, journal_args, capsys):
    """With --config the channel is asked: primary collected these (its ledger says so),
    so resolving one as not collected warns; it is still resolved as the operator says,
    and the sweep's re-query would correct it from the channel's answer."""
    fixture = "pending_journal" if "--schema" not in journal_args else "pending_pg"
    _, _, config = request.getfixturevalue(fixture)

    code, data, err = resolve(capsys, journal_args, "pending-2", "--not-collected",
                              "--note", "customer says unpaid", "--config", str(config))

    assert 0 == code
    assert "failed" == data["status"]
    assert "primary's own query says succeeded" in err
    assert [w for w in data["warnings"] if "succeeded" in w]
