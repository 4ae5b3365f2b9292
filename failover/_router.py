"""``Router``: the facade that wires the channel set, the registry, the executor and
the journal together.  It holds no payment logic (that is ``_flow.py``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from failover._adapters import build_channels
from failover._channel import Channel
from failover._channels import ChannelSet
from failover._clock import Clock, SystemClock
from failover._eligibility import Eligibility
from failover._errors import (
    CallbackRejected,
    ConfigError,
    JournalError,
    RouterClosedError,
    TerminalStateError,
    UnknownReference,
    UnknownRepayment,
)
from failover._executor import Executor, Intent
from failover._flow import make_reference
from failover._late import LateWork, late_settings, watch_list, winner
from failover._lifecycle import Background, Lifecycle
from failover._models import (
    MAX_OVERRIDE_S,
    Callback,
    ChannelResult,
    LateState,
    Outcome,
    Override,
    Repayment,
    RepaymentResult,
    RepaymentStatus,
)
from failover._policy import Breaker, RetryBudget
from failover._registry import Registry, drain
from failover.config import RouterConfig
from failover.events import Hook, emit
from failover.journal._base import Journal, require_account

__all__ = ["Router", "make_reference"]

_log = logging.getLogger("failover")

def _check_lease(journal: Journal, config: RouterConfig, names: Iterable[str]) -> None:
    """On a shared journal a call must end before its owner's lease can: every channel's
    ``timeout_s`` (its entry's, or the default for a channel the file does not name)
    plus the journal's margin must fit in ``lease_s``."""
    lease_s = getattr(journal, "lease_s", None)
    margin_s = getattr(journal, "margin_s", 0.0)
    if lease_s is None:
        return
    for name in dict.fromkeys([*config.channels, *names]):
        channel = config.channel(name)
        if not channel.timeout_s + margin_s < lease_s:  # NaN fails too
            raise ConfigError(
                f"the journal's lease_s ({lease_s:g} s) must exceed channels.{name}.timeout_s"
                f" ({channel.timeout_s:g} s) plus a margin of {margin_s:g} s")


class Router:
    """Collects repayments through channels in priority order, failing over safely.

    Use as ``async with Router(...) as router``; opening the router opens the
    journal and recovers work a crash left unfinished.
    """

    def __init__(
        self, channels: Sequence[Channel], journal: Journal, config: RouterConfig | None = None,
        *, clock: Clock | None = None, hooks: Iterable[Hook] = (),
        recovery_concurrency: int = 16, query_attempts: int = 3, query_backoff_s: float = 0.05,
        background: bool | None = None, sweep_every_s: float = 5.0,
        reconcile_every_s: float = 60.0,
    ) -> None:
        """``background`` runs a loop while the router is open that takes over
        repayments whose owner's lease expired (every ``sweep_every_s``; a dead
        instance's work resumes within the journal's ``lease_s`` plus that), reconciles
        repayments waiting on a channel (every ``reconcile_every_s``), and looks for late
        collections, refunds them and sends reminders (``config.late``,
        ``config.reminders``; see ``sweep()``).  It is on by default for a shared journal
        (``PostgresJournal``) and off otherwise; on an SQLite journal turn it on
        (``background=True``) or call ``sweep()`` and ``reconcile()`` on a schedule."""
        if recovery_concurrency < 1:
            raise ValueError(f"recovery_concurrency must be at least 1, got {recovery_concurrency}")
        if query_attempts < 1:
            raise ValueError(f"query_attempts must be at least 1, got {query_attempts}")
        if sweep_every_s <= 0 or reconcile_every_s <= 0:
            raise ValueError("sweep_every_s and reconcile_every_s must be positive, got"
                             f" {sweep_every_s} and {reconcile_every_s}")
        if background is None:
            background = bool(getattr(journal, "shared", False))
        config = config or RouterConfig()
        self._journal = journal
        self._clock: Clock = clock or SystemClock()
        hooks = tuple(hooks)
        self._channels = ChannelSet(channels, config, self._clock, hooks)
        _check_lease(journal, config, self._channels.layout.lanes)
        self._budget = RetryBudget(config.retry_budget, self._clock)
        self._registry = Registry()
        self._executor = Executor(journal, self._clock, hooks, self._budget,
                                  query_attempts=query_attempts, query_backoff_s=query_backoff_s,
                                  on_late_answer=lambda key: self._life.resume_later(key))
        self._recovery_concurrency = recovery_concurrency
        self._sweep_every_s = sweep_every_s
        self._switches_read = -float("inf")
        tell = (lambda event: emit(hooks, event)) if hooks else (lambda event: None)
        self._late = LateWork(journal, self._clock, self._channels, tell,
                              lambda: late_settings(self.config))
        self._life = Lifecycle(
            journal, self._clock, self._executor, self._registry, self._resume,
            recovery_concurrency,
            Background(sweep_every_s, reconcile_every_s) if background else None,
            tell, self._late.sweep, self._refresh)

    @classmethod
    def from_config(
        cls, config: str | Path | RouterConfig, *, journal: Journal, **kwargs: Any
    ) -> Self:
        """Build a router whose channels come from the file's ``adapter`` and ``options``.

        ``config`` is a path (TOML or YAML, with ``FAILOVER_*`` overrides) or a loaded
        ``RouterConfig``.  The journal is never implied: pass ``SQLiteJournal(path)``.
        """
        source = "config"
        if not isinstance(config, RouterConfig):
            source = str(config)
            config = RouterConfig.load(config)
        return cls(build_channels(config, source), journal, config, **kwargs)

    # ---- configuration --------------------------------------------------------

    def reconfigure(self, config: RouterConfig) -> None:
        """Swap priority, limits, windows and policies without a restart.

        Repayments in flight finish under the configuration they started with;
        breakers keep their state."""
        _check_lease(self._journal, config, self._channels.layout.lanes)
        self._channels.reconfigure(config)
        self._budget.reconfigure(config.retry_budget)

    @property
    def config(self) -> RouterConfig:
        return self._channels.layout.config

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Channel names in priority order."""
        return self._channels.layout.order

    def breaker(self, channel: str) -> Breaker:
        """The breaker of ``channel`` (for dashboards and tests)."""
        self._channels.check_preference([channel])
        return self._channels.layout.lanes[channel].breaker

    def explain(self, repayment: Repayment, *, channels: Sequence[str] | None = None
                ) -> list[Eligibility]:
        """The order this router would try channels for ``repayment`` now and, for each
        channel it would skip, why (disabled, limits, maintenance, breaker_open)."""
        preference = self._channels.check_preference(channels)
        return self._channels.layout.explain(repayment.amount, repayment.currency, self._clock,
                                             preference)

    # ---- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the journal (one journal serves one open router), then resolve and
        resume every unfinished repayment in the background."""
        await self._life.open()

    async def close(self, *, grace_s: float = 5.0) -> None:
        """Stop taking work, give calls in the air up to ``grace_s`` to answer (their
        answers are journaled), then stop what is left as a crash would: it resumes on
        the next open, in this process or another.  No channel call starts once this
        has begun; a ``close()`` cancelled midway still completes."""
        await self._life.close(grace_s)

    @property
    def is_open(self) -> bool:
        """Whether the router takes work (opened, and not closing, closed or crashed)."""
        return self._life.is_open

    async def wait_recovered(self) -> None:
        """Wait until the work recovered on open has finished (or is pending)."""
        await self._life.wait_recovered()

    # ---- operations ------------------------------------------------------------------

    async def repay(self, repayment: Repayment, *, channels: Sequence[str] | None = None
                    ) -> RepaymentResult:
        """Collect ``repayment``, or return what happened to it already.

        ``channels`` restricts and orders the channels for this repayment (a
        borrower's preference); it is stored with the intent, so a repayment
        resumed after a crash keeps it.  Calling ``repay`` again with the same key
        joins or returns the first call's repayment and never collects twice.
        Cancelling the call stops the caller's wait, not the repayment.
        """
        self._life.require_open()
        if not isinstance(repayment, Repayment):
            raise TypeError(f"repay() takes a failover.Repayment, not {type(repayment).__name__}")
        preference = self._channels.check_preference(channels)
        existing = self._registry.get(repayment.key)
        if existing is not None:  # being driven: check it is the same money, then join
            first = self._registry.tag(repayment.key)
            # Compared with what the journal holds, once the first caller's intent write
            # has answered (its repayment is not the stored one if the key existed).
            record = await first.written(existing) if isinstance(first, Intent) else None
            if record is None and not existing.done():
                try:
                    record = await self._journal.load(repayment.key)
                except JournalError:
                    if self._life.is_open:
                        raise
                    raise RouterClosedError("the router closed during the call") from None
            if record is not None:
                record.check_same(repayment)
            return await self._registry.join(existing)
        # The repayment's own task writes its intent: a caller cancelled meanwhile
        # leaves it driven all the same, and close() sees it from this line on.
        intent = Intent(repayment)
        layout = self._channels.layout
        task = self._registry.start(
            repayment.key, lambda: self._executor.start(intent, preference, layout), intent)
        self._switches_if_stale()
        result = await self._registry.join(task)
        if intent.conflict is not None:
            raise intent.conflict
        return result

    async def get(self, key: str) -> RepaymentResult | None:
        """The current result of ``key``, or ``None`` if the journal does not hold it."""
        self._life.require_open()
        record = await self._journal.load(key)
        return None if record is None else record.result()

    async def reconcile(self) -> list[RepaymentResult]:
        """Resolve every ``PENDING`` repayment now: ask the channels in doubt and resume
        failover where nothing was collected.  Returns their results."""
        self._life.require_open()
        keys = await self._journal.pending_keys()
        return await drain(keys, self._resume, self._recovery_concurrency)

    async def get_late(self, key: str) -> RepaymentResult | None:
        """``get(key)`` with the late collections found for it and their refunds."""
        self._life.require_open()
        record = await self._journal.load(key)
        if record is None:
            return None
        late = tuple(await self._journal.late_checks(key))
        return dataclasses.replace(record.result(), late=late)

    async def override(self, channel: str, *, enabled: bool, for_s: float, reason: str,
                       by: str = "service") -> Override:
        """Switch ``channel`` off (``enabled=False``) or back on, for every instance on
        this journal, for ``for_s`` seconds (it ends by itself).  Taken here at once;
        other instances read it within their ``sweep_every_s``."""
        self._life.require_open()
        self._channels.check_preference([channel])
        if not 0 < for_s <= MAX_OVERRIDE_S:
            raise ValueError(f"for_s must be above 0 and at most {MAX_OVERRIDE_S:.0f}"
                             f" (366 days), got {for_s}")
        now = self._clock.now()
        switch = Override(channel, enabled, now + timedelta(seconds=for_s), reason, by, now)
        await self._journal.set_override(switch)
        self._channels.overrides.set(switch)
        return switch

    async def clear_override(self, channel: str) -> bool:
        """End the switch of ``channel`` now, for every instance."""
        self._life.require_open()
        self._channels.check_preference([channel])
        cleared = await self._journal.clear_override(channel)
        self._channels.overrides.replace(await self._journal.overrides())
        return cleared

    def _switches_if_stale(self) -> None:
        """Read the operators' switches again, beside the calls, if the last read is
        older than ``sweep_every_s`` (without a background loop too): the repayments
        that come after it take them.  Never an await before a repayment is registered."""
        now = self._clock.monotonic()
        if now - self._switches_read < self._sweep_every_s:
            return
        self._switches_read = now

        async def read() -> None:
            try:
                self._channels.overrides.replace(await self._journal.overrides())
            except JournalError:  # the loop or a later call reads them again
                _log.warning("could not read the operators' channel switches", exc_info=True)

        self._life.spawn(read())

    async def _refresh(self) -> None:
        """Read the operators' switches; note this instance's breaker states."""
        self._channels.overrides.replace(await self._journal.overrides())
        self._switches_read = self._clock.monotonic()
        instance = str(getattr(self._journal, "instance", "local"))
        await self._journal.report_breakers(
            instance, {name: lane.breaker.state
                       for name, lane in self._channels.layout.lanes.items()},
            self._clock.now())

    async def sweep(self) -> None:
        """Do the late-collection work that is due now, once: watch repayments that
        ended with attempts that may still collect, re-query those due (``config.late``),
        correct and refund what turned up, and emit ``at_risk`` reminders
        (``config.reminders``).  The background loop calls it every ``sweep_every_s``."""
        self._life.require_open()
        await self._refresh()
        await self._late.sweep()

    async def notify(self, channel: str, reference: str, result: ChannelResult
                     ) -> RepaymentResult:
        """Feed a provider's asynchronous notice (a webhook) about ``reference`` on
        ``channel`` into the router, as the answer to a status query would be.

        A ``SUCCEEDED`` or a refusal settles an attempt in doubt at once and the
        repayment goes on from there; a ``SUCCEEDED`` for a repayment that ended otherwise
        is a late collection (corrected or refunded like one found by the sweep).  Safe to
        call any number of times, before, during or after the submit returns.  Answers
        that prove nothing (``UNKNOWN``, ``UNAVAILABLE``) change nothing.  Raises
        ``UnknownReference`` naming ``reference`` if no repayment sent it to ``channel``.
        """
        self._life.require_open()
        self._channels.check_preference([channel])
        if not isinstance(result, ChannelResult):
            raise TypeError(f"notify() takes a failover.ChannelResult, not"
                            f" {type(result).__name__}")
        key = await self._journal.find_reference(channel, reference)
        if key is None:
            raise UnknownReference(channel, reference)
        record = await self._journal.load(key)
        assert record is not None
        if not result.outcome.is_definitive:
            return record.result()
        doubt = record.status is RepaymentStatus.PENDING and any(
            a.reference == reference and a.round == record.round and a.in_doubt
            for a in record.attempts)
        if doubt and key not in self._registry:
            # Not driven here: this instance takes it (if no other holds it), journals
            # the notice as what became of the attempt, and drives it on from there.
            layout = self._channels.layout
            await self._registry.join(self._registry.start(
                key, lambda: self._executor.notice(key, layout, reference, result)))
            record = await self._journal.load(key) or record
        won = winner(record)
        if result.outcome is Outcome.SUCCEEDED and (won is None or won[1] != reference):
            # Collected, and the ending does not rest on it (or is not reached yet): a late
            # collection, journaled now and made right once the repayment has ended.
            await self._late.found(key, channel, reference, result.channel_reference,
                                   "callback")
        if key in self._registry:
            self._life.resume_later(key)  # being driven here: looked at again after
        stored = await self.get_late(key)
        assert stored is not None
        return stored

    async def callback(self, channel: str, headers: Mapping[str, str], body: bytes
                       ) -> RepaymentResult:
        """A provider's webhook as received: the channel's adapter checks its signature
        and reads it (``parse_callback(headers, body)`` returning a ``Callback``), then
        ``notify``.  ``CallbackRejected`` if the adapter refuses it or has no such hook."""
        self._life.require_open()
        self._channels.check_preference([channel])
        adapter = self._channels.layout.lanes[channel].channel
        parse = getattr(adapter, "parse_callback", None)
        if parse is None:
            raise CallbackRejected(channel, "the adapter has no parse_callback hook")
        try:
            notice = parse(headers, body)
        except Exception as exc:
            raise CallbackRejected(channel, str(exc) or type(exc).__name__) from exc
        if not isinstance(notice, Callback):
            raise CallbackRejected(channel, f"parse_callback returned {notice!r}, not a"
                                            " failover.Callback")
        return await self.notify(channel, notice.reference, notice.result)

    async def retry(self, key: str) -> RepaymentResult:
        """Start a new round for a ``FAILED`` repayment, with new channel references.

        Callers at the same time join one new round.  A repayment that is not
        ``FAILED`` is returned as it stands (``SUCCEEDED`` is final).  Raises
        ``JournalError``, journaling nothing, when its account was erased by ``purge``
        or cannot be decoded (no channel could be called)."""
        self._life.require_open()
        layout = self._channels.layout

        async def new_round() -> RepaymentResult:
            record = await self._journal.load(key)
            if record is None:
                raise UnknownRepayment(key)
            if record.status is RepaymentStatus.FAILED and (any(
                    Outcome.SUCCEEDED in (a.outcome, a.resolution) for a in record.attempts)
                    or await self._journal.late_checks(key, state=LateState.COLLECTED)):
                # A channel answered SUCCEEDED after the repayment failed (a late answer):
                # the borrower paid.  Corrected now; a new round would collect again.
                for check in watch_list(record, self._clock.now()):
                    if check.state is LateState.COLLECTED:
                        await self._journal.collected_late(check)
                record = await self._late.settle(key)
            if record.status is RepaymentStatus.FAILED:
                # Refused before the new round is journaled: a round that cannot call a
                # channel would stay pending for good.
                require_account(record)
                try:
                    record = await self._journal.new_round(key, self._clock.now())
                except TerminalStateError:
                    # Another instance started the new round first: join it.
                    return await self._executor.drive(None, layout, key, join=True)
            return await self._executor.drive(record, layout)

        return await self._registry.join(self._registry.start(key, new_round))

    async def _resume(self, key: str) -> RepaymentResult:
        self._life.require_open()
        layout = self._channels.layout
        task = self._registry.start(key, lambda: self._executor.drive(None, layout, key))
        return await self._registry.join(task)
