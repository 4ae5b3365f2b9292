"""Channels on a shared in-memory ledger, for the PostgreSQL tests: the ledger is the
ground truth those tests audit (what the channels really collected)."""

from __future__ import annotations

import asyncio
import threading

from failover import ChannelRequest, ChannelResult


class Ledger:
    """What the channels really collected: the ground truth.  Locked, as plain-``def``
    channels write it from their threads."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []  # (repayment key, channel, reference)
        self._lock = threading.Lock()

    def collect(self, key: str, channel: str, reference: str, *, idempotent: bool) -> None:
        with self._lock:
            if not (idempotent and self.find(channel, reference)):
                self.rows.append((key, channel, reference))

    def find(self, channel: str, reference: str) -> bool:
        return any(c == channel and r == reference for _, c, r in self.rows)

    def collections(self, key: str) -> list[tuple[str, str, str]]:
        with self._lock:
            return [row for row in self.rows if row[0] == key]


class LedgerChannel:
    """An async channel on the ledger.  ``gate``, while set to an unset event, holds each
    submit before it collects; ``decline`` declines; ``unknown`` collects, then answers a
    timeout; ``query_unknown`` makes queries time out."""

    def __init__(self, name: str, ledger: Ledger, *, idempotent: bool = True) -> None:
        self.name = name
        self.ledger = ledger
        self.idempotent = idempotent
        self.gate: asyncio.Event | None = None
        self.decline = False
        self.unknown = False
        self.query_unknown = False
        self.submits: list[str] = []
        self.entered = asyncio.Event()

    async def submit(self, request: ChannelRequest) -> ChannelResult:
        self.submits.append(request.reference)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.decline:
            return ChannelResult.declined("insufficient_balance")
        self.ledger.collect(request.repayment_key, self.name, request.reference,
                            idempotent=self.idempotent)
        if self.unknown:
            return ChannelResult.unknown("timeout")
        return ChannelResult.succeeded(f"{self.name}:{request.reference}")

    async def query(self, request: ChannelRequest) -> ChannelResult:
        if self.query_unknown:
            return ChannelResult.unknown("query_timeout")
        if self.ledger.find(self.name, request.reference):
            return ChannelResult.succeeded(f"{self.name}:{request.reference}")
        return ChannelResult.not_found()


class BlockingChannel:
    """A plain-``def`` channel whose submit blocks (a hung HTTP call) until ``release``
    is set, then collects: it outlives the router's timeout on its thread."""

    def __init__(self, name: str, ledger: Ledger, *, idempotent: bool = True) -> None:
        self.name = name
        self.ledger = ledger
        self.idempotent = idempotent
        self.release = threading.Event()
        self.submits: list[str] = []
        self.ended = threading.Event()

    def submit(self, request: ChannelRequest) -> ChannelResult:
        self.submits.append(request.reference)
        self.release.wait(30)
        self.ledger.collect(request.repayment_key, self.name, request.reference,
                            idempotent=self.idempotent)
        self.ended.set()
        return ChannelResult.succeeded(f"{self.name}:{request.reference}")

    def query(self, request: ChannelRequest) -> ChannelResult:
        if self.ledger.find(self.name, request.reference):
            return ChannelResult.succeeded(f"{self.name}:{request.reference}")
        return ChannelResult.not_found()
