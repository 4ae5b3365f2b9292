"""Test helpers, public API: simulated channels with ground-truth ledgers, a fake
clock, and checks of the invariants of DESIGN §4 against those ledgers.

Everything here is seeded and deterministic: the same seed and the same calls
give the same answers, so a failing property test can be replayed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from failover._clock import Clock, Sleep, SystemClock, real_sleep
from failover._errors import ChannelUnavailable
from failover._models import ChannelRequest, ChannelResult, RepaymentResult, RepaymentStatus

__all__ = [
    "HANG",
    "Audit",
    "Collected",
    "Collection",
    "FakeClock",
    "FaultProfile",
    "Ledger",
    "MemoryLedger",
    "SQLiteLedger",
    "ScriptedChannel",
    "SimulatedChannel",
    "SimulatedCrash",
    "assert_invariants",
    "audit",
]


class FakeClock:
    """A clock that moves only when told: ``sleep`` advances it instead of waiting.

    Pass it as both ``clock=`` and ``sleep=clock.sleep`` to a ``Router``.
    """

    def __init__(self, start: datetime = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)) -> None:
        if start.utcoffset() is None:
            raise ValueError("start must be timezone-aware")
        self._start = start
        self._elapsed = 0.0
        self.sleeps: list[float] = []
        """Every sleep asked for, in order (tests check backoff with it)."""

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        return self._elapsed

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._elapsed += seconds

    def set(self, moment: datetime) -> None:
        """Jump to a wall time (not before the current one)."""
        self.advance((moment - self.now()).total_seconds())

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._elapsed += max(seconds, 0.0)
        await asyncio.sleep(0)  # still let other tasks run, as a real sleep would


@dataclass(frozen=True, slots=True)
class FaultProfile:
    """How a simulated channel misbehaves.  Probabilities are per submit and are
    tried in the order listed; the rest succeed."""

    reject: float = 0.0
    decline: float = 0.0
    unavailable: float = 0.0
    unknown_collected: float = 0.0
    """Times out after collecting: the dangerous case."""
    unknown_not_collected: float = 0.0
    query_failure: float = 0.0
    """Share of status queries that fail (prove nothing)."""
    latency_s: float = 0.0
    """Time each call takes to answer, on the channel's clock."""
    jitter: float = 0.0
    """Latency varies by up to this fraction either way (0.5: from 0.5x to 1.5x)."""
    outages: tuple[tuple[float, float], ...] = ()
    """(start, end) in the clock's monotonic seconds: every call fails as unavailable."""
    crash_before: float = 0.0
    """Share of submits that raise ``SimulatedCrash`` before anything happens."""
    crash_after: float = 0.0
    """Share of submits that collect and then raise ``SimulatedCrash`` (the process died)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and f.name != "latency_s" and not 0 <= value <= 1:
                # jitter is a fraction too, so it shares the [0, 1] check
                raise ValueError(f"{f.name} must be a probability in [0, 1], got {value}")
        total = (self.reject + self.decline + self.unavailable + self.unknown_collected
                 + self.unknown_not_collected + self.crash_before + self.crash_after)
        if total > 1:
            raise ValueError(f"probabilities add up to {total}, more than 1")

    def healed(self) -> FaultProfile:
        """The same latency, no faults."""
        return FaultProfile(latency_s=self.latency_s, jitter=self.jitter)


class SimulatedCrash(BaseException):
    """Raised by a simulated channel to stand for the process dying mid-call.

    A ``BaseException`` so that it passes through the router as a real crash would:
    nothing after it is written.
    """


@dataclass(frozen=True, slots=True)
class Collection:
    """Money a channel really took."""

    channel: str
    reference: str
    repayment_key: str
    amount: Decimal
    channel_reference: str


class Ledger(Protocol):
    """Ground truth: what the channels really collected."""

    def record(self, collection: Collection) -> None: ...

    def find(self, channel: str, reference: str) -> Collection | None: ...

    def collections(self) -> list[Collection]: ...


class MemoryLedger:
    def __init__(self) -> None:
        self._rows: list[Collection] = []
        self._by_reference: dict[tuple[str, str], Collection] = {}

    def record(self, collection: Collection) -> None:
        self._rows.append(collection)
        self._by_reference.setdefault((collection.channel, collection.reference), collection)

    def find(self, channel: str, reference: str) -> Collection | None:
        return self._by_reference.get((channel, reference))

    def collections(self) -> list[Collection]:
        return list(self._rows)


class SQLiteLedger:
    """A ledger in its own SQLite file, so it survives the process it is audited after."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS collections (id INTEGER PRIMARY KEY, channel TEXT,"
            " reference TEXT, repayment_key TEXT, amount TEXT, channel_reference TEXT)"
        )
        self._conn.execute(
            "CREATE INDEX IF NOT EXISTS collections_ref ON collections (channel, reference)"
        )

    def record(self, collection: Collection) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO collections (channel, reference, repayment_key, amount,"
                " channel_reference) VALUES (?, ?, ?, ?, ?)",
                (collection.channel, collection.reference, collection.repayment_key,
                 str(collection.amount), collection.channel_reference),
            )

    def find(self, channel: str, reference: str) -> Collection | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT channel, reference, repayment_key, amount, channel_reference"
                " FROM collections WHERE channel = ? AND reference = ? ORDER BY id LIMIT 1",
                (channel, reference),
            ).fetchone()
        return None if row is None else Collection(row[0], row[1], row[2], Decimal(row[3]), row[4])

    def collections(self) -> list[Collection]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT channel, reference, repayment_key, amount, channel_reference"
                " FROM collections ORDER BY id"
            ).fetchall()
        return [Collection(r[0], r[1], r[2], Decimal(r[3]), r[4]) for r in rows]

    def close(self) -> None:
        self._conn.close()


def _as_ledger(ledger: Ledger | str | Path | None) -> Ledger:
    if ledger is None:
        return MemoryLedger()
    if isinstance(ledger, str | Path):  # from a config file's options: a ledger file
        return SQLiteLedger(ledger)
    return ledger


class SimulatedChannel:
    """A channel that fails as its ``FaultProfile`` says and records in its ledger
    exactly what it collected.

    ``idempotent=True`` channels deduplicate submits by reference, as real
    gateways with idempotency keys do; others collect again on a second submit.
    ``ledger`` may be a path: a ``SQLiteLedger`` there keeps the truth across
    processes (so ``failover reconcile`` can ask a simulated channel later).
    """

    def __init__(
        self,
        name: str,
        profile: FaultProfile | Mapping[str, Any] | None = None,
        *,
        seed: int = 0,
        idempotent: bool = True,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        ledger: Ledger | str | Path | None = None,
    ) -> None:
        self.name = name
        self.idempotent = idempotent
        if isinstance(profile, Mapping):  # from a config file's options
            fields = dict(profile)
            fields["outages"] = tuple(tuple(w) for w in fields.get("outages", ()))
            profile = FaultProfile(**fields)
        self.profile = profile or FaultProfile()
        self.clock = clock or SystemClock()
        self._sleep = sleep or getattr(clock, "sleep", None) or real_sleep
        self.ledger = _as_ledger(ledger)
        self._rng = random.Random(f"{seed}/{name}")
        self._latency_rng = random.Random(f"{seed}/{name}/latency")
        self._answers: dict[str, ChannelResult] = {}
        self._serial = 0
        self.submits = 0
        self.queries = 0

    def __repr__(self) -> str:
        return f"SimulatedChannel({self.name!r}, idempotent={self.idempotent})"

    def in_outage(self) -> bool:
        now = self.clock.monotonic()
        return any(start <= now < end for start, end in self.profile.outages)

    def _collect(self, request: ChannelRequest) -> str:
        self._serial += 1
        channel_reference = f"{self.name}-{self._serial}-{request.reference[-6:]}"
        self.ledger.record(Collection(
            self.name, request.reference, request.repayment_key, request.amount,
            channel_reference,
        ))
        return channel_reference

    async def _delay(self, profile: FaultProfile) -> None:
        if profile.latency_s:
            spread = 1.0 + profile.jitter * (2 * self._latency_rng.random() - 1)
            await self._sleep(profile.latency_s * spread)

    async def submit(self, request: ChannelRequest) -> ChannelResult:
        """Decide, act (collect), then take ``latency_s`` to answer: a caller that gives
        up while waiting has lost the answer to a call that may have collected."""
        self.submits += 1
        profile = self.profile
        if self.in_outage():
            raise ChannelUnavailable("outage", f"{self.name} is down")
        answer = self._decide(profile, request)
        await self._delay(profile)
        return answer

    def _decide(self, profile: FaultProfile, request: ChannelRequest) -> ChannelResult:
        if self.idempotent:
            done = self.ledger.find(self.name, request.reference)
            if done is not None:
                return ChannelResult.succeeded(done.channel_reference)
            if request.reference in self._answers:
                return self._answers[request.reference]
        roll = self._rng.random()
        for share, action in (
            (profile.reject, "reject"),
            (profile.decline, "decline"),
            (profile.unavailable, "unavailable"),
            (profile.unknown_collected, "unknown_collected"),
            (profile.unknown_not_collected, "unknown_not_collected"),
            (profile.crash_before, "crash_before"),
            (profile.crash_after, "crash_after"),
        ):
            if roll < share:
                return self._act(action, request)
            roll -= share
        return ChannelResult.succeeded(self._collect(request))

    def _act(self, action: str, request: ChannelRequest) -> ChannelResult:
        if action == "reject":
            answer = ChannelResult.rejected("account_closed", "loan account closed")
            self._answers[request.reference] = answer
            return answer
        if action == "decline":
            answer = ChannelResult.declined("insufficient_funds", "balance too low")
            self._answers[request.reference] = answer
            return answer
        if action == "unavailable":
            return ChannelResult.unavailable("service_unavailable", "503 before processing")
        if action == "unknown_collected":
            self._collect(request)
            return ChannelResult.unknown("timeout", "collected, answer lost")
        if action == "unknown_not_collected":
            return ChannelResult.unknown("timeout", "not collected, answer lost")
        if action == "crash_after":
            self._collect(request)
        raise SimulatedCrash(f"{self.name}: simulated crash ({action})")

    async def query(self, request: ChannelRequest) -> ChannelResult:
        self.queries += 1
        await self._delay(self.profile)
        if self.in_outage():
            raise ChannelUnavailable("outage", f"{self.name} is down")
        if self._rng.random() < self.profile.query_failure:
            return ChannelResult.unknown("query_timeout", "status query timed out")
        done = self.ledger.find(self.name, request.reference)
        if done is not None:
            return ChannelResult.succeeded(done.channel_reference)
        answer = self._answers.get(request.reference)
        if answer is not None:
            return answer
        return ChannelResult.not_found()


@dataclass(frozen=True, slots=True)
class Collected:
    """A script step: collect the money, then answer ``result`` (e.g. a timeout)."""

    result: ChannelResult | BaseException


class _Hang:
    def __repr__(self) -> str:
        return "HANG"


HANG = _Hang()
"""A script step: never answer (until cancelled or timed out)."""

ScriptStep = ChannelResult | BaseException | Collected | _Hang


class ScriptedChannel:
    """A channel that answers submits (and optionally queries) from a script, for
    tests that need one exact sequence.  The ledger records what it really
    collected: every ``SUCCEEDED`` step and every ``Collected`` step.

    Queries answer from the script while it lasts, then from the ledger (the
    truth): ``SUCCEEDED`` if collected, else ``NOT_FOUND``.  When the submit
    script runs out, submits succeed.
    """

    def __init__(
        self,
        name: str,
        submits: Iterable[ScriptStep] = (),
        *,
        queries: Iterable[ScriptStep] = (),
        idempotent: bool = False,
        ledger: Ledger | str | Path | None = None,
    ) -> None:
        self.name = name
        self.idempotent = idempotent
        self.ledger = _as_ledger(ledger)
        self._submits = list(submits)
        self._queries = list(queries)
        self.requests: list[ChannelRequest] = []
        self.query_requests: list[ChannelRequest] = []

    def __repr__(self) -> str:
        return f"ScriptedChannel({self.name!r})"

    @property
    def submits(self) -> int:
        return len(self.requests)

    async def _play(self, step: ScriptStep, request: ChannelRequest) -> ChannelResult:
        if isinstance(step, _Hang):
            await asyncio.Event().wait()
        if isinstance(step, Collected):
            self._record(request)
            step = step.result
        if isinstance(step, BaseException):
            raise step
        assert isinstance(step, ChannelResult)
        return step

    def _record(self, request: ChannelRequest, channel_reference: str | None = None) -> str:
        channel_reference = channel_reference or f"{self.name}-{len(self.ledger.collections()) + 1}"
        self.ledger.record(Collection(
            self.name, request.reference, request.repayment_key, request.amount,
            channel_reference,
        ))
        return channel_reference

    async def submit(self, request: ChannelRequest) -> ChannelResult:
        self.requests.append(request)
        step = self._submits.pop(0) if self._submits else ChannelResult.succeeded()
        down = isinstance(step, ChannelUnavailable) or (
            isinstance(step, ChannelResult) and step.outcome.value == "unavailable"
        )
        if self.idempotent and not down:
            done = self.ledger.find(self.name, request.reference)
            if done is not None:
                return ChannelResult.succeeded(done.channel_reference)
        if isinstance(step, ChannelResult) and step.outcome.value == "succeeded":
            return ChannelResult.succeeded(self._record(request, step.channel_reference))
        return await self._play(step, request)

    async def query(self, request: ChannelRequest) -> ChannelResult:
        self.query_requests.append(request)
        if self._queries:
            return await self._play(self._queries.pop(0), request)
        done = self.ledger.find(self.name, request.reference)
        if done is not None:
            return ChannelResult.succeeded(done.channel_reference)
        return ChannelResult.not_found()


@dataclass(frozen=True, slots=True)
class Audit:
    """What the ledgers say about the router's results (DESIGN §4)."""

    repayments: int
    succeeded: int
    failed: int
    pending: int
    duplicates: tuple[str, ...]
    """Keys collected more than once."""
    lost: tuple[str, ...]
    """Keys accepted but unknown to the journal, or collected while shown ``FAILED``."""
    false_successes: tuple[str, ...]
    """Keys shown ``SUCCEEDED`` that no channel collected."""
    strays: tuple[str, ...]
    """Keys collected that were never accepted."""
    pending_keys: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.lost or self.false_successes or self.strays)

    def summary(self) -> str:
        return (
            f"repayments {self.repayments}: succeeded {self.succeeded}, failed {self.failed},"
            f" pending {self.pending}; duplicates {len(self.duplicates)},"
            f" lost {len(self.lost)}, false successes {len(self.false_successes)},"
            f" strays {len(self.strays)}"
        )


def _ledgers(sources: Iterable[SimulatedChannel | Ledger]) -> list[Ledger]:
    unique: dict[int, Ledger] = {}
    for source in sources:
        ledger = source.ledger if isinstance(source, SimulatedChannel) else source
        unique.setdefault(id(ledger), ledger)
    return list(unique.values())


def audit(
    results: Mapping[str, RepaymentResult | None],
    sources: Iterable[SimulatedChannel | Ledger],
) -> Audit:
    """Compare ``results`` (key → the router's result, ``None`` if it has none) with
    what the channels' ledgers really collected."""
    collected: Counter[str] = Counter()
    for ledger in _ledgers(sources):
        collected.update(c.repayment_key for c in ledger.collections())
    statuses = Counter(r.status for r in results.values() if r is not None)
    lost, false_successes, pending = [], [], []
    for key, result in results.items():
        if result is None or (result.status is RepaymentStatus.FAILED and collected[key]):
            lost.append(key)
        elif result.status is RepaymentStatus.SUCCEEDED and collected[key] == 0:
            false_successes.append(key)
        elif result.status is RepaymentStatus.PENDING:
            pending.append(key)
    return Audit(
        repayments=len(results),
        succeeded=statuses[RepaymentStatus.SUCCEEDED],
        failed=statuses[RepaymentStatus.FAILED],
        pending=statuses[RepaymentStatus.PENDING],
        duplicates=tuple(sorted(k for k, n in collected.items() if n > 1)),
        lost=tuple(sorted(lost)),
        false_successes=tuple(sorted(false_successes)),
        strays=tuple(sorted(k for k in collected if k not in results)),
        pending_keys=tuple(sorted(pending)),
    )


def assert_invariants(result: Audit, *, allow_pending: bool = True) -> None:
    """Raise ``AssertionError`` naming the keys if any invariant of DESIGN §4 fails."""
    problems = []
    for name in ("duplicates", "lost", "false_successes", "strays"):
        keys = getattr(result, name)
        if keys:
            problems.append(f"{name}: {', '.join(keys[:10])}")
    if not allow_pending and result.pending_keys:
        problems.append(f"still pending: {', '.join(result.pending_keys[:10])}")
    if problems:
        raise AssertionError("invariants broken: " + "; ".join(problems))
