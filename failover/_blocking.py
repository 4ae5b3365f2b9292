"""``BlockingRouter``: the router for WSGI / Django / Flask services, without ``await``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from failover._errors import ReentrantCallError, RouterClosedError
from failover._models import ChannelResult, Repayment, RepaymentResult
from failover._router import Router
from failover.config import RouterConfig
from failover.journal._base import Journal

T = TypeVar("T")


class BlockingRouter:
    """The same operations as ``Router``, as plain blocking methods.

    It runs a ``Router`` on a private event loop in a background thread, so any
    number of request threads can call it at once; plain ``def`` adapters run in
    worker threads as usual.  Use ``with BlockingRouter(...) as router:``.

    ``close()`` may run while other threads are inside a call: each of them gets its
    result if its work finished first, else ``RouterClosedError``; none is left
    waiting.  Its methods must not be called from the router's own loop thread (an
    async adapter or a hook): that would wait on the loop it blocks, so it raises
    ``ReentrantCallError`` (a ``RuntimeError``) instead; ``await`` the ``router``
    property's methods there.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._router = Router(*args, **kwargs)
        self._init_state()

    def _init_state(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Guards _loop/_closing/_calls, so no call is scheduled on a loop being stopped.
        self._lock = threading.Lock()
        self._closing = False
        self._calls: set[concurrent.futures.Future[Any]] = set()

    @classmethod
    def from_config(
        cls, config: str | Path | RouterConfig, *, journal: Journal, **kwargs: Any
    ) -> BlockingRouter:
        """Like ``Router.from_config``: channels built from the file's adapters."""
        blocking = cls.__new__(cls)
        blocking._router = Router.from_config(config, journal=journal, **kwargs)
        blocking._init_state()
        return blocking

    @property
    def router(self) -> Router:
        """The asynchronous router underneath."""
        return self._router

    def open(self) -> None:
        self._refuse_own_loop()
        with self._lock:
            if self._thread is not None:
                return
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="failover-router",
                                      daemon=True)
            thread.start()
            self._loop, self._thread, self._closing = loop, thread, False
        try:
            self._run(self._router.open())
        except BaseException:
            self.close()
            raise

    def close(self, *, grace_s: float | None = None) -> None:
        """Close the router and stop its loop.

        ``grace_s`` is passed to ``Router.close`` when given.  Calls still waiting
        when the loop stops get ``RouterClosedError``; calls made from now on too.
        """
        self._refuse_own_loop()
        with self._lock:
            loop = self._loop
            if loop is None or self._closing:
                return
            self._closing = True  # from here no call is scheduled on the loop
        try:
            kwargs = {} if grace_s is None else {"grace_s": grace_s}
            asyncio.run_coroutine_threadsafe(self._shut_down(kwargs), loop).result()
        finally:
            self._stop_loop()

    async def _shut_down(self, kwargs: dict[str, Any]) -> None:
        try:
            await self._router.close(**kwargs)
            # The httpx kit's clients on this loop: its sockets outlive a stopped loop.
            kit = sys.modules.get("failover.http")
            if kit is not None:
                await kit.aclose_all()  # this loop's clients
        finally:
            # What asyncio.run does on the way out: cancel what is left (a call that
            # slipped past the router's close, say one still writing its intent) and
            # let it finish, so its caller is answered rather than left waiting.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    def _stop_loop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            calls = list(self._calls)
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        for call in calls:  # none should be left; if one is, it must not wait forever
            if not call.done():
                call.set_exception(RouterClosedError("the router closed during the call"))
        with self._lock:
            self._loop = self._thread = None
            self._calls.clear()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _refuse_own_loop(self) -> None:
        thread = self._thread
        if thread is not None and thread.ident == threading.get_ident():
            raise ReentrantCallError(
                "a BlockingRouter method was called from the router's own event loop"
                " (an async adapter or hook): it would wait on the loop it blocks;"
                " await the methods of BlockingRouter.router there instead"
            )

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        try:
            self._refuse_own_loop()
            with self._lock:
                if self._loop is None or self._closing:
                    raise RouterClosedError("the router is not open: use 'with router:'")
                call = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
                self._calls.add(call)
        except BaseException:
            coroutine.close()
            raise
        try:
            return call.result()
        except concurrent.futures.CancelledError:
            if self._closing or self._loop is None:
                raise RouterClosedError("the router closed during the call") from None
            raise
        finally:
            with self._lock:
                self._calls.discard(call)

    def repay(
        self, repayment: Repayment, *, channels: Sequence[str] | None = None
    ) -> RepaymentResult:
        return self._run(self._router.repay(repayment, channels=channels))

    def get(self, key: str) -> RepaymentResult | None:
        return self._run(self._router.get(key))

    def reconcile(self) -> list[RepaymentResult]:
        return self._run(self._router.reconcile())

    def retry(self, key: str) -> RepaymentResult:
        return self._run(self._router.retry(key))

    def get_late(self, key: str) -> RepaymentResult | None:
        return self._run(self._router.get_late(key))

    def sweep(self) -> None:
        self._run(self._router.sweep())

    def notify(self, channel: str, reference: str, result: ChannelResult) -> RepaymentResult:
        """``Router.notify`` for a Django/Flask webhook view."""
        return self._run(self._router.notify(channel, reference, result))

    def callback(self, channel: str, headers: Mapping[str, str], body: bytes
                 ) -> RepaymentResult:
        """``Router.callback``: the adapter checks the signature, then ``notify``."""
        return self._run(self._router.callback(channel, headers, body))

    def reconfigure(self, config: RouterConfig) -> None:
        self._refuse_own_loop()
        loop = self._loop
        if loop is None:
            self._router.reconfigure(config)
            return

        async def swap() -> None:
            self._router.reconfigure(config)

        self._run(swap())

    def wait_recovered(self) -> None:
        self._run(self._router.wait_recovered())
