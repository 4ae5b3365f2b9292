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
