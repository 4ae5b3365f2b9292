"""Test helpers, public API: simulated channels with ground-truth ledgers, a fake
clock, and checks of the invariants of DESIGN §4 against those ledgers.

The simulated channels also model what happens after a repayment ends: late
applications, provider callbacks (webhooks, optionally signed) and refunds, which
the ledgers record as the truth of what was given back.

Everything here is seeded and deterministic: the same seed and the same calls
give the same answers, so a failing property test can be replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import random
import sqlite3
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from failover._clock import Clock, SystemClock
from failover._errors import ChannelUnavailable
from failover._models import (
    Callback,
    ChannelRequest,
    ChannelResult,
    Outcome,
    RepaymentResult,
    RepaymentStatus,
)
from failover._signing import sign, signed

if TYPE_CHECKING:
    from failover._router import Router

__all__ = [
    "HANG",
    "Audit",
    "CallbackHook",
    "Collected",
    "Collection",
    "FakeClock",
    "FaultProfile",
    "Ledger",
    "MemoryLedger",
    "Refund",
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
    call that hangs in a test still ends.  ``call_at`` runs an action when the clock
    reaches a time (a simulated provider's queue moving).
    """

    def __init__(self, start: datetime = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)) -> None:
        if start.utcoffset() is None:
            raise ValueError("start must be timezone-aware")
        self._start = start
        self._elapsed = 0.0
        self._timers: list[_FakeTimeout] = []
        self._actions: list[tuple[float, int, Callable[[], None]]] = []
        self._actions_lock = threading.Lock()  # plain-def channels schedule from threads
        self._scheduled = 0
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
        with self._actions_lock:
            ready = sorted(a for a in self._actions if a[0] <= self._elapsed)
            self._actions = [a for a in self._actions if a[0] > self._elapsed]
        for _, _, action in ready:
            action()

    def call_at(self, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` once, when the clock is next moved to or past monotonic ``when``
        (in the thread that moves it)."""
        with self._actions_lock:
            self._scheduled += 1
            self._actions.append((when, self._scheduled, action))

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
    tried in the order listed; the rest succeed.  The ``callback_*`` shares other than
    ``callback_instead`` and the ``refund_*`` shares are drawn apart (from their own
    seeded streams), so they do not change which submits fail."""

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
    late_apply_after_query: float = 0.0
    """Share of submits that answer a timeout, are ``NOT_FOUND`` to status queries, and
    collect ``late_apply_after_s`` later: a late collection found only by a sweep or a
    callback.  On a ``FakeClock`` it applies when the clock gets there; on another
    clock, at the channel's next call or ``apply_due()``."""
    late_apply_after_s: float = 60.0
    """How long such a submit waits in the queue (make it longer than ``settle_s``)."""
    callback_instead: float = 0.0
    """Share of submits that collect and answer a timeout, while a callback (sent after
    the answer) says ``SUCCEEDED``."""
    callback_before: float = 0.0
    """Share of decisive submit answers that a callback also tells, before the answer."""
    callback_after: float = 0.0
    """Share of decisive submit answers that a callback also tells, after the answer."""
    callback_late: float = 0.0
    """Share of late applications (``late_apply``, ``late_apply_after_query``) that a
    callback tells when they apply."""
    refund_fail: float = 0.0
    """Share of refunds the channel declines."""
    refund_unknown_applied: float = 0.0
    """Share of refunds that give the money back and answer a timeout."""
    refund_unknown_not_applied: float = 0.0
    """Share of refunds that answer a timeout and give nothing back."""
    refund_unavailable: float = 0.0
    """Share of refunds that answer ``UNAVAILABLE`` (nothing given back)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_s"):
                if value < 0:
                    raise ValueError(f"{f.name} must not be negative, got {value}")
            elif isinstance(value, float) and not 0 <= value <= 1:
                # jitter is a fraction too, so it shares the [0, 1] check
                raise ValueError(f"{f.name} must be a probability in [0, 1], got {value}")
        groups = {
            "submit": (self.reject + self.decline + self.unavailable + self.unknown_collected
                       + self.unknown_not_collected + self.crash_before + self.crash_after
                       + self.not_found_collected + self.late_apply + self.raise_cancelled
                       + self.overrun + self.late_apply_after_query + self.callback_instead),
            "callback": self.callback_before + self.callback_after,
            "refund": (self.refund_fail + self.refund_unknown_applied
                       + self.refund_unknown_not_applied + self.refund_unavailable),
        }
        for group, total in groups.items():
            if total > 1:
                raise ValueError(f"{group} probabilities add up to {total}, more than 1")

    def healed(self) -> FaultProfile:
        """The same latency and callbacks, no faults."""
        return FaultProfile(latency_s=self.latency_s, jitter=self.jitter,
                            late_apply_s=self.late_apply_s,
                            late_apply_after_s=self.late_apply_after_s,
                            callback_before=self.callback_before,
                            callback_after=self.callback_after)


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


@dataclass(frozen=True, slots=True)
class Refund:
    """Money a channel really gave back."""

    channel: str
    refund_reference: str
    """The refund's own reference (its idempotency key)."""
    reference: str
    """The reference of the collection it gave back."""
    repayment_key: str
    amount: Decimal
    channel_reference: str | None = None
    """The channel's own id for the refund."""


class Ledger(Protocol):
    """Ground truth: what the channels really collected, and gave back."""

    def record(self, collection: Collection) -> None: ...

    def find(self, channel: str, reference: str) -> Collection | None: ...

    def collections(self) -> list[Collection]: ...

    def record_refund(self, refund: Refund) -> None: ...

    def find_refund(self, channel: str, refund_reference: str) -> Refund | None: ...

    def refunds(self) -> list[Refund]: ...


class MemoryLedger:
    def __init__(self) -> None:
        self._rows: list[Collection] = []
        self._by_reference: dict[tuple[str, str], Collection] = {}
        self._refunds: list[Refund] = []
        self._refund_by_reference: dict[tuple[str, str], Refund] = {}

    def record(self, collection: Collection) -> None:
        self._rows.append(collection)
        self._by_reference.setdefault((collection.channel, collection.reference), collection)

    def find(self, channel: str, reference: str) -> Collection | None:
        return self._by_reference.get((channel, reference))

    def collections(self) -> list[Collection]:
        return list(self._rows)

    def record_refund(self, refund: Refund) -> None:
        self._refunds.append(refund)
        self._refund_by_reference.setdefault((refund.channel, refund.refund_reference), refund)

    def find_refund(self, channel: str, refund_reference: str) -> Refund | None:
        return self._refund_by_reference.get((channel, refund_reference))

    def refunds(self) -> list[Refund]:
        return list(self._refunds)


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
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS refunds (id INTEGER PRIMARY KEY, channel TEXT,"
            " refund_reference TEXT, reference TEXT, repayment_key TEXT, amount TEXT,"
            " channel_reference TEXT)"
        )
        self._conn.execute(
            "CREATE INDEX IF NOT EXISTS refunds_ref ON refunds (channel, refund_reference)"
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

    _REFUND_COLUMNS = ("channel, refund_reference, reference, repayment_key, amount,"
                       " channel_reference")

    def record_refund(self, refund: Refund) -> None:
        with self._lock:
            self._conn.execute(
                f"INSERT INTO refunds ({self._REFUND_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (refund.channel, refund.refund_reference, refund.reference,
                 refund.repayment_key, str(refund.amount), refund.channel_reference),
            )

    def find_refund(self, channel: str, refund_reference: str) -> Refund | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {self._REFUND_COLUMNS} FROM refunds"
                " WHERE channel = ? AND refund_reference = ? ORDER BY id LIMIT 1",
                (channel, refund_reference),
            ).fetchone()
        return None if row is None else Refund(row[0], row[1], row[2], row[3], Decimal(row[4]),
                                               row[5])

    def refunds(self) -> list[Refund]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {self._REFUND_COLUMNS} FROM refunds ORDER BY id"
            ).fetchall()
        return [Refund(r[0], r[1], r[2], r[3], Decimal(r[4]), r[5]) for r in rows]

    def close(self) -> None:
        self._conn.close()


def _as_ledger(ledger: Ledger | str | Path | None) -> Ledger:
    if ledger is None:
        return MemoryLedger()
    if isinstance(ledger, str | Path):  # from a config file's options: a ledger file
        return SQLiteLedger(ledger)
    return ledger


CallbackHook = Callable[[str, str, ChannelResult], Awaitable[None] | None]
"""A provider callback receiver: ``(channel name, reference, result)``, e.g. one that
calls ``router.notify``.  An awaitable it returns runs on its own task, as a webhook
is a request of its own: the channel does not wait for it."""


def _refund_target(ledger: Ledger, channel: str, key: str,
                   channel_reference: str | None) -> Collection | None:
    """The collection a refund gives back: the one with ``channel_reference``, else the
    first of ``key`` on ``channel`` not refunded yet, else its last.  A channel that
    refunds a collection again is not stopped, so that a router that asks twice is
    caught by ``audit``."""
    mine = [c for c in ledger.collections() if c.channel == channel and c.repayment_key == key]
    if channel_reference is not None:
        return next((c for c in mine if c.channel_reference == channel_reference), None)
    refunded = Counter(r.reference for r in ledger.refunds() if r.channel == channel)
    for collection in mine:
        if refunded[collection.reference] > 0:
            refunded[collection.reference] -= 1
        else:
            return collection
    return mine[-1] if mine else None


class SimulatedChannel:
    """A channel that fails as its ``FaultProfile`` says and records in its ledger
    exactly what it collected and gave back.

    ``idempotent=True`` channels deduplicate submits by reference, as real
    gateways with idempotency keys do; others collect again on a second submit.
    ``ledger`` may be a path: a ``SQLiteLedger`` there keeps the truth across
    processes (so ``failover reconcile`` can ask a simulated channel later).

    ``callbacks`` receives the provider's callbacks the profile's ``callback_*`` shares
    call for; ``signed_callback``/``parse_callback`` model signed webhooks (HMAC-SHA256
    with ``callback_secret``, by default one made from the seed and name).  Built with
    ``refunds=False`` the channel has no ``refund``/``query_refund`` attributes at all.
    """

    refund: Callable[[ChannelRequest, str | None, Decimal], Awaitable[ChannelResult]]
    """Give back ``amount`` of a collection (``channel_reference``, else the first of
    ``request.repayment_key`` not given back yet).  ``request.reference`` is the
    refund's own reference: a second call with it returns the first decisive answer,
    or ``SUCCEEDED`` once applied, and moves no money.  Absent if ``refunds=False``."""
    query_refund: Callable[[ChannelRequest], Awaitable[ChannelResult]]
    """``SUCCEEDED`` if the refund ``request.reference`` was applied, else ``NOT_FOUND``."""

    SIGNATURE_HEADER = "X-Signature"

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
        callbacks: CallbackHook | None = None,
        callback_secret: str | bytes | None = None,
        refunds: bool = True,
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
        self.callbacks = callbacks
        secret = callback_secret if callback_secret is not None else f"simulated/{seed}/{name}"
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self._seed = seed
        self._rng = random.Random(f"{seed}/{name}")
        self._latency_rng = random.Random(f"{seed}/{name}/latency")
        self._callback_rng = random.Random(f"{seed}/{name}/callback")
        self._refund_rng = random.Random(f"{seed}/{name}/refund")
        self._answers: dict[str, ChannelResult] = {}
        self._refund_answers: dict[str, ChannelResult] = {}
        self._queued: list[tuple[float, ChannelRequest]] = []
        self._after: list[tuple[str, ChannelResult]] = []
        """Callbacks the submit being decided sends once it has answered."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._undelivered: list[Awaitable[None]] = []
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        self._serial = 0
        self._refund_serial = 0
        self.submits = 0
        self.queries = 0
        self.refund_calls = 0
        self.refund_queries = 0
        self.callbacks_sent: list[tuple[str, ChannelResult]] = []
        """Every callback handed to ``callbacks``: (reference, result), in order."""
        self.callback_errors: list[Exception] = []
        """What awaitable callbacks raised (a failing receiver does not fail the channel)."""
        if refunds:
            self.refund = self._refund
            self.query_refund = self._query_refund

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
        after, self._after = self._after, []
        when = self._callback_when(request, answer)
        if when == "before":
            self._deliver(request.reference, answer)
            await asyncio.sleep(0)  # the receiver starts before the answer arrives
        elif when == "after":
            after.append((request.reference, answer))
        try:
            await self._delay(profile)
        finally:  # the provider sends them even if the caller stopped waiting
            for reference, result in after:
                self._deliver_later(reference, result)
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
        # New faults go at the end: a share of 0 leaves every earlier draw as it was.
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
            (profile.late_apply_after_query, "late_apply_after_query"),
            (profile.callback_instead, "callback_instead"),
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
        if action == "late_apply_after_query":
            due = self.clock.monotonic() + self.profile.late_apply_after_s
            self._queued.append((due, request))
            if isinstance(self.clock, FakeClock):
                self.clock.call_at(due, self.apply_due)
            return ChannelResult.unknown("timeout", "queued, applied after queries miss it")
        if action == "callback_instead":
            self._after.append((request.reference, ChannelResult.succeeded(self._collect(request))))
            return ChannelResult.unknown("timeout", "collected, told by callback")
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

    def _side_roll(self, stream: str, reference: str) -> float:
        """A draw for callbacks or refunds, apart from the submits' stream."""
        return (self._callback_rng if stream == "callback" else self._refund_rng).random()

    def apply_due(self) -> None:
        """Collect the queued submits whose time has come (the provider's queue moves)."""
        for reference, result in self._apply_due():
            self._deliver(reference, result)

    def _apply_due(self) -> list[tuple[str, ChannelResult]]:
        """Collect what is due; answer the callbacks to send about it."""
        now = self.clock.monotonic()
        due = [item for item in self._queued if item[0] <= now]
        self._queued = [item for item in self._queued if item[0] > now]
        notices = []
        for _, request in due:
            if self.idempotent and self.ledger.find(self.name, request.reference) is not None:
                continue  # a resubmit with the same reference was applied already
            channel_reference = self._collect(request)
            if self.profile.callback_late and \
                    self._side_roll("callback", request.reference) < self.profile.callback_late:
                notices.append((request.reference, ChannelResult.succeeded(channel_reference)))
        return notices

    # -- callbacks

    def _callback_when(self, request: ChannelRequest, answer: ChannelResult) -> str | None:
        profile = self.profile
        if not (profile.callback_before or profile.callback_after) or answer.outcome not in (
                Outcome.SUCCEEDED, Outcome.DECLINED, Outcome.REJECTED):
            return None
        roll = self._side_roll("callback", request.reference)
        if roll < profile.callback_before:
            return "before"
        if roll < profile.callback_before + profile.callback_after:
            return "after"
        return None

    def _deliver(self, reference: str, result: ChannelResult) -> None:
        """Hand one callback to ``callbacks`` now."""
        if self.callbacks is None:
            return
        self.callbacks_sent.append((reference, result))
        pending = self.callbacks(self.name, reference, result)
        if pending is None or not inspect.isawaitable(pending):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a plain-def channel's thread, or a test moving the clock
            loop = None
        if loop is not None:
            self._loop = loop
            self._flush_undelivered()
            self._receive(pending)
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._receive, pending)
        else:
            # No loop seen yet (a test moved the clock before any call on a loop): the
            # provider's webhook waits, as a queued one would, for drain_callbacks().
            self._undelivered.append(pending)

    def _flush_undelivered(self) -> None:
        waiting, self._undelivered = self._undelivered, []
        for pending in waiting:
            self._receive(pending)

    def _receive(self, pending: Awaitable[None]) -> None:
        """Run a receiver's awaitable on its own task, keeping what it raises."""
        async def receive() -> None:
            try:
                await pending
            except Exception as exc:
                self.callback_errors.append(exc)

        task = asyncio.get_running_loop().create_task(receive())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _deliver_later(self, reference: str, result: ChannelResult) -> None:
        """Hand one callback over once the current answer has reached the caller."""
        try:
            asyncio.get_running_loop().call_soon(self._deliver, reference, result)
        except RuntimeError:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._deliver, reference, result)
            else:
                self._deliver(reference, result)

    async def drain_callbacks(self) -> None:
        """Wait until every callback handed over so far has been received."""
        self._loop = asyncio.get_running_loop()
        self._flush_undelivered()
        await asyncio.sleep(0)  # the ones sent "after" an answer are handed over first
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def signed_callback(self, reference: str,
                        result: ChannelResult) -> tuple[dict[str, str], bytes]:
        """A webhook as the provider would send it: headers and a JSON body, signed with
        HMAC-SHA256 of the body under ``callback_secret``."""
        body = json.dumps({
            "channel": self.name, "reference": reference, "outcome": result.outcome.value,
            "channel_reference": result.channel_reference, "code": result.code,
            "detail": result.detail,
        }, sort_keys=True, separators=(",", ":")).encode()
        return {"Content-Type": "application/json",
                self.SIGNATURE_HEADER: sign(self._secret, body)}, body

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> Callback:
        """Read a webhook made by ``signed_callback``: raises ``ValueError("bad
        signature")`` unless it is signed with this channel's secret."""
        if not signed(self._secret, headers, body, self.SIGNATURE_HEADER):
            raise ValueError("bad signature")
        try:
            data = json.loads(body)
            result = ChannelResult(Outcome(data["outcome"]), data["channel_reference"],
                                   data["code"], data["detail"])
            reference, channel = str(data["reference"]), data["channel"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError("malformed callback") from exc
        if channel != self.name:
            raise ValueError(f"callback for channel {channel!r}, not {self.name!r}")
        return Callback(reference, result)

    # -- refunds

    def _refund_now(self, request: ChannelRequest, channel_reference: str | None,
                    amount: Decimal) -> ChannelResult:
        """Decide and act on one refund (no latency)."""
        done = self.ledger.find_refund(self.name, request.reference)
        if done is not None:
            return ChannelResult.succeeded(done.channel_reference)
        if request.reference in self._refund_answers:
            return self._refund_answers[request.reference]
        target = _refund_target(self.ledger, self.name, request.repayment_key, channel_reference)
        if target is None:
            answer = ChannelResult.declined("no_such_payment", "nothing collected to refund")
        elif not 0 < amount <= target.amount:
            answer = ChannelResult.declined("invalid_amount", f"cannot refund {amount}")
        else:
            profile, roll = self.profile, self._side_roll("refund", request.reference)
            if roll < profile.refund_fail:
                answer = ChannelResult.declined("refund_declined", "refund refused")
            elif (roll := roll - profile.refund_fail) < profile.refund_unknown_applied:
                self._give_back(request, target, amount)
                return ChannelResult.unknown("timeout", "refunded, answer lost")
            elif (roll := roll - profile.refund_unknown_applied) \
                    < profile.refund_unknown_not_applied:
                return ChannelResult.unknown("timeout", "not refunded, answer lost")
            elif roll - profile.refund_unknown_not_applied < profile.refund_unavailable:
                return ChannelResult.unavailable("service_unavailable", "503 before processing")
            else:
                return ChannelResult.succeeded(self._give_back(request, target, amount))
        self._refund_answers[request.reference] = answer
        return answer

    def _give_back(self, request: ChannelRequest, target: Collection, amount: Decimal) -> str:
        self._refund_serial += 1
        channel_reference = f"{self.name}-r{self._refund_serial}-{request.reference[-6:]}"
        self.ledger.record_refund(Refund(
            self.name, request.reference, target.reference, target.repayment_key, amount,
            channel_reference,
        ))
        return channel_reference

    def _refund_status(self, request: ChannelRequest) -> ChannelResult:
        if self._side_roll("refund", request.reference) < self.profile.query_failure:
            return ChannelResult.unknown("query_timeout", "status query timed out")
        done = self.ledger.find_refund(self.name, request.reference)
        if done is not None:
            return ChannelResult.succeeded(done.channel_reference)
        return ChannelResult.not_found()

    async def _refund(self, request: ChannelRequest, channel_reference: str | None,
                      amount: Decimal) -> ChannelResult:
        self.refund_calls += 1
        self.apply_due()
        if self.in_outage():
            raise ChannelUnavailable("outage", f"{self.name} is down")
        answer = self._refund_now(request, channel_reference, amount)
        await self._delay(self.profile)
        return answer

    async def _query_refund(self, request: ChannelRequest) -> ChannelResult:
        self.refund_queries += 1
        await self._delay(self.profile)
        self.apply_due()
        if self.in_outage():
            raise ChannelUnavailable("outage", f"{self.name} is down")
        return self._refund_status(request)

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
    run is the same run whatever the scheduler does.  Callbacks are handed over from
    its threads; an awaitable one runs on the event loop the channel was made in (or
    last saw), and one sent "after" an answer is handed to that loop as the answer
    returns."""

    refund: Callable[[ChannelRequest, str | None, Decimal], ChannelResult]  # type: ignore[assignment]
    query_refund: Callable[[ChannelRequest], ChannelResult]  # type: ignore[assignment]

    def __init__(self, name: str, profile: FaultProfile | Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(name, profile, **kwargs)
        self._lock = threading.RLock()
        self._gate = threading.Event()
        self._calls: Counter[str] = Counter()
        self._side_calls: Counter[tuple[str, str]] = Counter()
        self.overrunning = 0
        """Threads blocked past their timeout right now."""

    def _roll(self, request: ChannelRequest) -> float:
        self._calls[request.reference] += 1
        count = self._calls[request.reference]
        return random.Random(f"{self._seed}/{self.name}/{request.reference}/{count}").random()

    def _side_roll(self, stream: str, reference: str) -> float:
        self._side_calls[stream, reference] += 1
        count = self._side_calls[stream, reference]
        return random.Random(f"{self._seed}/{self.name}/{reference}/{stream}/{count}").random()

    def _overrun(self, request: ChannelRequest) -> ChannelResult:
        raise _Overrun(collects=self._roll(request) < 0.5)

    def release_overruns(self) -> None:
        """Let every blocked thread finish (and block none after, until ``hold_overruns``)."""
        self._gate.set()

    def hold_overruns(self) -> None:
        self._gate.clear()

    @contextlib.contextmanager
    def _moving(self) -> Iterator[None]:
        """Hold the lock with the provider's queue moved.  The callbacks that tells go
        out after the lock is released: a receiver may call this channel."""
        notices: list[tuple[str, ChannelResult]] = []
        try:
            with self._lock:
                notices = self._apply_due()
                yield
        finally:
            for reference, result in notices:
                self._deliver(reference, result)

    def apply_due(self) -> None:
        with self._moving():  # a FakeClock may move the queue from the event loop's thread
            pass

    def submit(self, request: ChannelRequest) -> ChannelResult:  # type: ignore[override]
        overran: _Overrun | None = None
        answer, after, when = ChannelResult.unknown(), [], None
        with self._moving():
            self.submits += 1
            if self.in_outage():
                raise ChannelUnavailable("outage", f"{self.name} is down")
            try:
                answer = self._decide(self.profile, request)
            except _Overrun as exc:
                overran = exc
                self.overrunning += 1
            else:
                after, self._after = self._after, []
                when = self._callback_when(request, answer)
        if overran is not None:  # block outside the lock, as the real thread would
            return self._overran(request, overran.collects)
        if when == "before":
            self._deliver(request.reference, answer)
        elif when == "after":
            after.append((request.reference, answer))
        for reference, result in after:
            self._deliver_later(reference, result)
        return answer

    def _overran(self, request: ChannelRequest, collects: bool) -> ChannelResult:
        self._gate.wait()
        with self._lock:
            self.overrunning -= 1
            if collects:
                return ChannelResult.succeeded(self._collect(request))
            return ChannelResult.declined("insufficient_funds", "balance too low")

    def query(self, request: ChannelRequest) -> ChannelResult:  # type: ignore[override]
        with self._moving():
            self.queries += 1
            if self.in_outage():
                raise ChannelUnavailable("outage", f"{self.name} is down")
            if self._roll(request) < self.profile.query_failure:
                return ChannelResult.unknown("query_timeout", "status query timed out")
            done = self.ledger.find(self.name, request.reference)
            if done is not None:
                return ChannelResult.succeeded(done.channel_reference)
            return self._answers.get(request.reference) or ChannelResult.not_found()

    def _refund(self, request: ChannelRequest,  # type: ignore[override]
                channel_reference: str | None, amount: Decimal) -> ChannelResult:
        with self._moving():
            self.refund_calls += 1
            if self.in_outage():
                raise ChannelUnavailable("outage", f"{self.name} is down")
            return self._refund_now(request, channel_reference, amount)

    def _query_refund(self, request: ChannelRequest) -> ChannelResult:  # type: ignore[override]
        with self._moving():
            self.refund_queries += 1
            if self.in_outage():
                raise ChannelUnavailable("outage", f"{self.name} is down")
            return self._refund_status(request)


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

    Refunds answer from ``refunds`` while it lasts, then succeed: a ``SUCCEEDED``
    step gives the money back, so does a ``Collected`` step before answering its
    result; a refund reference already given back answers ``SUCCEEDED`` again without
    using a step.  With ``refunds=False`` the channel has no ``refund`` at all.
    """

    refund: Callable[[ChannelRequest, str | None, Decimal], Awaitable[ChannelResult]]
    """As ``SimulatedChannel.refund``; absent if ``refunds=False``."""
    query_refund: Callable[[ChannelRequest], Awaitable[ChannelResult]]
    """``SUCCEEDED`` if the refund ``request.reference`` was given back, else ``NOT_FOUND``."""

    def __init__(
        self,
        name: str,
        submits: Iterable[ScriptStep] = (),
        *,
        queries: Iterable[ScriptStep] = (),
        refunds: Iterable[ScriptStep] | Literal[False] = (),
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
        self.refund_requests: list[ChannelRequest] = []
        if refunds is not False:
            self._refunds = list(refunds)
            self.refund = self._refund
            self.query_refund = self._query_refund

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

    async def _refund(self, request: ChannelRequest, channel_reference: str | None,
                      amount: Decimal) -> ChannelResult:
        self.refund_requests.append(request)
        done = self.ledger.find_refund(self.name, request.reference)
        if done is not None:
            return ChannelResult.succeeded(done.channel_reference)
        step = self._refunds.pop(0) if self._refunds else ChannelResult.succeeded()
        succeeded = isinstance(step, ChannelResult) and step.outcome is Outcome.SUCCEEDED
        if succeeded or isinstance(step, Collected):
            target = _refund_target(self.ledger, self.name, request.repayment_key,
                                    channel_reference)
            if target is None:
                return ChannelResult.declined("no_such_payment", "nothing collected to refund")
            given = (step.channel_reference if isinstance(step, ChannelResult) else None) \
                or f"{self.name}-r{len(self.ledger.refunds()) + 1}"
            self.ledger.record_refund(Refund(
                self.name, request.reference, target.reference, target.repayment_key, amount,
                given,
            ))
            if not isinstance(step, Collected):
                return ChannelResult.succeeded(given)
            step = step.result
        if isinstance(step, _Hang):
            await asyncio.Event().wait()
        if isinstance(step, BaseException):
            raise step
        assert isinstance(step, ChannelResult)
        return step

    async def _query_refund(self, request: ChannelRequest) -> ChannelResult:
        done = self.ledger.find_refund(self.name, request.reference)
        if done is not None:
            return ChannelResult.succeeded(done.channel_reference)
        return ChannelResult.not_found()


@dataclass(frozen=True, slots=True)
class Audit:
    """What the ledgers say about the router's results (DESIGN §4).

    Collections count net of refunds: each refund takes back its share of the
    collection it gave back (a whole one for a full refund)."""

    repayments: int
    succeeded: int
    failed: int
    pending: int
    duplicates: tuple[str, ...]
    """Keys collected more than once, net of refunds (keys on the manual list aside)."""
    lost: tuple[str, ...]
    """Keys accepted but unknown to the journal, or collected (net) while shown
    ``FAILED`` (keys on the manual list aside)."""
    false_successes: tuple[str, ...]
    """Keys shown ``SUCCEEDED`` that no channel collected."""
    strays: tuple[str, ...]
    """Keys collected that were never accepted."""
    pending_keys: tuple[str, ...]
    refunded_twice: tuple[str, ...] = ()
    """Keys with a collection (channel and reference) refunded more times than it was
    collected: twice under one refund reference, or under two."""
    refunded_only: tuple[str, ...] = ()
    """Keys shown ``SUCCEEDED`` that refunds left with less than one collection net, and
    keys refunded more than they were collected."""
    manual: tuple[str, ...] = ()
    """Keys on the manual-refund list that net more than their status allows: money
    still to be given back by hand."""
    refunds: int = 0
    """Refunds in the ledgers."""

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.lost or self.false_successes or self.strays
                    or self.refunded_twice or self.refunded_only)

    def summary(self) -> str:
        text = (
            f"repayments {self.repayments}: succeeded {self.succeeded}, failed {self.failed},"
            f" pending {self.pending}; duplicates {len(self.duplicates)},"
            f" lost {len(self.lost)}, false successes {len(self.false_successes)},"
            f" strays {len(self.strays)}"
        )
        if self.refunds or self.manual:
            text += (f"; refunds {self.refunds}: refunded twice {len(self.refunded_twice)},"
                     f" refunded only {len(self.refunded_only)}, manual {len(self.manual)}")
        return text


def _ledgers(sources: Iterable[SimulatedChannel | ScriptedChannel | Ledger]) -> list[Ledger]:
    unique: dict[int, Ledger] = {}
    for source in sources:
        ledger = source.ledger if isinstance(source, SimulatedChannel | ScriptedChannel) \
            else source
        unique.setdefault(id(ledger), ledger)
    return list(unique.values())


def audit(
    results: Mapping[str, RepaymentResult | None],
    sources: Iterable[SimulatedChannel | ScriptedChannel | Ledger],
    manual: Iterable[str] = (),
) -> Audit:
    """Compare ``results`` (key → the router's result, ``None`` if it has none) with
    what the channels' ledgers really collected and gave back.

    Run it after the late-collection horizon: a ``SUCCEEDED`` key must net exactly one
    collection and a ``FAILED`` key none, except the keys in ``manual`` (the
    manual-refund list), which may net more."""
    gross: Counter[str] = Counter()
    per_collection: Counter[tuple[str, str]] = Counter()
    amounts: dict[tuple[str, str], Decimal] = {}
    refunds: list[Refund] = []
    for ledger in _ledgers(sources):
        for c in ledger.collections():
            gross[c.repayment_key] += 1
            per_collection[c.channel, c.reference] += 1
            amounts.setdefault((c.channel, c.reference), c.amount)
        refunds.extend(getattr(ledger, "refunds", list)())  # a ledger may not know refunds
    net = {key: Fraction(n) for key, n in gross.items()}
    refunded: Counter[tuple[str, str]] = Counter()
    twice = set()
    for r in refunds:
        base = amounts.get((r.channel, r.reference))
        net[r.repayment_key] = net.get(r.repayment_key, Fraction(0)) - (
            Fraction(r.amount) / Fraction(base) if base else Fraction(1))
        refunded[r.channel, r.reference] += 1
        if refunded[r.channel, r.reference] > max(per_collection[r.channel, r.reference], 1):
            twice.add(r.repayment_key)
    on_list = set(manual)
    statuses = Counter(r.status for r in results.values() if r is not None)
    lost, false_successes, pending, refunded_only, excused = [], [], [], [], []
    for key, result in results.items():
        has = net.get(key, Fraction(0))
        allowed = 0 if result is not None and result.status is RepaymentStatus.FAILED else 1
        if key in on_list and has > allowed:
            excused.append(key)
        if result is None or (result.status is RepaymentStatus.FAILED and has > 0
                              and key not in on_list):
            lost.append(key)
        elif result.status is RepaymentStatus.SUCCEEDED and gross[key] == 0:
            false_successes.append(key)
        elif result.status is RepaymentStatus.PENDING:
            pending.append(key)
        if has < 0 or (result is not None and result.status is RepaymentStatus.SUCCEEDED
                       and gross[key] and has < 1):
            refunded_only.append(key)
    return Audit(
        repayments=len(results),
        succeeded=statuses[RepaymentStatus.SUCCEEDED],
        failed=statuses[RepaymentStatus.FAILED],
        pending=statuses[RepaymentStatus.PENDING],
        duplicates=tuple(sorted(k for k, n in net.items() if n > 1 and k not in on_list)),
        lost=tuple(sorted(lost)),
        false_successes=tuple(sorted(false_successes)),
        strays=tuple(sorted(k for k in gross if k not in results)),
        pending_keys=tuple(sorted(pending)),
        refunded_twice=tuple(sorted(twice)),
        refunded_only=tuple(sorted(refunded_only)),
        manual=tuple(sorted(excused)),
        refunds=len(refunds),
    )


def assert_invariants(result: Audit, *, allow_pending: bool = True) -> None:
    """Raise ``AssertionError`` naming the keys if any invariant of DESIGN §4 fails."""
    problems = []
    for name in ("duplicates", "lost", "false_successes", "strays", "refunded_twice",
                 "refunded_only"):
        keys = getattr(result, name)
        if keys:
            problems.append(f"{name}: {', '.join(keys[:10])}")
    if not allow_pending and result.pending_keys:
        problems.append(f"still pending: {', '.join(result.pending_keys[:10])}")
    if problems:
        raise AssertionError("invariants broken: " + "; ".join(problems))
