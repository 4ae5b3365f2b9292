"""One task per repayment key: start, join, forget, drain.  No payment logic here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from failover._errors import RouterClosedError
from failover._models import RepaymentResult

_log = logging.getLogger("failover")

Work = Coroutine[Any, Any, RepaymentResult]


class Registry:
    """The repayments being driven now, one task each; callers join, never duplicate."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[RepaymentResult]] = {}
        self._tags: dict[str, object] = {}
        """Key -> what its task was started with (the intent a repay() brought)."""

    def __contains__(self, key: str) -> bool:
        return key in self._tasks

    def get(self, key: str) -> asyncio.Task[RepaymentResult] | None:
        return self._tasks.get(key)

    def tasks(self) -> list[asyncio.Task[RepaymentResult]]:
        return list(self._tasks.values())

    def tag(self, key: str) -> object | None:
        """What the task driving ``key`` was started with, if it was given anything."""
        return self._tags.get(key)

    def start(self, key: str, work: Callable[[], Work], tag: object = None
              ) -> asyncio.Task[RepaymentResult]:
        """The task driving ``key``: the one running, else a new one running ``work()``.

        Synchronous on purpose: between a caller's check and the task's registration
        there is no await, so ``close()`` always sees every task it must stop, and two
        callers of one key always share one task."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(work(), name=f"failover:{key}")
            self._tasks[key] = task
            if tag is not None:
                self._tags[key] = tag
            task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[RepaymentResult]) -> None:
        key = task.get_name().removeprefix("failover:")
        if self._tasks.get(key) is task:
            del self._tasks[key]
            self._tags.pop(key, None)
        if task.cancelled():
            return
        error = task.exception()  # retrieved here, so asyncio never warns it was not
        if isinstance(error, Exception) and not isinstance(error, RouterClosedError):
            _log.error("repayment %r stopped on an error", key, exc_info=error)

    @staticmethod
    async def join(task: asyncio.Task[RepaymentResult]) -> RepaymentResult:
        """Wait for ``task``; cancelling the caller stops its wait, not the repayment.

        A task stopped by ``close()`` answers its callers ``RouterClosedError``: if its
        intent was written it resumes on the next open; either way a ``repay()`` of the
        same key there joins or starts it, and it is collected at most once."""
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if task.cancelled() and not (caller is not None and caller.cancelling()):
                raise RouterClosedError(
                    "the router closed before this repayment ended: call repay() with the"
                    " same key on an open router (it is never collected twice)") from None
            raise

    async def after(self, key: str) -> None:
        """Wait until no task drives ``key`` (whatever its ending)."""
        while (task := self._tasks.get(key)) is not None:
            await asyncio.wait([task])

    def cancel_all(self) -> list[asyncio.Task[RepaymentResult]]:
        tasks = self.tasks()
        for task in tasks:
            task.cancel()
        return tasks


async def drain(
    keys: Sequence[str], run: Callable[[str], Awaitable[RepaymentResult]], concurrency: int,
    *, keep: bool = True,
) -> list[RepaymentResult]:
    """Run ``keys`` with at most ``concurrency`` at a time; a key whose run fails is
    logged and skipped, so one bad repayment never stops the others.  ``keep=False``
    keeps no results (recovering a million repayments must not hold a million)."""
    results: list[RepaymentResult] = []
    queue = iter(keys)

    async def worker() -> None:
        for key in queue:
            try:
                result = await run(key)
            except RouterClosedError:
                return
            except Exception:
                _log.exception("could not resume repayment %r", key)
                continue
            if keep:
                results.append(result)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(keys)))))
    return results
