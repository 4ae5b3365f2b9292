"""A router's lifecycle: the journal claim, opening and recovery, work resumed in the
background, and ``close(grace_s)`` — so the ``Router`` facade only wires parts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from failover._clock import Clock
from failover._errors import JournalError, RouterClosedError
from failover._executor import Executor
from failover._models import PendingReason, RepaymentResult
from failover._registry import Registry, drain
from failover.events import (
    Event,
    JournalRecovered,
    JournalUnavailable,
    RepaymentTakenOver,
)
from failover.journal._base import Journal

_log = logging.getLogger("failover")

UNWIND_S = 1.0
"""Seconds on the router's clock that abandoned work gets to unwind once cancelled."""

_OWNERS: weakref.WeakValueDictionary[int, Lifecycle] = weakref.WeakValueDictionary()
"""id(journal) -> the open router's lifecycle: one journal serves one open router."""


@dataclass(frozen=True, slots=True)
class Background:
    """Settings of a router's background loop (see ``Router``)."""

    sweep_every_s: float = 5.0
    reconcile_every_s: float = 60.0
    sweep_batch: int = 100
    max_backoff_s: float = 30.0


class Lifecycle:
    """Opens, recovers, runs background work and closes one router."""

    def __init__(
        self, journal: Journal, clock: Clock, executor: Executor, registry: Registry,
        resume: Callable[[str], Awaitable[RepaymentResult]], concurrency: int,
        background: Background | None = None, emit: Callable[[Event], None] | None = None,
        late: Callable[[], Awaitable[None]] | None = None,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._journal = journal
        self._clock = clock
        self._executor = executor
        self._registry = registry
        self._resume = resume
        self._concurrency = concurrency
        self.is_open = False
        self._recovery: asyncio.Task[list[RepaymentResult]] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closing: asyncio.Task[None] | None = None
        self._opening: asyncio.Task[None] | None = None
        self._background_settings = background
        self._loop_task: asyncio.Task[None] | None = None
        self._emit = emit or (lambda event: None)
        self._late = late
        self._late_task: asyncio.Future[Any] | None = None
        self._refresh = refresh

    def require_open(self) -> None:
        if not self.is_open:
            raise RouterClosedError("the router is not open: use 'async with router:'")

    async def open(self) -> None:
        """Claim and open the journal, then resolve and resume every unfinished
        repayment in the background: each first asks the channels about its attempts
        in doubt.  Callers at the same time share one opening."""
        if self.is_open:
            return
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_task(self._open())
            self._opening.add_done_callback(self._opened)
        await asyncio.shield(self._opening)

    def _opened(self, task: asyncio.Task[None]) -> None:
        self._opening = None
        if not task.cancelled():
            task.exception()  # retrieved: the callers that went away must not warn

    async def _open(self) -> None:
        if self._closing is not None:
            await asyncio.shield(self._closing)  # a close in progress ends first
        owner = _OWNERS.get(id(self._journal))
        if owner is not None and owner is not self:
            raise JournalError("this journal is already open in another router: one journal"
                               " serves one open router at a time")
        _OWNERS[id(self._journal)] = self
        try:
            await self._journal.open()
            keys = await self._journal.pending_keys()
            if self._refresh is not None:
                await self._refresh()  # operators' switches hold from the first repayment
        except BaseException:
            _OWNERS.pop(id(self._journal), None)
            await asyncio.shield(self._journal.close())
            raise
        self.is_open = True
        self._executor.open()
        if keys:
            self._recovery = asyncio.create_task(
                drain(keys, self._resume, self._concurrency, keep=False),
                name="failover:recovery")
        if self._background_settings is not None:
            self._loop_task = asyncio.create_task(
                self._background_loop(self._background_settings), name="failover:background")

    async def _background_loop(self, settings: Background) -> None:
        """Take over repayments whose owner's lease expired (every ``sweep_every_s``),
        reconcile those waiting on a channel (every ``reconcile_every_s``), one instance
        per repayment, and do the late-collection work that is due (``LateWork``).  A
        journal that cannot be reached is retried with backoff."""
        clock = self._clock
        next_reconcile = clock.monotonic() + settings.reconcile_every_s
        down_since: float | None = None
        delay = settings.sweep_every_s
        while self.is_open:
            try:
                if self._refresh is not None:
                    await self._refresh()  # operators' switches in, breaker states out
                taken = await self._journal.take_expired(settings.sweep_batch)
                if taken:
                    self._emit(RepaymentTakenOver(tuple(taken)))
                    # All at once: most only wait out settle_s before their query is
                    # proof, and must not queue behind each other (the batch is bounded).
                    self._spawn(drain(taken, self._resume, len(taken), keep=False))
                if clock.monotonic() >= next_reconcile:
                    next_reconcile = clock.monotonic() + settings.reconcile_every_s
                    waiting = [key for key in await self._journal.pending_keys(
                        PendingReason.AWAITING_CHANNEL) if key not in self._registry]
                    if waiting:
                        self._spawn(drain(waiting, self._resume, self._concurrency,
                                          keep=False))
                if self._late is not None and (self._late_task is None
                                               or self._late_task.done()):
                    # Beside the loop, not in it: re-queries and refunds wait on channels,
                    # and must not hold up the takeover of expired leases.
                    self._late_task = self._spawn(self._late_pass())
            except (JournalError, OSError) as exc:
                if down_since is None:
                    down_since = clock.monotonic()
                    delay = settings.sweep_every_s
                delay = min(delay * 2, settings.max_backoff_s)
                self._emit(JournalUnavailable(str(exc), delay))
                await clock.sleep(delay)
                continue
            except Exception:  # a bug must not stop the loop for good: logged, retried
                _log.exception("the background loop failed; retrying")
                await clock.sleep(settings.sweep_every_s)
                continue
            if down_since is not None:
                self._emit(JournalRecovered(clock.monotonic() - down_since))
                down_since = None
            await clock.sleep(settings.sweep_every_s)

    def spawn(self, work: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run ``work`` beside the router's calls; ``close()`` waits for it."""
        return self._spawn(work)

    def _spawn(self, work: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _late_pass(self) -> None:
        assert self._late is not None
        try:
            await self._late()
        except (JournalError, OSError) as exc:  # the loop itself reports the journal down
            _log.warning("late-collection pass stopped: %s", exc)
        except Exception:
            _log.exception("the late-collection pass failed; it runs again next sweep")

    async def wait_recovered(self) -> None:
        if self._recovery is not None:
            await asyncio.wait([self._recovery])
            if self._recovery.cancelled():
                raise RouterClosedError("the router closed before its recovery finished")
            self._recovery.result()

    def resume_later(self, key: str) -> None:
        """A late answer arrived for ``key``: drive it again once its current drive ends."""
        if not self.is_open:
            return

        async def resume() -> None:
            await self._registry.after(key)
            if self.is_open:
                await self._resume(key)

        task = asyncio.get_running_loop().create_task(resume(), name=f"failover-resume:{key}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self, grace_s: float) -> None:
        """See ``Router.close``.  The shutdown runs in a task of its own: a ``close()``
        that is cancelled (a shutdown timeout) still leaves the router closed and the
        journal free, and a second ``close()`` waits for the first."""
        if self._opening is not None:  # an open in progress ends first, then is closed
            with contextlib.suppress(Exception):
                await asyncio.shield(self._opening)
        if self._closing is None:
            if not self.is_open:
                return
            self.is_open = False
            self._executor.closing = True
            self._stop_loop()
            self._closing = asyncio.get_running_loop().create_task(
                self._shut_down(grace_s), name="failover:close")
        await asyncio.shield(self._closing)

    def _in_the_air(self) -> list[asyncio.Future[Any]]:
        work: list[asyncio.Future[Any]] = [
            *self._registry.tasks(), *self._background, *self._executor.late_writes,
            *self._executor.threads]
        if self._recovery is not None and not self._recovery.done():
            work.append(self._recovery)
        return work

    async def _shut_down(self, grace_s: float) -> None:
        try:
            if grace_s > 0:
                # Calls in the air answer; plain-def threads end; late answers are written.
                with contextlib.suppress(TimeoutError):
                    async with self._clock.timeout(grace_s):
                        while work := [w for w in self._in_the_air() if not w.done()]:
                            await asyncio.wait(work)
            self.abandon()
            # Threads cannot be cancelled: they are left running, as a crash leaves them.
            # The rest is bounded: an adapter that swallows its cancellation must not hold
            # the shutdown (it can start no call: the gate is shut).
            work = [w for w in self._in_the_air()
                    if w not in self._executor.threads and not w.done()]
            if work:
                with contextlib.suppress(TimeoutError):
                    async with self._clock.timeout(UNWIND_S):
                        await asyncio.wait(work)
        finally:
            self._executor.closed = True
            try:
                await self._journal.close()
            finally:
                _OWNERS.pop(id(self._journal), None)
                self._closing = None

    def _stop_loop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None

    def abandon(self) -> None:
        """Stop everything in flight without writing anything more: what a crash does."""
        self.is_open = False
        self._executor.closing = True
        self._stop_loop()
        if self._recovery is not None:
            self._recovery.cancel()
        for task in [*self._background, *self._executor.late_writes]:
            task.cancel()
        self._registry.cancel_all()

    def crash(self) -> None:
        """``abandon``, and free the journal for a new router, as a process that died."""
        self.abandon()
        self._executor.closed = True
        if _OWNERS.get(id(self._journal)) is self:
            del _OWNERS[id(self._journal)]
