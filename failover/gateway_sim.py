"""A payment gateway simulator: a real HTTP server (Starlette under uvicorn) with its own
durable ledger, seeded faults and signed callbacks, for testing channel adapters and
whole services over real sockets.

    failover gateway-sim --port 8900 --faults late_apply=0.05,reset_after_apply=0.05 --seed 7

    async with GatewaySim("card", "card.db", "error_5xx=0.1", seed=7).serve() as url:
        ...  # port 0 by default: a free port; url is "http://127.0.0.1:PORT"

Endpoints (JSON bodies; amounts are decimal strings, or integers):

``POST /payments``, header ``Idempotency-Key: REFERENCE``,
body ``{"repayment_key", "account", "amount", "currency"}``:

- 200 ``{"status": "succeeded", "payment_id", "reference", "amount", "currency"}``
- 202 ``{"status": "pending", "reference"}``: a late application (applied later)
- 402 ``{"status": "declined", "code": "insufficient_funds", "reference"}``
- 422 ``{"status": "rejected", "code", "detail"?}``: a bad request
  (``missing_idempotency_key``, ``invalid_request``, ``unknown_currency``,
  ``invalid_amount``), a key reused with another repayment key, amount or currency
  (``idempotency_key_reused``; the account is not compared: it is kept masked), or
  the ``reject`` fault (``rejected``)

It collects at most once per key: a repeat gets the first answer (a 202 becomes the 200
once applied) and collects nothing.

``GET /payments/{reference}``: 200 ``{"status": "succeeded" | "declined" | "rejected",
...}`` as above, or 404 ``{"status": "not_found", "code": "not_found"}`` (never asked,
refused by a fault, or a late application not applied yet).

``POST /refunds``, header ``Idempotency-Key: REFUND_REFERENCE``, body ``{"payment_id"
or "reference", "amount"}`` (the payment's id, else its reference): 200 ``{"status":
"succeeded", "refund_id", "refund_reference", "payment_id", "reference", "amount",
"currency"}`` or 422 ``{"status": "rejected", "code"}`` (``unknown_payment``,
``payment_not_collected``, ``amount_exceeds_refundable``, ...); at most once per key,
like payments.
``GET /refunds/{refund_reference}``: 200 as the first answer, or 404.

``GET /ledger``: every collection, refund and pending late application, for audits.
``GET /health``: ``{"status": "ok", "name"}``.  Neither is ever faulted.

Faults (``Faults.parse("latency_ms=20,error_5xx=0.05,maintenance=10:00-10:30")``, the
``--faults`` option, or ``sim.faults = ...`` at any time), on the four gateway endpoints:

- ``latency_ms``: every answer waits this long, varied by ``jitter`` (default 0.5:
  from 0.5x to 1.5x).
- ``maintenance``: ``HH:MM-HH:MM`` in UTC by the server's clock (more with ``;`` or the
  key again): 503 ``maintenance`` with ``Retry-After`` the seconds left in the window.
- ``rate_limit``: the share answered 429 ``rate_limited`` with ``Retry-After: 1``.
- ``error_5xx``: the share answered 500, 502 or 503 (half the 503s with
  ``Retry-After: 1``).
- ``decline``, ``reject``: the shares of new payments declined (402
  ``insufficient_funds``) or rejected (422 ``rejected``).
- ``late_apply``: the share of new payments answered 202 ``pending``; ``GET`` says 404
  for ``late_apply_s`` (default 30), then the server applies it (collects, and sends the
  callback) within a quarter of a second.
- ``reset_after_apply``: the share of new payments and refunds applied and recorded,
  then the connection is reset (TCP RST) without any response.

The 429 and 5xx answers come before anything is applied, so here they mean nothing was
collected; a real gateway makes no such promise for a 500 or a 502.

A caller that goes away before the answer (its read timeout fires during ``latency_ms``,
say) changes nothing: a payment or refund whose whole request arrived is decided and
applied as if the caller had waited (the gateway had the request), and one whose body
never arrived whole applies nothing.  Neither is logged as an error.

Seeded: each request draws from its own stream, ``random.Random(f"{seed}/{kind}/
{reference}/{n}")``, where ``n`` counts that reference's requests of that kind since the
server started.  The same seed and the same requests give the same answers, and traffic
for other references cannot change them (concurrent repeats of one reference may swap
their ``n``).  ``decide`` is that decision as a plain function.

Callbacks: with a ``callback_url``, every payment that ends ``succeeded`` (at once, after
a reset, or late) or ``declined`` is posted there as ``{"reference", "status",
"payment_id", "code"}`` with header ``X-Signature: sha256=<hex HMAC-SHA256 of the body
under the secret>``.  An adapter checks them with ``verify_signature`` and reads them
with ``parse_callback(secret, headers, body)``, which returns a ``failover.Callback``.
Each is tried up to three times (0.2 s, then 0.4 s apart) while the receiver is away or
answers 5xx, each try within 5 s.  While served, every callback goes through one httpx
client, made at the first callback and closed when serving ends.

The ledger is an SQLite file (WAL, ``synchronous=FULL``) that survives restarts; its
``collections`` and ``refunds`` tables are those of ``failover.testing.SQLiteLedger``,
so ``failover.testing.audit(results, [SQLiteLedger(path)])`` audits against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import random
import socket
import sqlite3
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from failover._clock import Clock, SystemClock
from failover._currencies import MINOR_UNITS
from failover._models import Callback, ChannelResult
from failover._signing import sign, signed
from failover.testing import Collection, Refund

__all__ = [
    "SIGNATURE_HEADER",
    "Decision",
    "Delivery",
    "Faults",
    "GatewaySim",
    "Refusal",
    "Window",
    "decide",
    "parse_callback",
    "sign",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Signature"

Kind = Literal["payment", "payment-status", "refund", "refund-status"]
Action = Literal["apply", "decline", "reject", "late", "reset"]
_KINDS = ("payment", "payment-status", "refund", "refund-status")


# ---- faults and decisions (plain data, no I/O) ----------------------------------------------

@dataclass(frozen=True, slots=True)
class Window:
    """A daily maintenance window in UTC, ``start`` included, ``end`` excluded; it may
    cross midnight (``22:00-02:00``)."""

    start: time
    end: time

    def __post_init__(self) -> None:
        if self.start == self.end:
            raise ValueError(f"maintenance window {self} is empty")

    @classmethod
    def parse(cls, text: str) -> Window:
        first, dash, second = text.strip().partition("-")
        try:
            start, end = time.fromisoformat(first.strip()), time.fromisoformat(second.strip())
        except ValueError as exc:
            raise ValueError(f"maintenance: not HH:MM-HH:MM: {text!r}") from exc
        if not dash:
            raise ValueError(f"maintenance: not HH:MM-HH:MM: {text!r}")
        return cls(start, end)

    def _offsets(self, now: datetime) -> tuple[float, float]:
        """Seconds since midnight UTC of now, and of the window's end after its start."""
        moment = now.astimezone(UTC)
        seconds = (moment - moment.replace(hour=0, minute=0, second=0, microsecond=0)
                   ).total_seconds()
        start = self.start.hour * 3600 + self.start.minute * 60 + self.start.second
        end = self.end.hour * 3600 + self.end.minute * 60 + self.end.second
        day = 86400.0
        into = (seconds - start) % day
        return into, (end - start) % day

    def seconds_left(self, now: datetime) -> float | None:
        """Seconds until the window ends, or ``None`` when ``now`` is outside it."""
        into, length = self._offsets(now)
        return length - into if into < length else None

    def __str__(self) -> str:
        return f"{self.start.isoformat('minutes')}-{self.end.isoformat('minutes')}"


_SHARES = ("rate_limit", "error_5xx", "decline", "reject", "late_apply", "reset_after_apply")


@dataclass(frozen=True, slots=True)
class Faults:
    """How the simulator misbehaves (see the module docstring).  Shares are per request;
    ``rate_limit`` + ``error_5xx`` and the four outcome shares each add up to at most 1."""

    latency_ms: float = 0.0
    jitter: float = 0.5
    rate_limit: float = 0.0
    error_5xx: float = 0.0
    decline: float = 0.0
    reject: float = 0.0
    late_apply: float = 0.0
    late_apply_s: float = 30.0
    reset_after_apply: float = 0.0
    maintenance: tuple[Window, ...] = ()

    def __post_init__(self) -> None:
        for name in ("latency_ms", "late_apply_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in (*_SHARES, "jitter"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.rate_limit + self.error_5xx > 1:
            raise ValueError("rate_limit + error_5xx must be at most 1")
        if self.decline + self.reject + self.late_apply + self.reset_after_apply > 1:
            raise ValueError("decline + reject + late_apply + reset_after_apply must be"
                             " at most 1")

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """``"latency_ms=20,error_5xx=0.05,maintenance=10:00-10:30"``; ``""`` or
        ``"none"`` for no faults.  Raises ``ValueError`` naming the bad item."""
        values: dict[str, Any] = {}
        windows: list[Window] = []
        known = [f.name for f in dataclasses.fields(cls)]
        for item in spec.split(","):
            if not item.strip() or item.strip() == "none":
                continue
            name, equals, value = (part.strip() for part in item.partition("="))
            if not equals or not value:
                raise ValueError(f"{item.strip()!r}: not name=value")
            if name not in known:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(known)}")
            if name == "maintenance":
                windows.extend(Window.parse(w) for w in value.split(";") if w.strip())
                continue
            try:
                values[name] = float(value)
            except ValueError as exc:
                raise ValueError(f"{name}: not a number: {value!r}") from exc
        return cls(**values, maintenance=tuple(windows))

    @classmethod
    def of(cls, value: Faults | str | Mapping[str, Any] | None) -> Faults:
        """Faults from a spec string, a mapping of field values, or ``None`` (none)."""
        if value is None:
            return cls()
        if isinstance(value, Faults):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        fields = dict(value)
        windows = fields.pop("maintenance", ())
        if isinstance(windows, str):
            windows = [windows]
        return cls(**fields, maintenance=tuple(
            w if isinstance(w, Window) else Window.parse(w) for w in windows))

    def to_spec(self) -> str:
        """The spec string ``parse`` reads back; ``"none"`` for no faults."""
        default = Faults()
        items = [f"{f.name}={getattr(self, f.name):g}" for f in dataclasses.fields(self)
                 if f.name != "maintenance" and getattr(self, f.name) != getattr(default, f.name)]
        if self.maintenance:
            items.append("maintenance=" + ";".join(str(w) for w in self.maintenance))
        return ",".join(items) or "none"


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer given before anything is applied: 429, 5xx or maintenance."""

    status: int
    code: str
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What the simulator does with one request."""

    latency_s: float
    refusal: Refusal | None
    action: Action
    """For a new payment: ``apply``, ``decline``, ``reject``, ``late`` or ``reset``; for a
    new refund ``apply`` or ``reset``; always ``apply`` for a status query."""


_5XX = ((500, "internal_error"), (502, "bad_gateway"), (503, "service_unavailable"))


def decide(faults: Faults, seed: int | str, kind: Kind, reference: str, n: int,
           now: datetime) -> Decision:
    """The decision for the ``n``-th request (from 1) of ``kind`` for ``reference`` at
    ``now``: the same arguments always give the same decision.

    Every draw is made whether used or not, so one fault's share never moves another's
    decisions."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, not {kind!r}")
    draw = random.Random(f"{seed}/{kind}/{reference}/{n}")
    u_latency, u_refuse, u_5xx, u_retry, u_action = (draw.random() for _ in range(5))
    latency_s = faults.latency_ms / 1000 * (1 + faults.jitter * (2 * u_latency - 1))
    refusal: Refusal | None = None
    left = [s for s in (w.seconds_left(now) for w in faults.maintenance) if s is not None]
    if left:
        refusal = Refusal(503, "maintenance", max(1, math.ceil(max(left))))
    elif u_refuse < faults.rate_limit:
        refusal = Refusal(429, "rate_limited", 1)
    elif u_refuse < faults.rate_limit + faults.error_5xx:
        status, code = _5XX[min(int(u_5xx * len(_5XX)), len(_5XX) - 1)]
        refusal = Refusal(status, code, 1 if status == 503 and u_retry < 0.5 else None)
    action: Action = "apply"
    if kind == "payment":
        shares: tuple[tuple[Action, float], ...] = (
            ("decline", faults.decline), ("reject", faults.reject),
            ("late", faults.late_apply), ("reset", faults.reset_after_apply))
        for name, share in shares:
            if u_action < share:
                action = name
                break
            u_action -= share
    elif kind == "refund" and u_action < faults.reset_after_apply:
        action = "reset"
    return Decision(latency_s, refusal, action)


# ---- signatures and callbacks -----------------------------------------------------------------

def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def verify_signature(secret: str | bytes, headers: Mapping[str, str], body: bytes) -> bool:
    """True when ``headers`` carry the simulator's signature of ``body`` under ``secret``
    (the header name is matched ignoring case; compared in constant time)."""
    return signed(secret, headers, body, SIGNATURE_HEADER)


def parse_callback(secret: str | bytes, headers: Mapping[str, str], body: bytes) -> Callback:
    """A simulator callback as a ``failover.Callback``, for an adapter's
    ``parse_callback(headers, body)``: raises ``ValueError`` for a bad signature or a body
    it cannot read (``Router.callback`` turns that into ``CallbackRejected``)."""
    if not verify_signature(secret, headers, body):
        raise ValueError("bad signature")
    try:
        data = json.loads(body)
        reference, status = data["reference"], data["status"]
        payment_id, code = data.get("payment_id"), data.get("code")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError("malformed callback") from exc
    if not isinstance(reference, str) or not reference:
        raise ValueError("malformed callback: no reference")
    if status == "succeeded":
        result = ChannelResult.succeeded(None if payment_id is None else str(payment_id))
    elif status == "declined":
        result = ChannelResult.declined(str(code or "declined"))
    elif status == "rejected":
        result = ChannelResult.rejected(str(code or "rejected"))
    else:
        raise ValueError(f"malformed callback: status {status!r}")
    return Callback(reference, result)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One callback the simulator sent (or gave up sending)."""

    reference: str
    status: str
    answered: int | None
    """The receiver's HTTP status; ``None`` when no attempt got an answer."""
    attempts: int


# ---- the ledger ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Payment:
    reference: str
    repayment_key: str
    amount: Decimal
    currency: str
    status: str  # succeeded, declined, rejected, pending (a late application)
    code: str | None
    payment_id: str | None
    apply_at: float | None


@dataclass(frozen=True, slots=True)
class _RefundAnswer:
    refund_reference: str
    reference: str | None
    amount: Decimal
    status: str  # succeeded, rejected
    code: str | None
    refund_id: str | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    reference TEXT PRIMARY KEY, repayment_key TEXT NOT NULL, account TEXT NOT NULL,
    amount TEXT NOT NULL, currency TEXT NOT NULL, status TEXT NOT NULL, code TEXT,
    payment_id TEXT, created_at TEXT NOT NULL, apply_at REAL, applied_at TEXT);
CREATE INDEX IF NOT EXISTS payments_due ON payments (apply_at) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS collections (id INTEGER PRIMARY KEY, channel TEXT,
    reference TEXT, repayment_key TEXT, amount TEXT, channel_reference TEXT,
    currency TEXT, at TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS collections_once ON collections (channel, reference);
CREATE TABLE IF NOT EXISTS refund_answers (
    refund_reference TEXT PRIMARY KEY, reference TEXT, amount TEXT NOT NULL,
    status TEXT NOT NULL, code TEXT, refund_id TEXT, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS refunds (id INTEGER PRIMARY KEY, channel TEXT,
    refund_reference TEXT, reference TEXT, repayment_key TEXT, amount TEXT,
    channel_reference TEXT, currency TEXT, at TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS refunds_once ON refunds (channel, refund_reference);
"""
# The unique indexes make "collects at most once per key" a property of the file itself,
# whatever a bug in the server above it might try.


class _Ledger:
    """The simulator's SQLite file.  Every change is one transaction, made without an
    ``await`` in between, so concurrent requests for one key cannot both apply it."""

    def __init__(self, path: str | Path, name: str) -> None:
        self.path, self.name = str(path), name
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def payment(self, reference: str) -> _Payment | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT reference, repayment_key, amount, currency, status, code, payment_id,"
                " apply_at FROM payments WHERE reference = ?", (reference,)).fetchone()
        return None if row is None else _Payment(row[0], row[1], Decimal(row[2]), *row[3:])

    def payment_by_id(self, payment_id: str) -> _Payment | None:
        with self._lock:
            row = self._conn.execute("SELECT reference FROM payments WHERE payment_id = ?",
                                     (payment_id,)).fetchone()
        return None if row is None else self.payment(row[0])

    def add_payment(self, payment: _Payment, account: str, at: datetime) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO payments (reference, repayment_key, account, amount, currency,"
                " status, code, payment_id, created_at, apply_at, applied_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (payment.reference, payment.repayment_key, account, str(payment.amount),
                 payment.currency, payment.status, payment.code, payment.payment_id,
                 at.isoformat(), payment.apply_at,
                 at.isoformat() if payment.status == "succeeded" else None))
            if payment.status == "succeeded":
                self._collect(conn, payment, at)

    def _collect(self, conn: sqlite3.Connection, payment: _Payment, at: datetime) -> None:
        conn.execute(
            "INSERT INTO collections (channel, reference, repayment_key, amount,"
            " channel_reference, currency, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (self.name, payment.reference, payment.repayment_key, str(payment.amount),
             payment.payment_id, payment.currency, at.isoformat()))

    def apply_due(self, at: datetime) -> list[_Payment]:
        """Apply the late applications due by ``at``: each is collected once."""
        with self._lock:
            due = self._conn.execute(
                "SELECT reference FROM payments WHERE status = 'pending' AND apply_at <= ?"
                " ORDER BY apply_at, reference", (at.timestamp(),)).fetchall()
        if not due:  # the common case, every tick: no write transaction at all
            return []
        applied = []
        with self._transaction() as conn:
            for (reference,) in due:
                changed = conn.execute(
                    "UPDATE payments SET status = 'succeeded', applied_at = ?"
                    " WHERE reference = ? AND status = 'pending'",
                    (at.isoformat(), reference)).rowcount
                if not changed:
                    continue
                row = conn.execute(
                    "SELECT reference, repayment_key, amount, currency, status, code,"
                    " payment_id, apply_at FROM payments WHERE reference = ?",
                    (reference,)).fetchone()
                payment = _Payment(row[0], row[1], Decimal(row[2]), *row[3:])
                self._collect(conn, payment, at)
                applied.append(payment)
        return applied

    def next_due(self) -> float | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT min(apply_at) FROM payments WHERE status = 'pending'").fetchone()
        return None if row[0] is None else float(row[0])

    def refund_answer(self, refund_reference: str) -> _RefundAnswer | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT refund_reference, reference, amount, status, code, refund_id"
                " FROM refund_answers WHERE refund_reference = ?",
                (refund_reference,)).fetchone()
        return None if row is None else _RefundAnswer(row[0], row[1], Decimal(row[2]),
                                                      *row[3:])

    def refunded(self, reference: str) -> Decimal:
        with self._lock:
            # Every refund of the payment, whatever name the simulator had when it gave it
            # (the ledger is one gateway's, as its payments are).
            rows = self._conn.execute("SELECT amount FROM refunds WHERE reference = ?",
                                      (reference,)).fetchall()
        return sum((Decimal(r[0]) for r in rows), Decimal(0))

    def add_refund(self, answer: _RefundAnswer, payment: _Payment | None,
                   at: datetime) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO refund_answers (refund_reference, reference, amount, status,"
                " code, refund_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (answer.refund_reference, answer.reference, str(answer.amount),
                 answer.status, answer.code, answer.refund_id, at.isoformat()))
            if answer.status == "succeeded" and payment is not None:
                conn.execute(
                    "INSERT INTO refunds (channel, refund_reference, reference,"
                    " repayment_key, amount, channel_reference, currency, at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (self.name, answer.refund_reference, payment.reference,
                     payment.repayment_key, str(answer.amount), answer.refund_id,
                     payment.currency, at.isoformat()))

    def collections(self) -> list[Collection]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT channel, reference, repayment_key, amount, channel_reference"
                " FROM collections ORDER BY id").fetchall()
        return [Collection(r[0], r[1], r[2], Decimal(r[3]), r[4]) for r in rows]

    def refunds(self) -> list[Refund]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT channel, refund_reference, reference, repayment_key, amount,"
                " channel_reference FROM refunds ORDER BY id").fetchall()
        return [Refund(r[0], r[1], r[2], r[3], Decimal(r[4]), r[5]) for r in rows]

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            collections = self._conn.execute(
                "SELECT reference, repayment_key, amount, currency, channel_reference, at"
                " FROM collections ORDER BY id").fetchall()
            refunds = self._conn.execute(
                "SELECT refund_reference, reference, repayment_key, amount, currency,"
                " channel_reference, at FROM refunds ORDER BY id").fetchall()
            pending = self._conn.execute(
                "SELECT reference, repayment_key, amount, currency, apply_at FROM payments"
                " WHERE status = 'pending' ORDER BY apply_at, reference").fetchall()
        return {
            "name": self.name,
            "collections": [dict(zip(("reference", "repayment_key", "amount", "currency",
                                      "payment_id", "at"), r, strict=True))
                            for r in collections],
            "refunds": [dict(zip(("refund_reference", "reference", "repayment_key",
                                  "amount", "currency", "refund_id", "at"), r, strict=True))
                        for r in refunds],
            "pending": [{"reference": r[0], "repayment_key": r[1], "amount": r[2],
                         "currency": r[3],
                         "apply_at": datetime.fromtimestamp(r[4], UTC).isoformat()}
                        for r in pending],
        }

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# ---- requests and answers --------------------------------------------------------------------

class _Invalid(ValueError):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


async def _received(request: Request) -> bytes | None:
    """The whole body, or ``None`` when the caller left before sending all of it."""
    try:
        return await request.body()
    except ClientDisconnect:
        return None


def _body(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise _Invalid("invalid_request", "the body is not JSON") from exc
    if not isinstance(data, dict):
        raise _Invalid("invalid_request", "the body is not a JSON object")
    return data


def _text(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("invalid_request", f"{name} must be a non-empty string")
    return value


def _amount(data: Mapping[str, Any], currency: str | None) -> Decimal:
    value = data.get("amount")
    # Floats are refused, as failover.Repayment refuses them: 0.1 is not a decimal.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Invalid("invalid_amount", "amount must be a decimal string or an integer")
    try:
        amount = Decimal(value)
    except InvalidOperation as exc:
        raise _Invalid("invalid_amount", f"amount is not a number: {value!r}") from exc
    if not amount.is_finite() or amount <= 0:
        raise _Invalid("invalid_amount", f"amount must be positive: {value!r}")
    if currency is not None and not _fits(amount, currency):
        raise _Invalid("invalid_amount",
                       f"{currency} allows {MINOR_UNITS[currency]} decimal places")
    return amount


def _fits(amount: Decimal, currency: str) -> bool:
    """``amount`` has no more decimal places than ``currency``'s minor units."""
    exponent = amount.as_tuple().exponent
    return isinstance(exponent, int) and -exponent <= MINOR_UNITS.get(currency, 0)


def _mask(account: str) -> str:
    # The ledger keeps no account numbers: the last four characters serve an audit.
    return "*" * max(len(account) - 4, 0) + account[-4:]


def _id(prefix: str, name: str, reference: str) -> str:
    return prefix + hashlib.blake2b(f"{name}/{reference}".encode(), digest_size=10).hexdigest()


def _answer(status: int, body: dict[str, Any], retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


def _rejected(code: str, detail: str | None = None) -> JSONResponse:
    body = {"status": "rejected", "code": code}
    return _answer(422, body | {"detail": detail} if detail else body)


# "code" too: an adapter may trust a 404 only with the gateway's own body (a proxy's 404
# proves nothing), as failover.http.GatewayChannel does.
_NOT_FOUND = {"status": "not_found", "code": "not_found"}


def _payment_body(payment: _Payment) -> dict[str, Any]:
    if payment.status == "succeeded":
        return {"status": "succeeded", "payment_id": payment.payment_id,
                "reference": payment.reference, "amount": str(payment.amount),
                "currency": payment.currency}
    return {"status": payment.status, "code": payment.code, "reference": payment.reference}


def _payment_answer(payment: _Payment) -> JSONResponse:
    """The answer to a POST for a known payment: the first one, or 200 once applied."""
    if payment.status == "pending":
        return _answer(202, {"status": "pending", "reference": payment.reference})
    status = {"succeeded": 200, "declined": 402}.get(payment.status, 422)
    return _answer(status, _payment_body(payment))


def _refund_body(answer: _RefundAnswer, payment: _Payment | None) -> dict[str, Any]:
    if answer.status != "succeeded" or payment is None:
        return {"status": answer.status, "code": answer.code,
                "refund_reference": answer.refund_reference}
    return {"status": "succeeded", "refund_id": answer.refund_id,
            "refund_reference": answer.refund_reference, "payment_id": payment.payment_id,
            "reference": payment.reference, "amount": str(answer.amount),
            "currency": payment.currency}


def _gone() -> Response:
    """The answer to a caller that left before its body arrived: never sent (uvicorn drops
    what is sent after a disconnect), so nginx's "client closed request" is as good as any."""
    return Response(status_code=499)


class _Reset(Response):
    """No answer at all: the connection is reset, after the work was recorded."""

    def __init__(self, cut: Callable[[Scope], bool]) -> None:
        super().__init__()
        self._cut = cut

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._cut(scope):
            raise RuntimeError("a connection reset needs GatewaySim's own server"
                               " (serve() or run())")
        # Returning before the server has seen the connection go would make it answer
        # 500 for a handler that sent nothing.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while (await receive())["type"] != "http.disconnect":
                    pass


class _InProcessServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: in a test runner, Ctrl-C stays the
    runner's (two servers restoring each other's handlers would leave a stale one)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _new_callback_client() -> httpx.AsyncClient:
    # No cap on connections, as when every delivery had its own client: a burst of
    # callbacks must not wait for a pool slot (the 5 s would count against the try).
    return httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_connections=None,
                                                            max_keepalive_connections=20))


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# ---- the server ------------------------------------------------------------------------------

class GatewaySim:
    """A simulated payment gateway: an ASGI app (``app``) with its ledger, served by
    ``serve()`` (in-process, for tests) or ``run()`` (the ``failover gateway-sim``
    command).

    ``ledger`` is the SQLite file (``None``: in memory, gone with the object);
    ``faults`` a ``Faults``, a spec string or a mapping, and may be changed at any time;
    ``secret`` signs callbacks (default ``f"gateway-sim/{seed}/{name}"``); ``clock``
    gives the time for maintenance windows, late applications and the ledger (default
    the system clock; ``failover.testing.FakeClock`` works: a late application is then
    applied once the clock is moved past it, at the next request or tick).
    """

    def __init__(self, name: str = "gateway", ledger: str | Path | None = None,
                 faults: Faults | str | Mapping[str, Any] | None = None, seed: int | str = 0,
                 secret: str | bytes | None = None, callback_url: str | None = None, *,
                 clock: Clock | None = None) -> None:
        if not name.strip():
            raise ValueError("name must not be blank")
        self.name = name
        self.seed = seed
        self._faults = Faults.of(faults)
        self.secret = _key(secret if secret is not None else f"gateway-sim/{seed}/{name}")
        self.callback_url = callback_url
        self.clock = clock or SystemClock()
        self.ledger_path = None if ledger is None else Path(ledger)
        self._ledger = _Ledger(":memory:" if ledger is None else ledger, name)
        self._requests: dict[tuple[str, str], int] = {}
        self._server: uvicorn.Server | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._callbacks: httpx.AsyncClient | None = None
        self._serving = False  # in the lifespan, which closes _callbacks at its end
        self.deliveries: list[Delivery] = []
        """Every callback sent, in the order their delivery ended."""
        self.app = Starlette(routes=[
            Route("/payments", self._pay, methods=["POST"]),
            Route("/payments/{reference:path}", self._payment_status, methods=["GET"]),
            Route("/refunds", self._refund, methods=["POST"]),
            Route("/refunds/{reference:path}", self._refund_status, methods=["GET"]),
            Route("/ledger", self._ledger_view, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
        ], lifespan=self._lifespan)

    # -- audits

    @property
    def faults(self) -> Faults:
        """Read on every request: assign new ``Faults`` (or a spec string, or a mapping)
        at any time."""
        return self._faults

    @faults.setter
    def faults(self, faults: Faults | str | Mapping[str, Any] | None) -> None:
        self._faults = Faults.of(faults)

    def collections(self) -> list[Collection]:
        """Every collection, in order (``failover.testing.Collection``, channel = name)."""
        return self._ledger.collections()

    def refunds(self) -> list[Refund]:
        """Every refund given, in order (``failover.testing.Refund``)."""
        return self._ledger.refunds()

    def close(self) -> None:
        """Close the ledger file (after serving)."""
        self._ledger.close()

    # -- serving

    @contextlib.asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve on the running loop until the block ends; yields the base URL
        (``port=0``: a free port).  Raises ``OSError`` if it cannot listen."""
        server = _InProcessServer(self._config(log_config=None))
        task, url = await self._start(server, host, port)
        try:
            yield url
        finally:
            server.should_exit = True
            try:
                await task
            finally:
                self._server = None

    async def run(self, host: str = "127.0.0.1", port: int = 0,
                  ready: Callable[[str], None] | None = None) -> None:
        """Serve until SIGINT or SIGTERM (uvicorn's handling); ``ready(url)`` is called
        once it listens."""
        server = uvicorn.Server(self._config(log_level="warning"))
        task, url = await self._start(server, host, port)
        try:
            if ready is not None:
                ready(url)
            await task
        finally:
            self._server = None

    def _config(self, **options: Any) -> uvicorn.Config:
        # h11: one pure-Python protocol, whose connections serve() can find to reset.
        return uvicorn.Config(self.app, http="h11", lifespan="on", access_log=False,
                              timeout_graceful_shutdown=2, **options)

    async def _start(self, server: uvicorn.Server, host: str, port: int
                     ) -> tuple[asyncio.Task[None], str]:
        if self._server is not None:
            raise RuntimeError(f"gateway {self.name!r} is already serving")
        # The socket is bound here, so a port in use is an OSError to the caller (uvicorn
        # would exit the process) and port 0's choice is known.
        sock = _bind(host, port)
        self._server = server
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError(f"gateway {self.name!r} stopped while starting")
                await asyncio.sleep(0.01)
        except BaseException:
            self._server = None
            task.cancel()
            sock.close()
            raise
        return task, _url(sock)

    def _cut(self, scope: Scope) -> bool:
        """Reset the connection ``scope`` came on (RST: linger 0, then abort); true too
        when the caller has already closed it.  False when not served by this sim."""
        client = scope.get("client")
        if self._server is None or client is None:
            return False
        for connection in list(self._server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if getattr(connection, "client", None) == tuple(client) and transport is not None:
                raw = transport.get_extra_info("socket")
                if raw is not None:
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
                return True
        # uvicorn forgets a connection once it is lost: the caller left first.
        return True

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        ticker = asyncio.create_task(self._tick())
        self._serving = True
        try:
            yield
        finally:
            self._serving = False
            try:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                if self._deliveries:
                    _, late = await asyncio.wait(set(self._deliveries), timeout=2)
                    for task in late:
                        task.cancel()
                    if late:  # let them stop using the client before it is closed
                        await asyncio.wait(late)
            finally:
                # None again, so serving again (perhaps on another loop) makes a new one.
                client, self._callbacks = self._callbacks, None
                if client is not None:
                    await client.aclose()

    async def _tick(self) -> None:
        """Apply late applications when they fall due (requests also apply them)."""
        while True:
            self._apply_due()
            due = self._ledger.next_due()
            wait = 0.25 if due is None else due - self.clock.now().timestamp()
            await asyncio.sleep(min(max(wait, 0.01), 0.25))

    def _apply_due(self) -> None:
        for payment in self._ledger.apply_due(self.clock.now()):
            self._notify(payment)

    # -- decisions

    def _decide(self, kind: Kind, reference: str) -> Decision:
        n = self._requests.get((kind, reference), 0) + 1
        self._requests[kind, reference] = n
        return decide(self.faults, self.seed, kind, reference, n, self.clock.now())

    async def _refused(self, decision: Decision) -> JSONResponse | None:
        if decision.latency_s > 0:
            await asyncio.sleep(decision.latency_s)
        refusal = decision.refusal
        if refusal is None:
            return None
        return _answer(refusal.status, {"status": "error", "code": refusal.code},
                       refusal.retry_after)

    # -- endpoints

    async def _pay(self, request: Request) -> Response:
        self._apply_due()
        reference = request.headers.get("idempotency-key", "")
        if not reference.strip():
            return _rejected("missing_idempotency_key", "send the Idempotency-Key header")
        decision = self._decide("payment", reference)
        # Read before the latency: a caller whose read timeout fires while it is waited out
        # has sent its whole request, and a real gateway would go on and apply it.
        if (raw := await _received(request)) is None:
            return _gone()
        if (refused := await self._refused(decision)) is not None:
            return refused
        try:
            data = _body(raw)
            repayment_key, account = _text(data, "repayment_key"), _text(data, "account")
            currency = _text(data, "currency")
            if currency not in MINOR_UNITS:
                raise _Invalid("unknown_currency", f"unknown currency {currency!r}")
            amount = _amount(data, currency)
        except _Invalid as exc:
            return _rejected(exc.code, exc.detail)
        # From here to the answer there is no await: the key is looked up and applied at
        # once, so two requests with one key cannot both collect.
        known = self._ledger.payment(reference)
        if known is not None:
            if (known.repayment_key, known.amount, known.currency) != (
                    repayment_key, amount, currency):
                return _rejected("idempotency_key_reused",
                                 "this key was used for another payment")
            return _payment_answer(known)
        now = self.clock.now()
        status, code, apply_at = "succeeded", None, None
        if decision.action == "decline":
            status, code = "declined", "insufficient_funds"
        elif decision.action == "reject":
            status, code = "rejected", "rejected"
        elif decision.action == "late":
            status = "pending"
            apply_at = (now + timedelta(seconds=self.faults.late_apply_s)).timestamp()
        payment = _Payment(reference, repayment_key, amount, currency, status, code,
                           _id("pay_", self.name, reference), apply_at)
        self._ledger.add_payment(payment, _mask(account), now)
        if status in ("succeeded", "declined"):
            self._notify(payment)
        if decision.action == "reset":
            return _Reset(self._cut)
        return _payment_answer(payment)

    async def _payment_status(self, request: Request) -> Response:
        self._apply_due()
        reference = request.path_params["reference"]
        refused = await self._refused(self._decide("payment-status", reference))
        if refused is not None:
            return refused
        payment = self._ledger.payment(reference)
        if payment is None or payment.status == "pending":
            return _answer(404, _NOT_FOUND)
        return _answer(200, _payment_body(payment))

    async def _refund(self, request: Request) -> Response:
        self._apply_due()
        refund_reference = request.headers.get("idempotency-key", "")
        if not refund_reference.strip():
            return _rejected("missing_idempotency_key", "send the Idempotency-Key header")
        decision = self._decide("refund", refund_reference)
        if (raw := await _received(request)) is None:  # as for payments
            return _gone()
        if (refused := await self._refused(decision)) is not None:
            return refused
        try:
            data = _body(raw)
            payment_id, reference = data.get("payment_id"), data.get("reference")
            if not isinstance(payment_id or reference, str):
                raise _Invalid("invalid_request", "give payment_id or reference")
            amount = _amount(data, None)
        except _Invalid as exc:
            return _rejected(exc.code, exc.detail)
        payment = (self._ledger.payment_by_id(payment_id) if isinstance(payment_id, str)
                   else self._ledger.payment(str(reference)))
        known = self._ledger.refund_answer(refund_reference)
        if known is not None:
            if known.amount != amount or (payment is not None
                                          and known.reference != payment.reference):
                return _rejected("idempotency_key_reused",
                                 "this key was used for another refund")
            return self._refund_answer(known)
        # As for payments, no await from the look-up to the record.
        code = None
        if payment is None:
            code = "unknown_payment"
        elif payment.status != "succeeded":
            code = "payment_not_collected"
        elif not _fits(amount, payment.currency):
            code = "invalid_amount"
        elif amount > payment.amount - self._ledger.refunded(payment.reference):
            code = "amount_exceeds_refundable"
        answer = _RefundAnswer(
            refund_reference, None if payment is None else payment.reference, amount,
            "rejected" if code else "succeeded", code,
            None if code else _id("re_", self.name, refund_reference))
        self._ledger.add_refund(answer, payment, self.clock.now())
        if decision.action == "reset" and code is None:
            return _Reset(self._cut)
        return self._refund_answer(answer)

    def _refund_answer(self, answer: _RefundAnswer) -> JSONResponse:
        payment = None if answer.reference is None else self._ledger.payment(answer.reference)
        return _answer(200 if answer.status == "succeeded" else 422,
                       _refund_body(answer, payment))

    async def _refund_status(self, request: Request) -> Response:
        self._apply_due()
        refund_reference = request.path_params["reference"]
        refused = await self._refused(self._decide("refund-status", refund_reference))
        if refused is not None:
            return refused
        answer = self._ledger.refund_answer(refund_reference)
        if answer is None:
            return _answer(404, _NOT_FOUND)
        payment = None if answer.reference is None else self._ledger.payment(answer.reference)
        return _answer(200, _refund_body(answer, payment))

    async def _ledger_view(self, request: Request) -> Response:
        self._apply_due()
        return JSONResponse(self._ledger.to_json())

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "name": self.name})

    # -- callbacks

    def _notify(self, payment: _Payment) -> None:
        if self.callback_url is None:
            return
        body = json.dumps({"reference": payment.reference, "status": payment.status,
                           "payment_id": payment.payment_id if payment.status == "succeeded"
                           else None, "code": payment.code},
                          sort_keys=True, separators=(",", ":")).encode()
        task = asyncio.get_running_loop().create_task(
            self._deliver(self.callback_url, payment.reference, payment.status, body))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, url: str, reference: str, status: str, body: bytes) -> None:
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, body)}
        answered: int | None = None
        attempts = 0
        async with self._callback_client() as client:
            # Three tries, 0.2 s then 0.4 s apart, while the receiver is away or fails.
            while attempts < 3 and (answered is None or answered >= 500):
                if attempts:
                    await asyncio.sleep(0.2 * attempts)
                attempts += 1
                try:
                    answered = (await client.post(url, content=body, headers=headers)
                                ).status_code
                except httpx.HTTPError:
                    answered = None
        self.deliveries.append(Delivery(reference, status, answered, attempts))

    @contextlib.asynccontextmanager
    async def _callback_client(self) -> AsyncIterator[httpx.AsyncClient]:
        """The client for one delivery: while serving, the one shared by every callback
        (a new client loads SSL contexts, tens of milliseconds of CPU taken from the
        service under test), made here on the serving loop and closed by the lifespan."""
        if not self._serving:
            # ``app`` served without its lifespan (another server, an ASGI transport):
            # nothing would close a shared client, so this delivery has its own.
            async with _new_callback_client() as client:
                yield client
            return
        if self._callbacks is None:
            self._callbacks = _new_callback_client()
        yield self._callbacks
