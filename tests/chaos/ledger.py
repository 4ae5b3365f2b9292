"""A channel whose ledger is a PostgreSQL table: the ground truth, outside the journal.

Every worker process builds its channels on one shared table, so what any instance
collected is seen by the queries of every other, as a real provider's status API
would show it.  The faults are the ambiguous ones a real gateway has: a submit that
collects and then times out, one that times out before collecting, plain
unavailability, declines, and status queries that fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from failover import ChannelRequest, ChannelResult, ChannelUnavailable

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS ledger (
    id bigserial PRIMARY KEY,
    channel text NOT NULL,
    reference text NOT NULL,
    -- What the provider deduplicates on: the reference itself on a channel that is
    -- idempotent, one value per submit on a channel that is not.
    submission text NOT NULL UNIQUE,
    repayment_key text NOT NULL,
    amount numeric NOT NULL,
    channel_reference text NOT NULL,
    instance text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS ledger_by_reference ON ledger (channel, reference);
CREATE INDEX IF NOT EXISTS ledger_by_key ON ledger (repayment_key);
"""

# The errors that mean "the database could not be reached", as opposed to a statement
# that may have run.  Only these make a submit UNAVAILABLE.
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InvalidCatalogNameError,
)

# A failed read collected nothing, whatever went wrong with it.
READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class Faults:
    """Per-call probabilities, tried in this order; the rest collect and answer at once."""

    decline: float = 0.0
    unavailable: float = 0.0
    applied_then_timeout: float = 0.0
    """Collects, then the answer is lost: the dangerous case."""
    timeout_before_apply: float = 0.0
    """The answer is lost and nothing was collected (the request never reached the books)."""
    applied_late: float = 0.0
    """Answers a timeout at once and collects ``late_s`` later: the request waited in the
    provider's queue.  The delay runs on the server (``pg_sleep`` in the INSERT), so it
    is applied even if the instance that sent it is killed or paused meanwhile."""
    late_s: tuple[float, float] = (0.5, 2.5)
    """Within ``settle_s`` (the worker's), as DESIGN §1 requires of a channel."""
    hang_share: float = 0.0
    """Of the timeouts, the share that hang past the router's ``timeout_s`` rather than
    answering UNKNOWN at once (so the router's own timeout is exercised too)."""
    query_failure: float = 0.0
    """Share of status queries that time out (prove nothing)."""
    latency_s: tuple[float, float] = (0.002, 0.02)

    def healed(self) -> Faults:
        return Faults(latency_s=self.latency_s, late_s=self.late_s)


class LedgerChannel:
    """An async adapter (``submit``/``query``) on the shared ``ledger`` table.

    The honesty rules of DESIGN §1 hold for its own answers: UNAVAILABLE only when
    no statement that collects was sent (the pool could not connect); any error once
    the INSERT may have run is raised, which the router reads as UNKNOWN.
    """

    def __init__(self, name: str, pool: Any, *, idempotent: bool, faults: Faults,
                 seed: str, instance: str, hang_s: float) -> None:
        self.name = name
        self.idempotent = idempotent
        self.faults = faults
        self.instance = instance
        self.hang_s = hang_s
        self._pool = pool
        self._rng = random.Random(f"{seed}/{name}")
        self.counts: dict[str, int] = {}
        self._late: set[asyncio.Task[None]] = set()

    def heal(self) -> None:
        self.faults = self.faults.healed()

    def set_pool(self, pool: Any) -> None:
        self._pool = pool

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def _latency(self) -> None:
        low, high = self.faults.latency_s
        await asyncio.sleep(self._rng.uniform(low, high))

    async def _acquire(self) -> Any:
        try:
            return await self._pool.acquire(timeout=2.0)
        except CONNECT_ERRORS as exc:
            raise ChannelUnavailable("ledger_down", f"{self.name}: {exc}") from exc
        except TimeoutError as exc:
            raise ChannelUnavailable("ledger_busy", f"{self.name}: no connection") from exc

    async def _find(self, conn: Any, reference: str) -> str | None:
        value = await conn.fetchval(
            "SELECT channel_reference FROM ledger WHERE channel = $1 AND reference = $2"
            " ORDER BY id LIMIT 1", self.name, reference)
        return None if value is None else str(value)

    async def _collect(self, conn: Any, request: ChannelRequest, delay_s: float = 0.0) -> str:
        channel_reference = f"{self.name}-{self._rng.getrandbits(64):016x}"
        submission = request.reference if self.idempotent \
            else f"{request.reference}#{self._rng.getrandbits(64):016x}"
        applied = await conn.fetchval(
            "INSERT INTO ledger (channel, reference, submission, repayment_key, amount,"
            " channel_reference, instance) SELECT $1, $2, $3, $4, $5, $6, $7"
            " FROM pg_sleep($8) ON CONFLICT (submission) DO NOTHING RETURNING channel_reference",
            self.name, request.reference, submission, request.repayment_key,
            request.amount, channel_reference, self.instance, delay_s)
        if applied is None:  # the same reference was collected meanwhile: deduplicated
            found = await self._find(conn, request.reference)
            assert found is not None
            return found
        return str(applied)

    async def _collect_late(self, request: ChannelRequest) -> None:
        delay = self._rng.uniform(*self.faults.late_s)
        with contextlib.suppress(Exception):  # a lost request: nothing collected, no harm
            conn = await self._pool.acquire(timeout=2.0)
            try:
                await self._collect(conn, request, delay)
            finally:
                await self._release(conn)

    async def _lose_answer(self, detail: str) -> ChannelResult:
        if self._rng.random() < self.faults.hang_share:
            await asyncio.sleep(self.hang_s)  # past the router's timeout: it gives up first
        return ChannelResult.unknown("timeout", detail)

    def _pick(self, faults: Faults) -> str:
        roll = self._rng.random()
        for share, action in ((faults.decline, "decline"),
                              (faults.unavailable, "unavailable"),
                              (faults.applied_then_timeout, "applied_then_timeout"),
                              (faults.timeout_before_apply, "timeout_before_apply"),
                              (faults.applied_late, "applied_late")):
            if roll < share:
                return action
            roll -= share
        return "collect"

    async def submit(self, request: ChannelRequest) -> ChannelResult:
        faults = self.faults
        conn = await self._acquire()
        try:
            if self.idempotent:
                try:
                    done = await self._find(conn, request.reference)
                except READ_ERRORS as exc:  # a read only: nothing was collected
                    raise ChannelUnavailable("ledger_down", str(exc)) from exc
                if done is not None:
                    self._count("deduplicated")
                    await self._latency()
                    return ChannelResult.succeeded(done)
            action = self._pick(faults)
            self._count(action)
            if action == "decline":
                return ChannelResult.declined("insufficient_funds", "balance too low")
            if action == "unavailable":
                return ChannelResult.unavailable("service_unavailable", "503 before processing")
            if action == "timeout_before_apply":
                return await self._lose_answer("not collected, answer lost")
            if action == "applied_late":
                task = asyncio.get_running_loop().create_task(self._collect_late(request))
                self._late.add(task)
                task.add_done_callback(self._late.discard)
                return ChannelResult.unknown("timeout", "queued, applied later")
            channel_reference = await self._collect(conn, request)
            if action == "applied_then_timeout":
                return await self._lose_answer("collected, answer lost")
            await self._latency()
            return ChannelResult.succeeded(channel_reference)
        finally:
            await self._release(conn)

    async def query(self, request: ChannelRequest) -> ChannelResult:
        await self._latency()
        if self._rng.random() < self.faults.query_failure:
            self._count("query_failure")
            return ChannelResult.unknown("query_timeout", "status query timed out")
        conn = await self._acquire()
        try:
            found = await self._find(conn, request.reference)
        finally:
            await self._release(conn)
        if found is None:
            return ChannelResult.not_found()
        return ChannelResult.succeeded(found)

    async def _release(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # a broken connection: the pool drops it
            await asyncio.shield(self._pool.release(conn))


def channels(pool: Any, *, seed: str, instance: str, hang_s: float, healed: bool
             ) -> list[LedgerChannel]:
    """The three channels of the chaos test, in priority order.

    Two deduplicate on the reference (so the router may resubmit after a timeout);
    the third does not (a second submit would collect twice, so the router must
    resolve every doubt by querying before it tries anything else there).  Only the
    first two decline, so a repayment always has somewhere to succeed.
    """
    faulty = Faults(decline=0.02, unavailable=0.05, applied_then_timeout=0.05,
                    timeout_before_apply=0.04, applied_late=0.03, hang_share=0.25,
                    query_failure=0.1)
    profiles = {
        "auto_debit": (True, faulty),
        "card": (True, faulty),
        "wallet": (False, replace(faulty, decline=0.0)),
    }
    built = [LedgerChannel(name, pool, idempotent=idempotent, faults=profile, seed=seed,
                           instance=instance, hang_s=hang_s)
             for name, (idempotent, profile) in profiles.items()]
    if healed:
        for channel in built:
            channel.heal()
    return built
