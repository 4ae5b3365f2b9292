"""Regressions found by adversarial reviews (and the chaos test) of several instances on
one PostgreSQL journal, one test per defect, each checked against the channels' ledger.

Every test here failed (or hung, bounded by ``asyncio.wait_for``) before the fixes of
commit 68e6e29 (the first review), d76ff74 (the second: the tests from k20 on) or
bcdc594 (the third: from k28 on), or of the commit named in its docstring.  Two
journals with different ``instance`` names on one schema are two service instances; a
fault-injecting TCP proxy stands between a journal and the server where a test needs
the connection to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import pytest

import failover
from failover import Repayment, RepaymentStatus

from .pg_channels import BlockingChannel, Ledger, LedgerChannel
from .pg_proxy import Proxy


def config(timeout_s: float = 1.0) -> failover.RouterConfig:
    return failover.RouterConfig.model_validate({
        "channels": {
            name: {"timeout_s": timeout_s, "settle_s": 0.2,
                   "retry": {"max_attempts": 2, "initial_backoff_s": 0.01,
                             "max_backoff_s": 0.02}}
            for name in ("card", "wallet")
        },
    })


def repayment(key: str) -> Repayment:
    return Repayment(key=key, account="acct-00001234", amount=Decimal("100.00"),
                     currency="CNY")


@dataclass
class Instance:
    router: failover.Router
    journal: failover.PostgresJournal
    card: Any
    wallet: Any


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
async def instances(postgres_dsn: str, pg_schema: str, ledger: Ledger
                    ) -> AsyncIterator[Callable[..., Awaitable[Instance]]]:
    """``make(name, ...)``: an open router instance on the shared schema, its channels
    on the one ledger; every one closed (bounded) at the end."""
    opened: list[failover.Router] = []

    async def make(name: str, *, card: Any = None, dsn: str = postgres_dsn,
                   lease_s: float = 2.0, timeout_s: float = 1.0, background: bool = False,
                   **options: Any) -> Instance:
        card = card if card is not None else LedgerChannel("card", ledger)
        wallet = LedgerChannel("wallet", ledger)
        # Unique names: a test below ends its instance's server sessions by name.
        journal = failover.PostgresJournal(
            dsn, schema=pg_schema, instance=f"{name}-{secrets.token_hex(3)}",
            lease_s=lease_s, migrate=True, connect_timeout_s=1, **options)
        router = failover.Router([card, wallet], journal, config(timeout_s),
                                 background=background, sweep_every_s=0.2)
        await router.open()
        opened.append(router)
        return Instance(router, journal, card, wallet)

    yield make
    for router in opened:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(router.close(grace_s=0), 5)


@pytest.fixture
async def proxy(postgres_dsn: str) -> AsyncIterator[Proxy]:
    target = urlsplit(postgres_dsn)
    started = await Proxy(target.hostname or "127.0.0.1", target.port or 5432).start()
    try:
        yield started
    finally:
        await started.stop()


async def _sql(dsn: str, query: str, *args: Any) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def _expire_leases(dsn: str, schema: str) -> None:
    await _sql(dsn, f"UPDATE {schema}.repayments SET lease_until = now()"
                    " - interval '1 second' WHERE status = 'pending'")


async def _until(condition: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.05)
    return await condition()


async def test_retry_on_two_instances_at_once_joins_one_new_round(
        instances, ledger, postgres_dsn, pg_schema):
    """Race on a shared row: both instances read FAILED, one's new round wins the row
    lock; the other's retry() joined it instead of raising OwnershipLost."""
    a, b = await instances("a"), await instances("b")
    for instance in (a, b):
        instance.card.decline = instance.wallet.decline = True
    assert RepaymentStatus.FAILED == (await a.router.repay(repayment("loan-1"))).status
    for instance in (a, b):
        instance.card.decline = instance.wallet.decline = False
    import asyncpg

    # A third session holds the row lock while both instances read and then queue on it.
    locker = await asyncpg.connect(postgres_dsn)
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute(f"SELECT 1 FROM {pg_schema}.repayments WHERE key = 'loan-1'"
                             " FOR UPDATE")
        retries = [asyncio.ensure_future(i.router.retry("loan-1")) for i in (a, b)]
        await asyncio.sleep(0.5)
        await transaction.rollback()
    finally:
        await locker.close()
    results = await asyncio.wait_for(asyncio.gather(*retries), 8)

    assert [RepaymentStatus.SUCCEEDED] * 2 == [r.status for r in results]
    assert 1 == len({r.channel_reference for r in results})
    assert 1 == len(ledger.collections("loan-1"))


async def test_a_drive_ended_on_a_journal_error_lets_its_lease_lapse(
        instances, ledger, postgres_dsn, proxy):
    """Orphaned lease: A's drive died on a JournalError (the database was cut while its
    submit was in the air) yet A kept renewing the lease, so B's repay of the key
    joined a drive that no longer existed and hung."""
    a = await instances("a", dsn=proxy.dsn(postgres_dsn))
    b = await instances("b", background=True)
    a.card.gate = asyncio.Event()
    a.card.unknown = True  # collects, then a timeout: A's next write is its answer
    caller = asyncio.ensure_future(a.router.repay(repayment("loan-2")))
    await asyncio.wait_for(a.card.entered.wait(), 5)
    proxy.cut()
    a.card.gate.set()  # the card collects while A cannot reach the database
    with pytest.raises(failover.JournalError):
        await asyncio.wait_for(caller, 5)
    proxy.heal()

    result = await asyncio.wait_for(b.router.repay(repayment("loan-2")), 6)

    assert RepaymentStatus.SUCCEEDED == result.status
    assert 1 == len(ledger.collections("loan-2"))
    assert [] == b.card.submits == b.wallet.submits  # B settled it by a query


async def test_creates_read_back_does_not_claim_an_older_repayment_of_the_key(
        instances, ledger, postgres_dsn, proxy):
    """Read-back that claims another write: the client's second repay of a key whose
    plain-def submit still ran lost its create's COMMIT answer; the read-back took the
    older row for a new one and submitted again to a non-idempotent channel."""
    card = BlockingChannel("card", ledger, idempotent=False)
    a = await instances("a", card=card, dsn=proxy.dsn(postgres_dsn), lease_s=30.0,
                        timeout_s=0.5)
    try:
        first = await asyncio.wait_for(a.router.repay(repayment("loan-3")), 5)
        assert RepaymentStatus.PENDING == first.status  # the thread outlived its timeout
        proxy.drop_at_commit(after=True)
        second = await asyncio.wait_for(a.router.repay(repayment("loan-3")), 8)
        assert 1 == proxy.dropped_commits
        card.release.set()
        await asyncio.wait_for(asyncio.to_thread(card.ended.wait, 5), 6)
        await asyncio.sleep(0.2)  # a second thread, if one was started, ends too
    finally:
        card.release.set()

    assert RepaymentStatus.PENDING == second.status
    assert 1 == len(card.submits), card.submits
    assert 1 == len(ledger.collections("loan-3"))


async def test_a_fenced_owner_after_the_new_owner_finished_gets_its_result(
        instances, ledger, postgres_dsn, pg_schema):
    """Wrong error on a fenced write: A's write, refused after B had taken the key over
    and finished it, raised TerminalStateError to A's caller, not B's SUCCEEDED."""
    a, b = await instances("a", lease_s=5.0), await instances("b", lease_s=5.0)
    a.card.gate = asyncio.Event()
    caller = asyncio.ensure_future(a.router.repay(repayment("loan-4")))
    await asyncio.wait_for(a.card.entered.wait(), 5)
    ledger.collect("loan-4", "card", a.card.submits[0], idempotent=True)  # it landed
    await _expire_leases(postgres_dsn, pg_schema)
    assert ["loan-4"] == await b.journal.take_expired(10)
    settled = await asyncio.wait_for(
        b.router._executor.drive(None, b.router._channels.layout, "loan-4"), 5)
    assert RepaymentStatus.SUCCEEDED == settled.status
    a.card.gate.set()  # A's submit answers after B finished

    result = await asyncio.wait_for(caller, 5)

    assert RepaymentStatus.SUCCEEDED == result.status
    assert settled.channel_reference == result.channel_reference
    assert 1 == len(ledger.collections("loan-4"))
    assert [] == a.wallet.submits == b.card.submits == b.wallet.submits


async def test_a_fenced_owner_whose_renewal_saw_the_loss_first_gets_the_result(
        instances, ledger, postgres_dsn, pg_schema):
    """Wrong error on a fenced write, second path (found by the chaos test): A was paused,
    B took the key over and finished it, and A's lease renewal noticed first and forgot
    the key; A's next write then had no token at all and its caller got
    TerminalStateError instead of B's SUCCEEDED."""
    a, b = await instances("a", lease_s=5.0), await instances("b", lease_s=5.0)
    a.card.gate = asyncio.Event()
    caller = asyncio.ensure_future(a.router.repay(repayment("loan-14")))
    await asyncio.wait_for(a.card.entered.wait(), 5)
    ledger.collect("loan-14", "card", a.card.submits[0], idempotent=True)  # it landed
    await _expire_leases(postgres_dsn, pg_schema)
    assert ["loan-14"] == await b.journal.take_expired(10)
    settled = await asyncio.wait_for(
        b.router._executor.drive(None, b.router._channels.layout, "loan-14"), 5)
    assert RepaymentStatus.SUCCEEDED == settled.status
    await a.journal._renew(["loan-14"])  # the renewal round that finds the key gone
    a.card.gate.set()

    result = await asyncio.wait_for(caller, 5)

    assert RepaymentStatus.SUCCEEDED == result.status
    assert settled.channel_reference == result.channel_reference
    assert 1 == len(ledger.collections("loan-14"))
    assert [] == a.wallet.submits == b.card.submits == b.wallet.submits


class BlackholeProxy(Proxy):
    """Blackholes a link at its next COMMIT, as a half-open connection does (state lost
    in a NAT or firewall, a partition without a reset): the COMMIT and all after it go
    nowhere and no socket is closed, so the server's session stays idle in transaction,
    holding its row locks, until the proxy is stopped."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self._freeze_next = False
        self._frozen: set[int] = set()
        self.frozen_commits = 0

    def freeze_at_commit(self) -> None:
        self._freeze_next = True

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    pair: tuple[asyncio.StreamWriter, ...], client: bool) -> None:
        link = id(pair[0])
        try:
            while data := await reader.read(65536):
                if link in self._frozen:
                    continue
                if client and self._freeze_next and b"COMMIT" in data.upper():
                    self._freeze_next = False
                    self._frozen.add(link)
                    self.frozen_commits += 1
                    continue
                writer.write(data)
                await writer.drain()
        finally:
            if link not in self._frozen:  # a frozen link stays open: stop() aborts it
                self._abort(pair)


async def test_a_half_open_connection_freezes_neither_other_instances_nor_other_keys(
        instances, ledger, postgres_dsn):
    """Unbounded wait on a dead peer: A's COMMIT vanished into a half-open connection;
    without statement, lock and idle-in-transaction timeouts A waited for ever, its
    session kept the row locked, and B's single writer (so every key on B) froze."""
    target = urlsplit(postgres_dsn)
    blackhole = await BlackholeProxy(target.hostname or "127.0.0.1",
                                     target.port or 5432).start()
    tasks: list[asyncio.Future[Any]] = []
    sessions: list[str] = []
    try:
        a = await instances("a", dsn=blackhole.dsn(postgres_dsn), background=True)
        sessions.append(f"failover:{a.journal.instance}")
        b = await instances("b", background=True)
        a.card.gate = asyncio.Event()
        tasks.append(asyncio.ensure_future(a.router.repay(repayment("k1"))))
        await asyncio.wait_for(a.card.entered.wait(), 5)
        blackhole.freeze_at_commit()
        a.card.gate.set()  # collects; A's write of the answer is the COMMIT lost
        await asyncio.sleep(0.5)
        assert 1 == blackhole.frozen_commits
        tasks.append(asyncio.ensure_future(b.router.repay(repayment("k1"))))  # a retry
        tasks.append(asyncio.ensure_future(b.router.repay(repayment("k2"))))  # unrelated

        done, _ = await asyncio.wait(tasks, timeout=8)

        assert [True, True, True] == [task in done for task in tasks]
        results = [task.result() for task in tasks]
        assert [RepaymentStatus.SUCCEEDED] * 3 == [r.status for r in results]
        assert 1 == len(ledger.collections("k1"))
        assert 1 == len(ledger.collections("k2"))
    finally:
        for task in tasks:
            task.cancel()
        await blackhole.stop()  # ends the frozen session too
        with contextlib.suppress(Exception):
            await _sql(postgres_dsn, "SELECT pg_terminate_backend(pid) FROM"
                       " pg_stat_activity WHERE application_name = ANY($1)", sessions)


async def test_a_second_instance_joins_an_owner_whose_thread_outlives_its_drive(
        instances, ledger):
    """Unbounded join: A's drive ended PENDING with its plain-def submit still running
    (A keeps the lease meanwhile); B's repay of the key waited for the thread, possibly
    for ever, instead of returning A's PENDING result."""
    card = BlockingChannel("card", ledger)
    try:
        a = await instances("a", card=card, timeout_s=0.5)
        b = await instances("b", timeout_s=0.5)
        owners = await asyncio.wait_for(a.router.repay(repayment("k8")), 5)
        assert RepaymentStatus.PENDING == owners.status

        joined = await asyncio.wait_for(b.router.repay(repayment("k8")), 5)

        assert (owners.status, owners.pending_reason) == (joined.status, joined.pending_reason)
        assert [] == b.card.submits == b.wallet.submits
        card.release.set()
        await asyncio.wait_for(asyncio.to_thread(card.ended.wait, 5), 6)
        assert 1 == len(ledger.collections("k8"))
    finally:
        card.release.set()


async def test_a_thread_still_running_after_close_keeps_the_repayment_from_takeover(
        instances, ledger):
    """Takeover while a submit can still collect: A closed its router while a plain-def
    submit ran on; its lease lapsed, B took over, saw NOT_FOUND and collected on the
    wallet, then A's thread collected on the card: two collections."""
    card = BlockingChannel("card", ledger)
    try:
        a = await instances("a", card=card, timeout_s=0.5)
        # B's card is async: it does not share this process's record of A's thread, as
        # another process would not.
        b = await instances("b", timeout_s=0.5, background=True)
        first = await asyncio.wait_for(a.router.repay(repayment("loan-5")), 5)
        assert RepaymentStatus.PENDING == first.status
        await asyncio.wait_for(a.router.close(grace_s=0.1), 5)
        await asyncio.sleep(3.0)  # past A's lease and B's sweep
        card.release.set()  # the hung call ends: the card collects
        await asyncio.wait_for(asyncio.to_thread(card.ended.wait, 5), 6)

        async def settled() -> bool:
            result = await b.router.get("loan-5")
            return result is not None and result.status is not RepaymentStatus.PENDING

        assert await _until(settled, 5)
    finally:
        card.release.set()

    assert 1 == len(ledger.collections("loan-5")), ledger.collections("loan-5")
    assert [] == b.wallet.submits
    final = await b.router.get("loan-5")
    assert final is not None
    assert (RepaymentStatus.SUCCEEDED, "card") == (final.status, final.channel)


class LoseCommitAnswer:
    """Makes ``proxy`` lose the COMMIT answer of ``journal``'s next operation named
    ``op`` once armed, and records whether that operation's fate was then read back
    (its ``settle`` ran, or its ``apply`` ran a second time)."""

    def __init__(self, journal: failover.PostgresJournal, proxy: Proxy, op: str,
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.read_back = False
        submit = journal._submit
        prefix = f"PostgresJournal.{op}."

        async def lossy(apply: Any, settle: Any = None, key: str | None = None,
                        **options: Any) -> Any:
            if self.armed and getattr(apply, "__qualname__", "").startswith(prefix):
                self.armed = False
                proxy.drop_at_commit(after=True)
                apply, settle = self._watch(apply, settle)
            return await submit(apply, settle, key, **options)

        monkeypatch.setattr(journal, "_submit", lossy)

    def _watch(self, apply: Any, settle: Any) -> tuple[Any, Any]:
        calls = 0

        async def watched_apply(conn: Any) -> Any:
            nonlocal calls
            calls += 1
            self.read_back = self.read_back or calls > 1
            return await apply(conn)

        async def watched_settle(conn: Any) -> Any:
            self.read_back = True
            return await settle(conn)

        return watched_apply, (None if settle is None else watched_settle)


READ_BACK_OPS = {
    "create": RepaymentStatus.SUCCEEDED,
    "begin_attempt": RepaymentStatus.SUCCEEDED,
    "finish_attempt": RepaymentStatus.SUCCEEDED,
    "finish": RepaymentStatus.SUCCEEDED,
    "set_pending": RepaymentStatus.PENDING,  # collected, but no query can tell yet
    "acquire": RepaymentStatus.SUCCEEDED,
    "new_round": RepaymentStatus.SUCCEEDED,
    "take_expired": RepaymentStatus.SUCCEEDED,
}


@pytest.mark.parametrize("op", list(READ_BACK_OPS))
async def test_each_operation_whose_commit_answer_is_lost_is_read_back(
        op, instances, ledger, postgres_dsn, pg_schema, proxy, monkeypatch, caplog):
    """Unknown write outcome: each journal operation whose COMMIT reached the server but
    whose answer was lost is read back; the repayment is collected once, the journal
    agrees with the ledger and nothing is left owned with no drive (a lost sweep
    commit left its rows owned by the sweeper, taken by nobody)."""
    a = await instances("a", dsn=proxy.dsn(postgres_dsn), lease_s=5.0)
    lose = LoseCommitAnswer(a.journal, proxy, op, monkeypatch)
    key = f"k-{op}"

    async def scenario() -> failover.RepaymentResult | None:
        if op == "new_round":
            a.card.decline = a.wallet.decline = True
            assert RepaymentStatus.FAILED == (await a.router.repay(repayment(key))).status
            a.card.decline = a.wallet.decline = False
            lose.armed = True
            return await a.router.retry(key)
        if op in ("set_pending", "acquire", "take_expired"):
            # Collected, then a timeout, and the card's query times out too: PENDING.
            a.card.unknown = a.card.query_unknown = True
            lose.armed = op == "set_pending"
            result = await a.router.repay(repayment(key))
            a.card.query_unknown = False
            if op == "acquire":
                lose.armed = True
                [result] = await a.router.reconcile()
            elif op == "take_expired":
                await _sql(postgres_dsn, f"UPDATE {pg_schema}.repayments SET owner = 'gone',"
                                         " lease_until = now() - interval '1 second'"
                                         " WHERE key = $1", key)
                lose.armed = True
                assert [key] == await a.journal.take_expired(10)
                result = await a.router._executor.drive(None, a.router._channels.layout, key)
            return result
        if op in ("begin_attempt", "finish_attempt"):
            a.card.decline = True  # the wallet's attempt is the one written
        lose.armed = True
        return await a.router.repay(repayment(key))

    with caplog.at_level(logging.WARNING, logger="failover.journal"):
        result = await asyncio.wait_for(scenario(), 8)

    assert 1 == proxy.dropped_commits
    assert lose.read_back
    assert any("reading back" in r.getMessage() for r in caplog.records)
    assert result is not None
    final = await a.router.get(key)
    assert final is not None
    assert READ_BACK_OPS[op] == result.status == final.status
    collections = ledger.collections(key)
    assert 1 == len(collections), collections
    if final.status is RepaymentStatus.SUCCEEDED:
        assert collections[0][1] == final.channel
    [row] = await _sql(postgres_dsn, f"SELECT owner, lease_until > now() AS live"
                                     f" FROM {pg_schema}.repayments WHERE key = $1", key)
    assert not (row["owner"] and row["live"]), dict(row)


async def test_a_writer_survives_an_unexpected_driver_error_when_a_transaction_starts(
        postgres_dsn, pg_schema, monkeypatch):
    """Defect class: a writer task that dies.  After a server restart asyncpg raised
    InternalClientError from Transaction.start on a connection not yet seen closed; the
    lane's writer ended and every later write of the lane waited for ever.  Nothing was
    sent when a transaction fails to start: the writer takes a new connection."""
    import asyncpg.transaction
    from asyncpg.exceptions._base import InternalClientError

    journal = failover.PostgresJournal(postgres_dsn, schema=pg_schema, instance="a",
                                       lease_s=5.0, migrate=True, writers=1)
    await journal.open()
    try:
        real_start = asyncpg.transaction.Transaction.start
        armed = [True]

        async def start_once_broken(self: Any) -> Any:
            if armed[0]:
                armed[0] = False
                raise InternalClientError("cannot switch to state 15; another operation"
                                          " (2) is in progress")
            return await real_start(self)

        monkeypatch.setattr(asyncpg.transaction.Transaction, "start", start_once_broken)
        assert await asyncio.wait_for(journal.load("k"), 5) is None
        assert not armed[0]
        record, created = await asyncio.wait_for(
            journal.create(repayment("k"), None, datetime.now(UTC)), 5)
        assert created
        assert await asyncio.wait_for(journal.load("k"), 5) == record
    finally:
        await journal.close()


# ---- the second review (commit d76ff74): threads that outlive a drive, slow commits,
# ---- stale joins, operations left unanswered by close() --------------------------------


async def _submitted(card: BlockingChannel) -> None:
    """Returns once ``card``'s submit has started on its thread."""

    async def started() -> bool:
        return bool(card.submits)

    assert await _until(started, 5)


async def _settled(router: failover.Router, key: str, timeout_s: float) -> bool:
    """Whether ``router`` sees ``key`` settled (not PENDING) within ``timeout_s``."""

    async def settled() -> bool:
        result = await router.get(key)
        return result is not None and result.status is not RepaymentStatus.PENDING

    return await _until(settled, timeout_s)


async def _assert_collected_once_on_the_card(b: Instance, card: BlockingChannel,
                                             ledger: Ledger, key: str) -> None:
    """After the test let ``card``'s hung thread collect: B (whose channels know nothing
    of that thread) settles ``key`` by a query, one collection, never on the wallet."""
    await asyncio.wait_for(asyncio.to_thread(card.ended.wait, 5), 6)
    assert await _settled(b.router, key, 5)
    assert 1 == len(ledger.collections(key)), ledger.collections(key)
    assert [] == b.wallet.submits
    final = await b.router.get(key)
    assert final is not None
    assert (RepaymentStatus.SUCCEEDED, "card") == (final.status, final.channel)


async def test_reopening_a_router_keeps_a_repayment_whose_thread_still_runs(
        instances, ledger):
    """Takeover while a submit can still collect, after a reopen: A closed and reopened
    its router while a plain-def submit ran on; recovery took the key, found it still
    in the air and released its lease, so B took it over, saw NOT_FOUND and collected on
    the wallet, then A's thread collected on the card: two collections."""
    card = BlockingChannel("card", ledger)
    try:
        a = await instances("a", card=card, timeout_s=0.5)
        b = await instances("b", timeout_s=0.5)  # an async card: no share in A's thread
        first = await asyncio.wait_for(a.router.repay(repayment("k20")), 5)
        assert RepaymentStatus.PENDING == first.status
        await asyncio.wait_for(a.router.close(grace_s=0.1), 5)
        await asyncio.wait_for(a.router.open(), 5)
        await asyncio.wait_for(a.router.wait_recovered(), 5)
        await asyncio.wait_for(b.router.reconcile(), 5)  # as B's background loop would
        card.release.set()  # the hung call ends: the card collects
        await _assert_collected_once_on_the_card(b, card, ledger, "k20")
    finally:
        card.release.set()


SLOW_COMMIT = """
CREATE SEQUENCE {s}.slow_once;
CREATE FUNCTION {s}.slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE until timestamptz := clock_timestamp() + interval '3 seconds';
BEGIN
  IF NEW.status = 'succeeded' AND nextval('{s}.slow_once') = 1 THEN
    WHILE clock_timestamp() < until LOOP
      BEGIN PERFORM pg_sleep(0.05); EXCEPTION WHEN query_canceled THEN NULL; END;
    END LOOP;
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON {s}.repayments
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {s}.slow_commit();
"""
"""The first COMMIT that makes a repayment SUCCEEDED takes 3 s on the server (an fsync
stall, synchronous replication) and ignores the client's cancel: longer than the
client's 2 s command timeout."""


async def test_a_slow_commit_is_read_back_once_its_session_has_ended(
        instances, ledger, postgres_dsn, pg_schema, caplog):
    """Read-back racing its own write: A's finish COMMIT was slow, not lost; A timed it
    out and read back while the old session still committed, saw the row pending,
    wrote the finish again, hit the guard ("terminal: succeeded") and raised
    JournalError to its caller although the card collected and the row is SUCCEEDED."""
    a = await instances("a", lease_s=3.0)  # a 2 s command timeout
    import asyncpg

    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(SLOW_COMMIT.format(s=pg_schema))  # this test's schema only
    finally:
        await conn.close()

    with caplog.at_level(logging.WARNING, logger="failover.journal"):
        result = await asyncio.wait_for(a.router.repay(repayment("k21")), 9)

    assert any("reading back" in r.getMessage() for r in caplog.records)  # it was slow
    assert (RepaymentStatus.SUCCEEDED, "card") == (result.status, result.channel)
    final = await a.router.get("k21")
    assert final is not None
    assert (RepaymentStatus.SUCCEEDED, result.channel_reference) == (
        final.status, final.channel_reference)
    assert 1 == len(ledger.collections("k21"))
    assert [] == a.wallet.submits


@pytest.mark.parametrize("grace_s", [0.0, 1.0])
@pytest.mark.slow  # seconds of real lease time: run in .ci/run's second step
async def test_a_thread_cancelled_within_its_timeout_keeps_the_repayment_from_takeover(
        grace_s, instances, ledger):
    """Takeover while a submit can still collect, cancelled mid-call: A closed its
    router while a plain-def submit was still within its timeout; the cancelled drive
    let the lease lapse (the key was pinned only once a call outlived its timeout), so
    B took over, saw NOT_FOUND and collected on the wallet, then A's thread collected
    on the card: two collections."""
    card = BlockingChannel("card", ledger)
    caller: asyncio.Future[Any] | None = None
    try:
        # The lease must exceed the timeout: close() cancels the call within both.
        a = await instances("a", card=card, timeout_s=2.0, lease_s=3.0)
        b = await instances("b", timeout_s=2.0, lease_s=3.0, background=True)
        caller = asyncio.ensure_future(a.router.repay(repayment("k22")))
        await _submitted(card)
        await asyncio.sleep(0.3)  # the card call is within its 2 s timeout
        await asyncio.wait_for(a.router.close(grace_s=grace_s), 5)
        with contextlib.suppress(failover.FailoverError):
            await asyncio.wait_for(caller, 5)
        await asyncio.sleep(3.5)  # past A's lease and B's sweep
        card.release.set()  # the hung call ends: the card collects
        await _assert_collected_once_on_the_card(b, card, ledger, "k22")
    finally:
        card.release.set()
        if caller is not None:
            caller.cancel()


@pytest.mark.slow  # seconds of real lease time: run in .ci/run's second step
async def test_a_database_blip_as_a_thread_outlives_its_timeout_keeps_the_repayment(
        instances, ledger, postgres_dsn, proxy):
    """Takeover while a submit can still collect, after a blip: the database was
    unreachable for A just as its plain-def submit outlived its timeout; the drive ended
    on a JournalError before the key was pinned and let the lease lapse, so once the
    database was back B took over, saw NOT_FOUND and collected on the wallet, then A's
    thread collected on the card: two collections."""
    card = BlockingChannel("card", ledger)
    try:
        a = await instances("a", card=card, dsn=proxy.dsn(postgres_dsn), timeout_s=0.5)
        b = await instances("b", timeout_s=0.5, background=True)
        caller = asyncio.ensure_future(a.router.repay(repayment("k23")))
        await _submitted(card)
        await asyncio.sleep(0.35)
        proxy.cut()  # the database is unreachable for A ...
        with contextlib.suppress(failover.FailoverError):
            await asyncio.wait_for(caller, 5)
        await asyncio.sleep(0.6)
        proxy.heal()  # ... for about a second
        await asyncio.sleep(2.8)  # past A's lease and B's sweep
        card.release.set()  # the hung call ends: the card collects
        # Once the thread has ended, A lets the lease lapse (its drive died): B's sweep
        # takes the key over and settles it by a query, with nobody's help.
        await _assert_collected_once_on_the_card(b, card, ledger, "k23")
    finally:
        card.release.set()


class SilentCard(LedgerChannel):
    """A card whose submits collect nothing and answer a timeout."""

    async def submit(self, request: failover.ChannelRequest) -> failover.ChannelResult:
        self.submits.append(request.reference)
        return failover.ChannelResult.unknown("timeout")


async def test_a_second_instance_joins_the_drive_of_an_owner_that_took_a_pending_key(
        instances, ledger):
    """Stale join: A's reconcile had taken a PENDING repayment (awaiting its card) and
    was driving it on to the wallet; B's repay of the key, which must join the owner's
    result, returned the stored PENDING at once, while A ended it SUCCEEDED."""
    a = await instances("a", card=SilentCard("card", ledger, idempotent=False))
    b = await instances("b", card=SilentCard("card", ledger, idempotent=False))
    a.card.query_unknown = True
    first = await asyncio.wait_for(a.router.repay(repayment("k24")), 5)
    assert RepaymentStatus.PENDING == first.status
    a.card.query_unknown = False  # the card heals: NOT_FOUND, so on to the wallet
    a.wallet.gate = asyncio.Event()
    reconciled = asyncio.ensure_future(a.router.reconcile())
    try:
        await asyncio.wait_for(a.wallet.entered.wait(), 5)  # A owns it and drives it
        joined = asyncio.ensure_future(b.router.repay(repayment("k24")))
        await asyncio.sleep(0.5)
        a.wallet.gate.set()
        [owners] = await asyncio.wait_for(reconciled, 5)
        result = await asyncio.wait_for(joined, 5)
    finally:
        a.wallet.gate.set()

    assert (RepaymentStatus.SUCCEEDED, "wallet") == (owners.status, owners.channel)
    assert (owners.status, owners.channel_reference) == (
        result.status, result.channel_reference)
    assert 1 == len(ledger.collections("k24"))
    assert [] == b.card.submits == b.wallet.submits


async def test_closing_a_blocking_router_keeps_the_repayment_its_thread_still_runs(
        instances, ledger, postgres_dsn, pg_schema):
    """Takeover while a submit can still collect, behind a BlockingRouter: closing it
    cancelled every task left on its loop, the keeper that renews the lease of a
    running plain-def submit included, so B took over, saw NOT_FOUND and collected on
    the wallet, then A's thread collected on the card: two collections."""
    card = BlockingChannel("card", ledger)
    journal = failover.PostgresJournal(
        postgres_dsn, schema=pg_schema, instance=f"a-{secrets.token_hex(3)}", lease_s=2.0,
        migrate=True, connect_timeout_s=1)
    a = failover.BlockingRouter([card, LedgerChannel("wallet", ledger)], journal,
                                config(0.5), background=False)
    try:
        await asyncio.wait_for(asyncio.to_thread(a.open), 5)
        b = await instances("b", timeout_s=0.5, background=True)
        first = await asyncio.wait_for(asyncio.to_thread(a.repay, repayment("k25")), 5)
        assert RepaymentStatus.PENDING == first.status
        await asyncio.wait_for(asyncio.to_thread(a.close, grace_s=0.1), 5)
        await asyncio.sleep(2.8)  # past A's lease and B's sweep
        card.release.set()  # the hung call ends: the card collects
        await _assert_collected_once_on_the_card(b, card, ledger, "k25")
    finally:
        card.release.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.to_thread(a.close, grace_s=0), 5)


async def test_close_answers_an_operation_queued_behind_a_read_back(
        instances, ledger, postgres_dsn):
    """Unanswered operation: a get() queued on a writer busy reading back a write whose
    connection died was never answered once close() stopped that writer, and hung even
    after the database came back."""
    target = urlsplit(postgres_dsn)
    blackhole = await BlackholeProxy(target.hostname or "127.0.0.1",
                                     target.port or 5432).start()
    tasks: list[asyncio.Future[Any]] = []
    try:
        # One writer: the get() is queued on the lane of the repay.
        a = await instances("a", dsn=blackhole.dsn(postgres_dsn), lease_s=3.0, writers=1)
        blackhole.freeze_at_commit()
        tasks.append(asyncio.ensure_future(a.router.repay(repayment("k26"))))
        await asyncio.sleep(0.3)  # its intent's COMMIT went nowhere
        assert 1 == blackhole.frozen_commits
        get = asyncio.ensure_future(a.router.get("k27"))
        tasks.append(get)
        await asyncio.sleep(0.1)
        blackhole.cut()  # the database goes away: the writer reads back
        await asyncio.sleep(0.5)
        await asyncio.wait_for(a.router.close(grace_s=0), 5)
        blackhole.heal()  # and comes back

        done, _ = await asyncio.wait([get], timeout=3)

        assert get in done
        assert isinstance(get.exception(), failover.FailoverError), get.exception()
        assert [] == ledger.collections("k26") == ledger.collections("k27")
    finally:
        for task in tasks:
            task.cancel()
        await blackhole.stop()


@pytest.mark.slow  # seconds of real lease time: run in .ci/run's second step
async def test_a_write_given_up_after_fate_timeout_keeps_a_pinned_repayment(
        instances, ledger, postgres_dsn, proxy):
    """Takeover while a submit can still collect, after a lost COMMIT answer: A's
    plain-def submit outlived its timeout (the key pinned); the COMMIT answer of its
    next write was lost and the database stayed away longer than fate_timeout_s, so
    giving that write up dropped the key from the held set ignoring the pin, nothing
    renewed the lease, B took over, saw NOT_FOUND and collected on the wallet, then A's
    thread collected on the card: two collections."""
    card = BlockingChannel("card", ledger)
    caller: asyncio.Future[Any] | None = None
    try:
        a = await instances("a", card=card, dsn=proxy.dsn(postgres_dsn), timeout_s=0.5,
                            lease_s=4.0, fate_timeout_s=1.5)
        b = await instances("b", timeout_s=0.5, lease_s=4.0, background=True)
        caller = asyncio.ensure_future(a.router.repay(repayment("k28")))
        await _submitted(card)
        await asyncio.sleep(0.4)  # the thread is about to outlive its 0.5 s timeout
        proxy.drop_at_commit(after=True)  # the next COMMIT's answer is lost ...

        async def dropped() -> bool:
            return proxy.dropped_commits > 0

        assert await _until(dropped, 3)
        proxy.cut()  # ... and the database stays away, past fate_timeout_s
        await asyncio.sleep(2.0)
        proxy.heal()
        with contextlib.suppress(failover.FailoverError):
            await asyncio.wait_for(caller, 5)
        await asyncio.sleep(2.5)  # past A's last lease and B's sweep
        pending = await b.router.get("k28")
        assert pending is not None
        assert RepaymentStatus.PENDING == pending.status  # A's thread still runs
        card.release.set()  # the hung call ends: the card collects
        await _assert_collected_once_on_the_card(b, card, ledger, "k28")
    finally:
        card.release.set()
        if caller is not None:
            caller.cancel()


async def test_a_joiner_of_a_closed_owners_running_thread_gets_an_answer(
        instances, ledger):
    """Unbounded join on a closed owner: A was closed while its plain-def submit was
    within its timeout; the row stayed marked in flight, so B's repay of the key joined
    a drive that no longer existed anywhere and waited as long as A's thread hung,
    instead of answering PENDING."""
    card = BlockingChannel("card", ledger)
    caller: asyncio.Future[Any] | None = None
    try:
        a = await instances("a", card=card, timeout_s=2.0, lease_s=3.0)
        b = await instances("b", timeout_s=2.0, lease_s=3.0, background=True)
        caller = asyncio.ensure_future(a.router.repay(repayment("k29")))
        await _submitted(card)
        await asyncio.sleep(0.3)  # the card call is within its 2 s timeout
        await asyncio.wait_for(a.router.close(grace_s=0.1), 5)
        with contextlib.suppress(failover.FailoverError):
            await asyncio.wait_for(caller, 5)

        joined = await asyncio.wait_for(b.router.repay(repayment("k29")), 4)

        assert RepaymentStatus.PENDING == joined.status
        assert [] == b.card.submits == b.wallet.submits
        card.release.set()  # the hung call ends: the card collects
        await _assert_collected_once_on_the_card(b, card, ledger, "k29")
    finally:
        card.release.set()
        if caller is not None:
            caller.cancel()


def _respelled(dsn: str) -> str:
    """``dsn`` spelled differently, the same database."""
    for one, other in (("postgresql://", "postgres://"), ("postgres://", "postgresql://")):
        if dsn.startswith(one):
            return other + dsn[len(one):]
    raise AssertionError(dsn)


async def test_a_router_reopened_on_a_respelled_dsn_keeps_a_running_threads_repayment(
        instances, ledger, postgres_dsn, pg_schema):
    """Takeover while a submit can still collect, pins keyed on the DSN's spelling: A
    was rebuilt in-process under its instance name with the same database spelled
    differently; its recovery did not see the pin of the still-running plain-def submit
    and released the lease, so B took over, saw NOT_FOUND and collected on the wallet,
    then A's thread collected on the card: two collections."""
    card = BlockingChannel("card", ledger)
    reopened: failover.Router | None = None
    try:
        a = await instances("a", card=card, timeout_s=0.5, lease_s=3.0)
        b = await instances("b", timeout_s=0.5, lease_s=3.0)  # no share in A's thread
        first = await asyncio.wait_for(a.router.repay(repayment("k30")), 5)
        assert RepaymentStatus.PENDING == first.status
        await asyncio.wait_for(a.router.close(grace_s=0.1), 5)
        journal = failover.PostgresJournal(
            _respelled(postgres_dsn), schema=pg_schema, instance=a.journal.instance,
            lease_s=3.0, migrate=True, connect_timeout_s=1)
        reopened = failover.Router([BlockingChannel("card", ledger),
                                    LedgerChannel("wallet", ledger)], journal, config(0.5),
                                   background=False)
        await asyncio.wait_for(reopened.open(), 5)
        await asyncio.wait_for(reopened.wait_recovered(), 5)
        await asyncio.sleep(1.0)  # the closed journal's keeper is refused (stale token)
        await asyncio.wait_for(b.router.reconcile(), 5)  # as B's background loop would
        card.release.set()  # the hung call ends: the card collects
        await asyncio.wait_for(asyncio.to_thread(card.ended.wait, 5), 6)
        await asyncio.sleep(0.5)
        assert 1 == len(ledger.collections("k30")), ledger.collections("k30")
        assert [] == b.card.submits == b.wallet.submits
    finally:
        card.release.set()
        if reopened is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reopened.close(grace_s=0), 5)


READ_ONLY_RENEWALS = """
CREATE TABLE {s}.fault (on_ boolean NOT NULL);
INSERT INTO {s}.fault VALUES (false);
CREATE FUNCTION {s}.read_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.owner = '{owner}' AND (SELECT on_ FROM {s}.fault) THEN
    RAISE EXCEPTION 'cannot execute UPDATE in a read-only transaction'
      USING ERRCODE = 'read_only_sql_transaction';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER read_only BEFORE UPDATE ON {s}.repayments
  FOR EACH ROW EXECUTE FUNCTION {s}.read_only();
"""
"""While ``{s}.fault`` is on, an update of a row owned by ``{owner}`` fails as on a
read-only server (SQLSTATE 25006, a plain server error, not a connection error), as
during a switchover; only this test's schema is touched."""


@pytest.mark.slow  # seconds of real lease time: run in .ci/run's second step
async def test_the_keeper_survives_a_server_error_and_keeps_the_repayment(
        instances, ledger, postgres_dsn, pg_schema):
    """Takeover while a submit can still collect, after a server error: the keeper
    renewing a closed journal's pinned lease retried connection errors only; a renewal
    refused by the server (read-only, as in a switchover) ended its thread for good, so
    once the lease ran out B took over, saw NOT_FOUND and collected on the wallet, then
    A's thread collected on the card: two collections."""
    import asyncpg

    card = BlockingChannel("card", ledger)
    admin = await asyncpg.connect(postgres_dsn)
    try:
        a = await instances("a", card=card, timeout_s=0.5, lease_s=3.0)
        b = await instances("b", timeout_s=0.5, lease_s=3.0, background=True)
        await admin.execute(READ_ONLY_RENEWALS.format(s=pg_schema, owner=a.journal.instance))
        first = await asyncio.wait_for(a.router.repay(repayment("k31")), 5)
        assert RepaymentStatus.PENDING == first.status
        await asyncio.wait_for(a.router.close(grace_s=0.1), 5)
        await asyncio.sleep(0.3)  # the keeper renews
        await admin.execute(f"UPDATE {pg_schema}.fault SET on_ = true")
        await asyncio.sleep(1.5)  # the keeper's renewals are refused
        await admin.execute(f"UPDATE {pg_schema}.fault SET on_ = false")
        await asyncio.sleep(2.5)  # past A's last lease and B's sweep
        pending = await b.router.get("k31")
        assert pending is not None
        assert RepaymentStatus.PENDING == pending.status  # A's thread still runs
        card.release.set()  # the hung call ends: the card collects
        await _assert_collected_once_on_the_card(b, card, ledger, "k31")
    finally:
        card.release.set()
        with contextlib.suppress(Exception):
            await admin.execute(f"UPDATE {pg_schema}.fault SET on_ = false")
        await admin.close()
