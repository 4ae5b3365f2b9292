"""A repayment service: FastAPI over one failover Router per worker process.

Serve it (several workers need PostgreSQL; an SQLite journal serves one process)::

    FAILOVER_JOURNAL=postgresql://svc@db/payments \\
        uvicorn examples.service:app --workers 4 --loop uvloop

    POST /repayments        {"key", "account", "amount": "1250.00", "currency",
                             "due_at"?, "channels"?}  -> the result
    GET  /repayments/{key}  -> the result, or 404
    GET  /healthz

Settings come from the environment, read when a worker starts:

    FAILOVER_CONFIG   the channel config file (default: failover.toml next to this file)
    FAILOVER_JOURNAL  a postgresql:// URL or an SQLite file (default: service.db)
    FAILOVER_SCHEMA   the PostgreSQL schema (default: failover)
    FAILOVER_MIGRATE  1 (default): each worker applies the schema's migrations on open,
                      under PostgreSQL's advisory lock, so workers starting together take
                      turns; 0: run `failover migrate URL` once per release instead
    FAILOVER_GRACE_S  seconds calls in the air get to answer on shutdown (default 10)

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
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydantic
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import failover
from failover.events import StructlogHook

HERE = Path(__file__).resolve().parent
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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        default = cls()
        return cls(
            config=Path(environ.get("FAILOVER_CONFIG", default.config)),
            journal=environ.get("FAILOVER_JOURNAL", default.journal),
            schema=environ.get("FAILOVER_SCHEMA", default.schema),
            migrate=environ.get("FAILOVER_MIGRATE", "1").lower() not in ("0", "false", "no"),
            grace_s=float(environ.get("FAILOVER_GRACE_S", default.grace_s)),
        )

    def open_journal(self) -> failover.Journal:
        # open_journal ignores schema and migrate for an SQLite file.
        return failover.open_journal(self.journal, migrate=self.migrate, schema=self.schema)


def event_log() -> StructlogHook:
    """Warnings only (pending, failed, breaker opened), through a logger of our own: a
    service's global structlog configuration is its own business."""
    return StructlogHook(structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING)))


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


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service.  Without ``settings`` each worker reads them from the environment
    when it starts (not on import), so one module serves every worker process."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        chosen = settings or Settings.from_env()
        # One router per process: a router, its journal connections and its channels
        # belong to the event loop they were opened on.
        router = failover.Router.from_config(
            chosen.config, journal=chosen.open_journal(), hooks=[event_log()])
        await router.open()  # recovers what a stopped worker left (its leases expire)
        app.state.router = router
        try:
            yield
        finally:
            # uvicorn has stopped taking requests and waited for those in progress
            # (up to --timeout-graceful-shutdown); calls still in the air get grace_s.
            await router.close(grace_s=chosen.grace_s)

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
        logging.getLogger("repayments").warning("journal error: %s", exc)
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

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        router = getattr(request.app.state, "router", None)
        if router is None or not router.is_open:
            return unavailable("not_ready", "the router is not open")
        return JSONResponse({"status": "ok", "channels": list(router.channel_names)},
                            headers=worker_header())

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
