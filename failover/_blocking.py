"""``BlockingRouter``: the router for WSGI / Django / Flask services, without ``await``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from failover._models import Repayment, RepaymentResult
from failover._router import Router
from failover.config import RouterConfig
from failover.journal._base import Journal

T = TypeVar("T")


class BlockingRouter:
    """The same operations as ``Router``, as plain blocking methods.

    It runs a ``Router`` on a private event loop in a background thread, so any
    number of request threads can call it at once; plain ``def`` adapters run in
    worker threads as usual.  Use ``with BlockingRouter(...) as router:``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._router = Router(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(
        cls, config: str | Path | RouterConfig, *, journal: Journal, **kwargs: Any
    ) -> BlockingRouter:
        """Like ``Router.from_config``: channels built from the file's adapters."""
        blocking = cls.__new__(cls)
        blocking._router = Router.from_config(config, journal=journal, **kwargs)
        blocking._loop = None
        blocking._thread = None
        return blocking

    @property
    def router(self) -> Router:
        """The asynchronous router underneath."""
        return self._router

    def open(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="failover-router", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._run(self._router.open())
        except BaseException:
            self._stop_loop()
            raise

    def close(self) -> None:
        if self._thread is None:
            return
        try:
            self._run(self._router.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coroutine.close()
            from failover._errors import RouterClosedError

            raise RouterClosedError("the router is not open: use 'with router:'")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

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

    def reconfigure(self, config: RouterConfig) -> None:
        loop = self._loop
        if loop is None:
            self._router.reconfigure(config)
            return

        async def swap() -> None:
            self._router.reconfigure(config)

        self._run(swap())

    def wait_recovered(self) -> None:
        self._run(self._router.wait_recovered())
