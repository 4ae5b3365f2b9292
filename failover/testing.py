"""Test helpers, public API: simulated channels with ground-truth ledgers, a fake
clock, and checks of the invariants of DESIGN §4 against those ledgers.

Everything here is seeded and deterministic: the same seed and the same calls
give the same answers, so a failing property test can be replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import sqlite3
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from failover._clock import Clock, SystemClock
from failover._errors import ChannelUnavailable
from failover._models import ChannelRequest, ChannelResult, RepaymentResult, RepaymentStatus

if TYPE_CHECKING:
    from failover._router import Router

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
    "SyncSimulatedChannel",
    "assert_invariants",
    "audit",
    "crash",
]


class FakeClock:
    """A clock that moves only when told: ``sleep`` advances it instead of waiting.

    Pass it as ``clock=`` to a ``Router``: the router reads, sleeps and times calls
    out on it.  A ``timeout`` expires when the clock is moved past it (``advance``,
    ``set`` or a ``sleep``), or at the latest after as many real seconds, so that a
    call that hangs in a test still ends.
    """

    def __init__(self, start: datetime = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)) -> None:
        if start.utcoffset() is None:
            raise ValueError("start must be timezone-aware")
        self._start = start
        self._elapsed = 0.0
        self._timers: list[_FakeTimeout] = []
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
        due = [timer for timer in self._timers if timer.deadline <= self._elapsed]
        for timer in due:
            timer.expire()

    def set(self, moment: datetime) -> None:
        """Jump to a wall time (not before the current one)."""
        self.advance((moment - self.now()).total_seconds())

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(seconds, 0.0))
        await asyncio.sleep(0)  # still let other tasks run, as a real sleep would

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        return _FakeTimeout(self, seconds)


class _FakeTimeout:
    """``asyncio.timeout`` that also expires when a ``FakeClock`` passes its deadline."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self._clock = clock
        self._seconds = seconds
        self.deadline = clock.monotonic() + seconds
        self._inner: asyncio.Timeout | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> _FakeTimeout:
        self._loop = asyncio.get_running_loop()
        self._inner = asyncio.timeout(max(self._seconds, 0.0))
        await self._inner.__aenter__()
        self._clock._timers.append(self)
        if self._seconds <= 0:
            self.expire()
        return self

    def expire(self) -> None:
        # Through the loop: the clock may be moved from outside it (a test between steps).
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon(self._expire_now)

    def _expire_now(self) -> None:
        if self._inner is not None and self._loop is not None and not self._inner.expired():
            with contextlib.suppress(RuntimeError):  # the block has been left meanwhile
                self._inner.reschedule(self._loop.time())

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool | None:
        self._clock._timers.remove(self)
        assert self._inner is not None
        await self._inner.__aexit__(exc_type, exc, tb)  # raises TimeoutError if it expired
        return None


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
    not_found_collected: float = 0.0
    """Share of submits that collect and answer ``NOT_FOUND`` (a confused gateway)."""
    late_apply: float = 0.0
    """Share of submits that answer a timeout and collect ``late_apply_s`` later: the
    request was still in the provider's queue."""
    late_apply_s: float = 0.0
    """How long a late-applied submit waits in the queue (keep it within ``settle_s``)."""
    raise_cancelled: float = 0.0
    """Share of submits that collect and then raise ``asyncio.CancelledError`` (an
    adapter bug that must read as an unknown outcome)."""
    overrun: float = 0.0
    """Share of submits of a plain-``def`` channel (``SyncSimulatedChannel``) whose
    thread outlives the router's timeout: it blocks until ``release_overruns()``,
    then collects or not (half each)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and f.name not in ("latency_s", "late_apply_s") \
                    and not 0 <= value <= 1:
                # jitter is a fraction too, so it shares the [0, 1] check
                raise ValueError(f"{f.name} must be a probability in [0, 1], got {value}")
        total = (self.reject + self.decline + self.unavailable + self.unknown_collected
                 + self.unknown_not_collected + self.crash_before + self.crash_after
                 + self.not_found_collected + self.late_apply + self.raise_cancelled
                 + self.overrun)
        if total > 1:
            raise ValueError(f"probabilities add up to {total}, more than 1")

    def healed(self) -> FaultProfile:
        """The same latency, no faults."""
        return FaultProfile(latency_s=self.latency_s, jitter=self.jitter,
                            late_apply_s=self.late_apply_s)


def crash(router: Router) -> None:
    """Stop ``router`` as if its process died this instant: every repayment in flight
    stops where it is, nothing more is written, calls in the air are abandoned, and
    the journal may be opened by a new router (as after a restart).  Its callers get
    ``RouterClosedError``."""
    router._life.crash()


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
        sleep: Callable[[float], Awaitable[None]] | None = None,
        ledger: Ledger | str | Path | None = None,
    ) -> None:
        self.name = name
        self.idempotent = idempotent
        if isinstance(profile, Mapping):  # from a config file's options
            fields = dict(profile)
            fields["outages"] = tuple(tuple(w) for w in fields.get("outages", ()))
            profile = FaultProfile(**fields)
        elif profile is not None and not isinstance(profile, FaultProfile):
            raise TypeError(f"profile of channel {name!r} must be a FaultProfile or a table"
                            f" of its fields, got {profile!r}")
        self.profile = profile or FaultProfile()
        self.clock = clock or SystemClock()
        self._sleep = sleep or self.clock.sleep
        self.ledger = _as_ledger(ledger)
        self.on_crash: Callable[[], None] | None = None
        """Called when a crash fault fires (e.g. ``lambda: crash(router)``); without it
        the fault raises ``SimulatedCrash``, which the router takes as an unknown outcome."""
        self._seed = seed
        self._rng = random.Random(f"{seed}/{name}")
        self._latency_rng = random.Random(f"{seed}/{name}/latency")
        self._answers: dict[str, ChannelResult] = {}
        self._queued: list[tuple[float, ChannelRequest]] = []
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
        self.apply_due()
        profile = self.profile
        if self.in_outage():
            raise ChannelUnavailable("outage", f"{self.name} is down")
        try:
            answer = self._decide(profile, request)
        except SimulatedCrash:
            if self.on_crash is None:
                raise
            self.on_crash()  # the process dies mid-call: this call never answers
            await asyncio.Event().wait()
        await self._delay(profile)
        return answer

    def _decide(self, profile: FaultProfile, request: ChannelRequest) -> ChannelResult:
        if self.idempotent:
            done = self.ledger.find(self.name, request.reference)
            if done is not None:
                return ChannelResult.succeeded(done.channel_reference)
            if request.reference in self._answers:
                return self._answers[request.reference]
            if any(queued.reference == request.reference for _, queued in self._queued):
                self._queued = [q for q in self._queued if q[1].reference != request.reference]
                return ChannelResult.succeeded(self._collect(request))
        roll = self._roll(request)
        for share, action in (
            (profile.reject, "reject"),
            (profile.decline, "decline"),
            (profile.unavailable, "unavailable"),
            (profile.unknown_collected, "unknown_collected"),
            (profile.unknown_not_collected, "unknown_not_collected"),
            (profile.crash_before, "crash_before"),
            (profile.crash_after, "crash_after"),
            (profile.not_found_collected, "not_found_collected"),
            (profile.late_apply, "late_apply"),
            (profile.raise_cancelled, "raise_cancelled"),
            (profile.overrun, "overrun"),
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
        if action == "not_found_collected":
            self._collect(request)
            return ChannelResult.not_found()
        if action == "late_apply":
            self._queued.append((self.clock.monotonic() + self.profile.late_apply_s, request))
            return ChannelResult.unknown("timeout", "queued, applied later")
        if action == "raise_cancelled":
            self._collect(request)
            raise asyncio.CancelledError("adapter bug")
        if action == "overrun":
            return self._overrun(request)
        if action == "crash_after":
            self._collect(request)
        raise SimulatedCrash(f"{self.name}: simulated crash ({action})")

    def _overrun(self, request: ChannelRequest) -> ChannelResult:
        # An async channel cannot outlive its call: it answers a timeout, collecting nothing.
        return ChannelResult.unknown("timeout", "not collected, answer lost")

    def _roll(self, request: ChannelRequest) -> float:
        return self._rng.random()

    def apply_due(self) -> None:
        """Collect the queued submits whose time has come (the provider's queue moves)."""
        now = self.clock.monotonic()
        due = [item for item in self._queued if item[0] <= now]
        self._queued = [item for item in self._queued if item[0] > now]
        for _, request in due:
            if self.idempotent and self.ledger.find(self.name, request.reference) is not None:
                continue  # a resubmit with the same reference was applied already
            self._collect(request)

    async def query(self, request: ChannelRequest) -> ChannelResult:
        self.queries += 1
        await self._delay(self.profile)
        self.apply_due()
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


class _Overrun(Exception):
    def __init__(self, collects: bool) -> None:
        self.collects = collects


class SyncSimulatedChannel(SimulatedChannel):
    """A ``SimulatedChannel`` written with plain ``def`` methods, as a blocking SDK's
    adapter would be: the router runs it on threads.  Its ``overrun`` fault blocks a
    submit's thread past the router's timeout until ``release_overruns()``.  Latency
    is not simulated (a thread cannot sleep on a fake clock).

    Its draws depend on the request, not on the order threads run in, so a seeded
    run is the same run whatever the scheduler does."""

    def __init__(self, name: str, profile: FaultProfile | Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(name, profile, **kwargs)
        self._lock = threading.RLock()
        self._gate = threading.Event()
        self._calls: Counter[str] = Counter()
        self.overrunning = 0
        """Threads blocked past their timeout right now."""

    def _roll(self, request: ChannelRequest) -> float:
        self._calls[request.reference] += 1
        count = self._calls[request.reference]
        return random.Random(f"{self._seed}/{self.name}/{request.reference}/{count}").random()

    def _overrun(self, request: ChannelRequest) -> ChannelResult:
        raise _Overrun(collects=self._roll(request) < 0.5)

    def release_overruns(self) -> None:
        """Let every blocked thread finish (and block none after, until ``hold_overruns``)."""
        self._gate.set()

    def hold_overruns(self) -> None:
        self._gate.clear()

    def submit(self, request: ChannelRequest) -> ChannelResult:  # type: ignore[override]
        with self._lock:
            self.submits += 1
            self.apply_due()
            if self.in_outage():
                raise ChannelUnavailable("outage", f"{self.name} is down")
            try:
                return self._decide(self.profile, request)
            except _Overrun as overrun:
                collects = overrun.collects
                self.overrunning += 1
        self._gate.wait()
        with self._lock:
            self.overrunning -= 1
            if collects:
                return ChannelResult.succeeded(self._collect(request))
            return ChannelResult.declined("insufficient_funds", "balance too low")

    def query(self, request: ChannelRequest) -> ChannelResult:  # type: ignore[override]
        with self._lock:
            self.queries += 1
            self.apply_due()
            if self.in_outage():
                raise ChannelUnavailable("outage", f"{self.name} is down")
            if self._roll(request) < self.profile.query_failure:
                return ChannelResult.unknown("query_timeout", "status query timed out")
            done = self.ledger.find(self.name, request.reference)
            if done is not None:
                return ChannelResult.succeeded(done.channel_reference)
            return self._answers.get(request.reference) or ChannelResult.not_found()


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
