"""A repayment service: FastAPI over one failover Router per worker process.

Serve it (several workers need PostgreSQL; an SQLite journal serves one process)::

    FAILOVER_JOURNAL=postgresql://svc@db/payments \\
        uvicorn examples.service:app --workers 4 --loop uvloop

    POST /repayments        {"key", "account", "amount": "1250.00", "currency",
                             "due_at"?, "channels"?}  -> the result
    GET  /repayments/{key}  -> the result, or 404
    POST /webhooks/{channel}  a provider's signed callback -> {"channel", "status"}
    GET  /healthz
    GET  /metrics           Prometheus text format (failover.metrics)

Each worker's router runs the background loop (on SQLite too): it reconciles repayments
waiting on a channel, finds and refunds late collections, and sends the at-risk
reminders of the config's ``[reminders]``.  ``Reminders`` turns those, and failed
repayments, into SMS texts for the borrower ("auto-debit failed, pay with your bank card
before 18:00"); the SMS gateway here is a stub that logs them (``SmsOutbox``).

``GET /metrics`` serves the worker's ``PrometheusHook`` (what its router did: attempts,
failovers, breakers, endings, refunds) with a ``JournalCollector`` read at each scrape
(what the journal holds: pending repayments, the manual-refund list).  Under several
workers a scrape reaches one of them: scrape each instance on its own (one worker per
container) for the event counters; the journal's figures are the same from any worker.

Settings come from the environment, read when a worker starts:

    FAILOVER_CONFIG   the channel config file (default: failover.toml next to this file)
    FAILOVER_JOURNAL  a postgresql:// URL or an SQLite file (default: service.db)
    FAILOVER_SCHEMA   the PostgreSQL schema (default: failover)
    FAILOVER_MIGRATE  1 (default): each worker applies the schema's migrations on open,
                      under PostgreSQL's advisory lock, so workers starting together take
                      turns; 0: run `failover migrate URL` once per release instead
    FAILOVER_GRACE_S  seconds calls in the air get to answer on shutdown (default 10)
    FAILOVER_LEASE_S  PostgreSQL: seconds a stopped worker's repayments wait before a live
                      one takes them over (default 30; above every channel's timeout_s)
    FAILOVER_RECONCILE_S  seconds between the background loop's reconciles of repayments
                      waiting on a channel (default 60)
    FAILOVER_TIMEZONE the borrowers' time zone, for times in their texts
                      (default Asia/Shanghai)
    FAILOVER_ACCOUNT_KEYS  Fernet keys (comma-separated, the first encrypts): accounts
                      are then stored encrypted (failover[crypto]; see the README)

They share the ``FAILOVER_`` prefix with the config file's overrides
(``FAILOVER_CHANNELS__WALLET__ENABLED=false``), which ignore these names.

The old batch run is kept: ``python examples/service.py examples/failover.toml --journal
service.db`` repays a batch of instalments, reconciles what is left pending and prints
where each stands.  Run it twice: the second run collects nothing again.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pydantic
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import failover
from failover.codec import KEYS_VARIABLE, FernetCodec
from failover.events import Event, RepaymentAtRisk, RepaymentFailed, StructlogHook
from failover.journal import is_dsn
from failover.metrics import JournalCollector, PrometheusHook

HERE = Path(__file__).resolve().parent
_log = logging.getLogger("repayments")
RETRY_AFTER_S = 1
"""What a 503 asks the client to wait before sending the same key again."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Where a worker finds its configuration and journal."""

    config: Path = HERE / "failover.toml"
    journal: str = "service.db"
    schema: str = "failover"
    migrate: bool = True
    grace_s: float = 10.0
    timezone: str = "Asia/Shanghai"
    lease_s: float = 30.0
    reconcile_s: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        default = cls()
        return cls(
            config=Path(environ.get("FAILOVER_CONFIG", default.config)),
            journal=environ.get("FAILOVER_JOURNAL", default.journal),
            schema=environ.get("FAILOVER_SCHEMA", default.schema),
            migrate=environ.get("FAILOVER_MIGRATE", "1").lower() not in ("0", "false", "no"),
            grace_s=float(environ.get("FAILOVER_GRACE_S", default.grace_s)),
            timezone=environ.get("FAILOVER_TIMEZONE", default.timezone),
            lease_s=float(environ.get("FAILOVER_LEASE_S", default.lease_s)),
            reconcile_s=float(environ.get("FAILOVER_RECONCILE_S", default.reconcile_s)),
        )

    def open_journal(self) -> failover.Journal:
        # open_journal ignores schema and migrate for an SQLite file.  Accounts are
        # encrypted at rest when FAILOVER_ACCOUNT_KEYS holds Fernet keys.
        codec = FernetCodec.from_env() if os.environ.get(KEYS_VARIABLE) else None
        if is_dsn(self.journal):
            return failover.open_journal(self.journal, migrate=self.migrate,
                                         schema=self.schema, codec=codec, lease_s=self.lease_s)
        return failover.open_journal(self.journal, codec=codec)


def event_log() -> StructlogHook:
    """Warnings only (pending, failed, breaker opened), through a logger of our own: a
    service's global structlog configuration is its own business."""
    return StructlogHook(structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING)))


# ---- texts to borrowers -----------------------------------------------------------------

LABELS = {"auto_debit": "auto-debit", "bank_card": "bank card", "wallet": "wallet"}
"""How a borrower knows each channel."""
BY_HAND = frozenset({"bank_card", "wallet"})
"""Channels borrowers pay through themselves (the auto-debit is the lender's to run)."""


def label(channel: str) -> str:
    return LABELS.get(channel, channel.replace("_", " "))


def either(words: Sequence[str], last: str) -> str:
    """``"a"``, ``"a or b"``, ``"a, b or c"``."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def due_text(due_at: datetime, zone: ZoneInfo, now: datetime) -> str:
    """``"18:00"`` on the borrower's today, else ``"18:00 on 6 Dec"``, in their zone."""
    local = due_at.astimezone(zone)
    if local.date() == now.astimezone(zone).date():
        return local.strftime("%H:%M")
    return f"{local:%H:%M} on {local.day} {local:%b}"


def reminder_text(*, failed: Sequence[str], alternatives: Sequence[str],
                  due_at: datetime | None, zone: ZoneInfo, now: datetime) -> str:
    """What went wrong and how to pay now: ``"auto-debit failed, pay with your bank card
    before 18:00"``.  ``failed`` are the channels tried; ``alternatives`` the event's
    (channels eligible now), of which the ones a borrower uses by hand are offered."""
    what = f"{either([label(c) for c in failed], 'and')} failed" if failed \
        else "your repayment has not been collected yet"
    ways = [label(c) for c in dict.fromkeys(alternatives) if c in BY_HAND]
    pay = f"pay with your {either(ways, 'or')}" if ways else "please call us to pay"
    when = f" before {due_text(due_at, zone, now)}" if due_at is not None else ""
    return f"{what}, {pay}{when}"


class SmsOutbox:
    """Stands in for an SMS gateway: logs each text and keeps it in ``sent`` as (repayment
    key, text).  A real one looks the borrower's phone number up by the key: events carry
    keys, never accounts or phone numbers."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def __call__(self, key: str, text: str) -> None:
        self.sent.append((key, text))
        _log.info("sms for %s: %s", key, text)


class Reminders:
    """The hook that texts borrowers on ``failover.repayment.at_risk`` (sent by the
    background loop the config's ``[reminders] at_risk_s`` before the due date) and
    ``failover.repayment.failed``.

    A pending repayment at risk is told to wait, not to pay: its money may be on its way
    already, and paying again would collect twice."""

    WAIT = ("we are still confirming your repayment: no need to pay again, we will text"
            " you if it does not go through")

    def __init__(self, send: Callable[[str, str], object],
                 load: Callable[[str], Awaitable[failover.Record | None]], *,
                 zone: ZoneInfo, now: Callable[[], datetime] = lambda: datetime.now(UTC)
                 ) -> None:
        self._send = send
        self._load = load
        self._zone = zone
        self._now = now
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, event: Event) -> None:
        if isinstance(event, RepaymentAtRisk) and event.status == "pending":
            self._send(event.key, self.WAIT)
        elif isinstance(event, RepaymentAtRisk | RepaymentFailed):
            # The events do not say which channels failed (nor, for a failure, the due
            # date): read from the journal on a task, since a hook must not hold the
            # router up.
            task = asyncio.get_running_loop().create_task(self._text(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _text(self, event: RepaymentAtRisk | RepaymentFailed) -> None:
        try:
            record = await self._load(event.key)
            tried = [] if record is None else list(dict.fromkeys(
                a.channel for a in record.attempts if a.round == record.round))
            due = event.due_at if isinstance(event, RepaymentAtRisk) \
                else None if record is None else record.due_at
            self._send(event.key, reminder_text(failed=tried, alternatives=event.alternatives,
                                                due_at=due, zone=self._zone, now=self._now()))
        except Exception:
            _log.exception("no text sent for repayment %s", event.key)

    async def drain(self) -> None:
        """Wait for the texts being prepared (on shutdown, and in tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


# ---- the HTTP surface ------------------------------------------------------------------


class RepaymentIn(pydantic.BaseModel):
    """The request body.  Amounts are strings ("1250.00") or integers: a JSON number
    with a fraction is a float, which has no exact decimal value, and is refused."""

    model_config = pydantic.ConfigDict(extra="forbid")

    key: str
    account: str
    # Checked by failover.Repayment, the one place that knows money (a float is refused).
    amount: Any = pydantic.Field(examples=["1250.00"])
    currency: str
    due_at: datetime | None = None
    channels: list[str] | None = None


def result_body(result: failover.RepaymentResult) -> dict[str, Any]:
    """What a client sees of a result; it never holds the account."""
    return {
        "key": result.key,
        "status": result.status.value,
        "channel": result.channel,
        "channel_reference": result.channel_reference,
        "attempts": len(result.attempts),
        "pending_reason": result.pending_reason and result.pending_reason.value,
        "pending_channel": result.pending_channel,
        "code": result.code,
        "amount": str(result.amount),
        "currency": result.currency,
    }


def result_response(result: failover.RepaymentResult) -> JSONResponse:
    # 202: accepted and journaled, not settled yet; GET the key later for the outcome.
    code = 202 if result.status is failover.RepaymentStatus.PENDING else 200
    return JSONResponse(result_body(result), status_code=code, headers=worker_header())


def worker_header() -> dict[str, str]:
    """Which worker answered, on every answer (the load test counts keys answered by two
    workers and spreads its connections over them)."""
    return {"X-Worker": str(os.getpid())}


def invalid(errors: Sequence[Mapping[str, Any]]) -> JSONResponse:
    """422 naming each field.  Built from the errors' locations and messages only:
    pydantic's ``input`` would echo the account back."""
    fields = [{"field": field_name(error), "message": error["msg"]} for error in errors]
    return JSONResponse({"error": "invalid_request", "field": fields[0]["field"],
                         "message": fields[0]["message"], "errors": fields}, status_code=422,
                        headers=worker_header())


def field_name(error: Mapping[str, Any]) -> str:
    """``amount``, ``channels.0``; ``body`` for a body that is not JSON at all."""
    loc = [str(part) for part in error["loc"]]
    if loc[:1] == ["body"]:
        loc = loc[1:]
    if error.get("type") == "json_invalid" or not loc:
        return "body"
    return ".".join(loc)


def unavailable(error: str, message: str) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S), **worker_header()})


def create_app(settings: Settings | None = None, *,
               sms: Callable[[str, str], object] | None = None) -> FastAPI:
    """The service.  Without ``settings`` each worker reads them from the environment
    when it starts (not on import), so one module serves every worker process.  ``sms``
    sends a text (repayment key, text); by default an ``SmsOutbox`` that logs it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        chosen = settings or Settings.from_env()
        journal = chosen.open_journal()
        app.state.sms = sms or SmsOutbox()
        reminders = Reminders(app.state.sms, journal.load, zone=ZoneInfo(chosen.timezone))
        app.state.reminders = reminders
        metrics = PrometheusHook()  # its own registry: one per router
        app.state.metrics = metrics
        app.state.journal_metrics = JournalCollector(journal, registry=metrics.registry)
        # One router per process: a router, its journal connections and its channels
        # belong to the event loop they were opened on.  The background loop (on by
        # default only for PostgreSQL) reconciles, finds late collections and reminds.
        router = failover.Router.from_config(
            chosen.config, journal=journal, hooks=[event_log(), reminders, metrics],
            background=True, reconcile_every_s=chosen.reconcile_s)
        metrics.add_channels(router.channel_names)
        await router.open()  # recovers what a stopped worker left (its leases expire)
        app.state.router = router
        try:
            yield
        finally:
            # uvicorn has stopped taking requests and waited for those in progress
            # (up to --timeout-graceful-shutdown); calls still in the air get grace_s.
            await router.close(grace_s=chosen.grace_s)
            await reminders.drain()

    app = FastAPI(title="repayments", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid(exc.errors())

    @app.exception_handler(failover.IdempotencyConflict)
    async def conflict(request: Request, exc: failover.IdempotencyConflict) -> JSONResponse:
        # The error's message masks a stored account; say which field differs, not values.
        return JSONResponse(
            {"error": "idempotency_conflict", "key": exc.key, "field": exc.field,
             "message": f"repayment {exc.key!r} exists with a different {exc.field}"},
            status_code=409, headers=worker_header())

    @app.exception_handler(failover.RouterClosedError)
    async def closed(request: Request, exc: failover.RouterClosedError) -> JSONResponse:
        # This worker is shutting down; another (or its successor) finishes the key.
        return unavailable("shutting_down", "send the same key again")

    @app.exception_handler(failover.JournalError)
    async def journal_down(request: Request, exc: failover.JournalError) -> JSONResponse:
        # Nothing was collected without a confirmed journal write: retrying the same key
        # is safe.  The message names the database; it stays in the log.
        _log.warning("journal error: %s", exc)
        return unavailable("journal_unavailable", "send the same key again")

    def router_of(request: Request) -> failover.Router:
        router: failover.Router = request.app.state.router
        return router

    @app.post("/repayments")
    async def repay(body: RepaymentIn, request: Request) -> JSONResponse:
        try:
            repayment = failover.Repayment(
                key=body.key, account=body.account, amount=body.amount,
                currency=body.currency, due_at=body.due_at)
        except pydantic.ValidationError as exc:
            return invalid(exc.errors(include_url=False, include_input=False))
        try:
            result = await router_of(request).repay(repayment, channels=body.channels)
        except failover.ConfigError as exc:  # a preference naming no such channel
            return invalid([{"loc": ("channels",), "msg": str(exc)}])
        return result_response(result)

    # :path, because keys such as "loan-42/instalment-7" hold slashes.
    @app.get("/repayments/{key:path}")
    async def get(key: str, request: Request) -> JSONResponse:
        result = await router_of(request).get(key)
        if result is None:
            return JSONResponse({"error": "not_found", "key": key}, status_code=404,
                                headers=worker_header())
        return result_response(result)

    # A provider's callback (webhook), passed on as received: the channel's adapter checks
    # its signature (parse_callback).  The answers name neither key nor account: the
    # caller is a provider, which knows the reference it sent.
    @app.post("/webhooks/{channel}")
    async def webhook(channel: str, request: Request) -> JSONResponse:
        body = await request.body()
        try:
            result = await router_of(request).callback(channel, request.headers, body)
        except failover.CallbackRejected as exc:
            # Forged, or unreadable: nothing changed.  The adapter's reason may quote the
            # body, so it stays in the log.
            _log.warning("webhook for %s rejected: %s", exc.channel, exc.reason)
            return JSONResponse({"error": "callback_rejected", "channel": channel},
                                status_code=400, headers=worker_header())
        except failover.UnknownReference:
            return JSONResponse({"error": "unknown_reference", "channel": channel},
                                status_code=404, headers=worker_header())
        except failover.ConfigError:  # no such channel
            return JSONResponse({"error": "unknown_channel"}, status_code=404,
                                headers=worker_header())
        return JSONResponse({"channel": channel, "status": result.status.value},
                            headers=worker_header())

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        router = getattr(request.app.state, "router", None)
        if router is None or not router.is_open:
            return unavailable("not_ready", "the router is not open")
        return JSONResponse({"status": "ok", "channels": list(router.channel_names)},
                            headers=worker_header())

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        # The journal is read here, awaited, and the scrape itself only reads what was
        # read: generate_latest is synchronous and must not wait on a database.
        try:
            await request.app.state.journal_metrics.refresh()
        except failover.JournalError as exc:
            # Serve the event counters anyway; the journal's figures stay as last read
            # (failover_journal_snapshot_timestamp_seconds says when).
            _log.warning("metrics: journal not read: %s", exc)
        return Response(generate_latest(request.app.state.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST, headers=worker_header())

    return app


app = create_app()


# ---- the batch run -----------------------------------------------------------------------


async def batch(settings: Settings, count: int) -> None:
    router = failover.Router.from_config(
        settings.config, journal=settings.open_journal(), hooks=[event_log()])
    async with router:
        repayments = [
            failover.Repayment(key=f"loan-{100 + i}/instalment-3", account=f"62220200{i:08d}",
                               amount=Decimal(500 + 250 * i).quantize(Decimal("0.01")),
                               currency="CNY")
            for i in range(count)
        ]
        results = await asyncio.gather(*(router.repay(r) for r in repayments))
        if any(r.status is failover.RepaymentStatus.PENDING for r in results):
            await router.reconcile()
        for repayment in repayments:
            result = await router.get(repayment.key)
            assert result is not None
            print(f"{result.key:<24} {result.status.value:<10} {result.channel or '-':<11}"
                  f" attempts {len(result.attempts)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Repay a batch of instalments through a router built from CONFIG.")
    parser.add_argument("config", type=Path)
    parser.add_argument("--journal", default="service.db",
                        help="an SQLite file or a postgresql:// URL (default: service.db)")
    parser.add_argument("--schema", default="failover", help="the PostgreSQL schema")
    parser.add_argument("--repayments", type=int, default=8)
    args = parser.parse_args()
    settings = Settings(config=args.config, journal=args.journal, schema=args.schema)
    asyncio.run(batch(settings, args.repayments))


if __name__ == "__main__":
    main()
