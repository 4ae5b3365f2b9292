"""Account numbers protected at rest: the journal's codec, purge, and file permissions."""

from __future__ import annotations

import os
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import failover
from failover import ChannelResult, IdempotencyConflict, RepaymentStatus
from failover.codec import PURGED, FernetCodec
from failover.testing import FakeClock, ScriptedChannel

from . import pg
from .conftest import repayment

ACCOUNT = "6222020200112233445"  # what must never be found at rest


def codec(*keys: str) -> FernetCodec:
    return FernetCodec(list(keys) or [FernetCodec.generate_key()])


def raw_sqlite(path: Path) -> bytes:
    """Every byte SQLite keeps for the journal: the file and its write-ahead log."""
    return b"".join(p.read_bytes() for p in path.parent.iterdir()
                    if p.name.startswith(path.name))


@pytest.fixture(params=["sqlite", "postgres"])
def at_rest(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """``make(codec) -> journal`` on private storage, and ``raw() -> bytes`` of it."""
    kind = request.param
    schema = pg.schema_for(str(tmp_path)) if kind == "postgres" else None

    def make(codec: FernetCodec | None = None) -> failover.Journal:
        if kind == "sqlite":
            return failover.SQLiteJournal(tmp_path / "journal.db", codec=codec)
        return failover.PostgresJournal(pg.require(), schema=schema, migrate=True,
                                        instance="at-rest", codec=codec)

    async def raw() -> bytes:
        if kind == "sqlite":
            return raw_sqlite(tmp_path / "journal.db")
        import asyncpg

        conn = await asyncpg.connect(pg.require())
        try:
            rows = await conn.fetch(f"SELECT * FROM {schema}.repayments")
            return repr([tuple(r) for r in rows]).encode()
        finally:
            await conn.close()

    make.raw = raw  # type: ignore[attr-defined]
    return make


async def test_with_the_codec_no_account_number_is_stored(at_rest):
    """The channel gets the account; the journal's file (or table) never holds it."""
    card = ScriptedChannel("card")
    async with failover.Router([card], at_rest(codec()), clock=FakeClock()) as router:
        result = await router.repay(repayment(account=ACCOUNT))

    assert RepaymentStatus.SUCCEEDED == result.status
    assert [ACCOUNT] == [r.account for r in card.requests]
    assert ACCOUNT.encode() not in await at_rest.raw()
    assert b"fernet:" in await at_rest.raw()


async def test_without_the_codec_the_account_is_stored_as_given(at_rest):
    """The check above can fail: without a codec the account is in the raw storage."""
    async with failover.Router([ScriptedChannel("card")], at_rest(),
                               clock=FakeClock()) as router:
        await router.repay(repayment(account=ACCOUNT))

    assert ACCOUNT.encode() in await at_rest.raw()


async def test_a_key_reused_for_another_account_is_still_refused(at_rest):
    """Idempotency compares the decoded account: the same key with another account is a
    conflict, the same account is the same repayment."""
    card = ScriptedChannel("card")
    async with failover.Router([card], at_rest(codec()), clock=FakeClock()) as router:
        await router.repay(repayment(account=ACCOUNT))
        again = await router.repay(repayment(account=ACCOUNT))
        with pytest.raises(IdempotencyConflict, match="account"):
            await router.repay(repayment(account="6222020200999999999"))

    assert RepaymentStatus.SUCCEEDED == again.status
    assert 1 == card.submits


async def test_a_pending_repayment_is_resumed_with_its_decoded_account(at_rest):
    """Recovery reads the account back and decodes it to call the channel."""
    keys = [FernetCodec.generate_key()]
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")],
                           queries=[ChannelResult.unknown("query_timeout")] * 3,
                           idempotent=True)
    config = failover.RouterConfig.model_validate(
        {"channels": {"card": {"settle_s": 0, "retry": {"max_attempts": 1}}}})
    async with failover.Router([card], at_rest(codec(*keys)), config,
                               clock=FakeClock()) as router:
        assert RepaymentStatus.PENDING == (await router.repay(repayment(account=ACCOUNT))).status
    async with failover.Router([card], at_rest(codec(*keys)), config,
                               clock=FakeClock()) as router:
        await router.wait_recovered()
        result = await router.get(repayment().key)

    assert RepaymentStatus.SUCCEEDED == result.status
    assert {ACCOUNT} == {r.account for r in card.requests + card.query_requests}


async def test_keys_rotate_and_a_missing_key_is_an_error_naming_the_repayment(at_rest):
    """A new key first and the old one after: old accounts still read.  Without the
    key that encrypted it, reading fails loudly rather than giving a wrong account."""
    old, new = FernetCodec.generate_key(), FernetCodec.generate_key()
    journal = at_rest(codec(old))
    await journal.open()
    await journal.create(repayment(account=ACCOUNT), None, FakeClock().now())
    await journal.close()

    rotated = at_rest(codec(new, old))
    await rotated.open()
    try:
        assert ACCOUNT == (await rotated.load(repayment().key)).account
    finally:
        await rotated.close()
    lost = at_rest(codec(new))
    await lost.open()
    try:
        with pytest.raises(failover.JournalError, match=repayment().key):
            await lost.load(repayment().key)
    finally:
        await lost.close()


def test_keys_come_from_the_environment_and_bad_ones_are_named():
    key = FernetCodec.generate_key()
    assert ACCOUNT == FernetCodec.from_env(environ={"FAILOVER_ACCOUNT_KEYS": f" {key} "}
                                           ).decode(codec(key).encode(ACCOUNT))
    with pytest.raises(failover.ConfigError, match="FAILOVER_ACCOUNT_KEYS is not set"):
        FernetCodec.from_env(environ={})
    with pytest.raises(failover.ConfigError, match="key 2 is not a Fernet key"):
        FernetCodec([key, "not-a-key"])


async def test_purge_erases_ended_accounts_and_keeps_the_audit_trail(at_rest):
    """Repayments that ended before the date lose their account; their attempts stay;
    pending ones and later ones keep theirs; the count says how many were erased."""
    clock = FakeClock()
    card = ScriptedChannel("card", [ChannelResult.succeeded("c-1"),
                                    ChannelResult.unknown("timeout")],
                           queries=[ChannelResult.unknown("query_timeout")] * 3)
    config = failover.RouterConfig.model_validate({"channels": {"card": {"settle_s": 0}}})
    journal = at_rest()
    async with failover.Router([card], journal, config, clock=clock) as router:
        await router.repay(repayment(key="old", account=ACCOUNT))
        await router.repay(repayment(key="waiting", account=ACCOUNT))
        clock.advance(86400)
        cutoff = clock.now()
        clock.advance(60)
        await router.repay(repayment(key="recent", account=ACCOUNT))

        assert 1 == await journal.purge_accounts(cutoff)
        assert 0 == await journal.purge_accounts(cutoff)
        old = await journal.load("old")
        assert (PURGED, RepaymentStatus.SUCCEEDED, 1) == (old.account, old.status,
                                                          len(old.attempts))
        assert ACCOUNT == (await journal.load("waiting")).account
        assert ACCOUNT == (await journal.load("recent")).account


async def test_the_sqlite_files_are_readable_by_their_owner_only(tmp_path):
    """The journal, its write-ahead log, shared memory and lock file: mode 0600 whatever
    the umask."""
    previous = os.umask(0o022)
    try:
        path = tmp_path / "journal.db"
        async with failover.Router([ScriptedChannel("card")], failover.SQLiteJournal(path),
                                   clock=FakeClock()) as router:
            await router.repay(repayment())
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(previous)

    assert {"journal.db", "journal.db-wal", "journal.db-shm", "journal.db.lock"} <= set(modes)
    assert {0o600} == set(modes.values()), modes


def test_purge_from_the_command_line(tmp_path, capsys):
    """``failover purge --journal J --before DATE``: erased count, no account printed."""
    import asyncio

    from failover.cli import main

    path = tmp_path / "journal.db"
    clock = FakeClock()

    async def pay() -> None:
        async with failover.Router([ScriptedChannel("card")], failover.SQLiteJournal(path),
                                   clock=clock) as router:
            await router.repay(repayment(account=ACCOUNT))

    asyncio.run(pay())
    before = (clock.now() + timedelta(days=1)).date().isoformat()

    assert 0 == main(["purge", "--journal", str(path), "--before", before, "--json"])
    out = capsys.readouterr().out
    assert '"erased": 1' in out
    assert ACCOUNT not in out
