"""examples/service.py: the FastAPI service, in process and under uvicorn's workers."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

import failover
from failover.events import RepaymentAtRisk
from failover.testing import SimulatedChannel

EXAMPLES = Path(__file__).parent.parent / "examples"
ACCOUNT = "6222021234567890"

# The example's channels without its maintenance windows (a run at the wrong hour would
# fail over to the declining wallet), with faults that exercise failover and the query
# after an unknown outcome, and a short settle_s so that query proves nothing in 0.3 s.
CONFIG = """
[channels.auto_debit]
priority = 1
adapter = "failover.testing:SimulatedChannel"
timeout_s = 2.0
settle_s = 0.3

[channels.auto_debit.options]
idempotent = false
seed = 1
profile = { unavailable = 0.05, unknown_not_collected = 0.05 }

[channels.auto_debit.retry]
initial_backoff_s = 0.01

[channels.bank_card]
priority = 2
adapter = "failover.testing:SimulatedChannel"
options = { idempotent = true, seed = 2 }
timeout_s = 2.0

[channels.wallet]
priority = 3
adapter = "failover.testing:SimulatedChannel"
options = { idempotent = false, seed = 3 }
timeout_s = 2.0
"""


def load(name: str) -> ModuleType:
    """An example file as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic and dataclasses look their module up
    spec.loader.exec_module(module)
    return module


service = load("service")
loadtest = load("loadtest")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "failover.toml"
    path.write_text(CONFIG)
    return path


# ---- in process, on an SQLite journal ---------------------------------------------------


@pytest.fixture
async def app(config: Path, tmp_path: Path) -> AsyncIterator[Any]:
    settings = service.Settings(config=config, journal=str(tmp_path / "journal.db"), grace_s=0)
    app = service.create_app(settings)
    async with app.router.lifespan_context(app):  # ASGITransport does not run the lifespan
        yield app


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
        yield client


def body(**changes: Any) -> dict[str, Any]:
    fields = {"key": "loan-42/instalment-7", "account": ACCOUNT, "amount": "1250.00",
              "currency": "CNY"}
    fields.update(changes)
    return {name: value for name, value in fields.items() if value is not None}


async def test_repay_answers_the_result_and_get_agrees(client: httpx.AsyncClient):
    """POST /repayments answers the result; GET of the key (slash and all) answers the same."""
    posted = await client.post("/repayments", json=body())
    read = await client.get("/repayments/loan-42/instalment-7")

    assert 200 == posted.status_code, posted.text
    assert "succeeded" == posted.json()["status"]
    assert 1 == posted.json()["attempts"]
    assert (200, posted.json()) == (read.status_code, read.json())
    assert ACCOUNT not in posted.text


async def test_same_key_other_amount_is_409(client: httpx.AsyncClient):
    """A key reused for other money is refused with 409 naming the field."""
    await client.post("/repayments", json=body())

    answer = await client.post("/repayments", json=body(amount="1300.00"))

    assert 409 == answer.status_code
    assert ("idempotency_conflict", "amount") == (answer.json()["error"], answer.json()["field"])


async def test_conflict_on_account_names_it_without_either_value(client: httpx.AsyncClient):
    """A 409 on the account says which field differs and echoes neither account."""
    await client.post("/repayments", json=body())

    answer = await client.post("/repayments", json=body(account="6222029999999999"))

    assert (409, "account") == (answer.status_code, answer.json()["field"])
    assert ACCOUNT not in answer.text
    assert "6222029999999999" not in answer.text


@pytest.mark.parametrize(("changes", "field"), [
    ({"amount": 12.5}, "amount"),              # a JSON float: no exact decimal value
    ({"amount": "12.345"}, "amount"),          # more places than CNY has
    ({"amount": "-1"}, "amount"),
    ({"currency": "XYZ"}, "currency"),
    ({"key": " "}, "key"),
    ({"account": None}, "account"),            # missing
    ({"due_at": "2026-12-06T10:00"}, "due_at"),  # no time zone
    ({"channels": ["fax"]}, "channels"),
    ({"colour": "red"}, "colour"),
])
async def test_invalid_field_is_422_naming_it(client: httpx.AsyncClient,
                                              changes: dict[str, Any], field: str):
    """A request the service cannot take is a 422 naming the field, with nothing collected."""
    answer = await client.post("/repayments", json=body(**changes))

    assert 422 == answer.status_code, answer.text
    assert field == answer.json()["field"]
    assert 404 == (await client.get("/repayments/loan-42/instalment-7")).status_code


async def test_422_does_not_echo_the_account(client: httpx.AsyncClient):
    """A refused account is named as the field, never shown."""
    account = "6222\n021234567890"

    answer = await client.post("/repayments", json=body(account=account))

    assert (422, "account") == (answer.status_code, answer.json()["field"])
    assert "021234567890" not in answer.text


async def test_get_of_an_unknown_key_is_404(client: httpx.AsyncClient):
    """GET of a key the journal does not hold is a 404."""
    answer = await client.get("/repayments/loan-1/instalment-1")

    assert (404, "not_found") == (answer.status_code, answer.json()["error"])


async def test_closed_router_is_503_with_retry_after(client: httpx.AsyncClient, app: Any):
    """A worker whose router has closed answers 503 and asks for the same key later."""
    await app.state.router.close(grace_s=0)

    answer = await client.post("/repayments", json=body())

    assert 503 == answer.status_code
    assert "1" == answer.headers["retry-after"]
    assert 503 == (await client.get("/healthz")).status_code


async def test_journal_error_is_503(client: httpx.AsyncClient, app: Any,
                                    monkeypatch: pytest.MonkeyPatch):
    """A journal that cannot be reached is a 503 with Retry-After, its message kept in."""
    async def down(key: str) -> None:
        raise failover.JournalError("cannot connect to journal postgresql://svc@db/x")

    monkeypatch.setattr(app.state.router, "get", down)

    answer = await client.get("/repayments/loan-42/instalment-7")

    assert (503, "journal_unavailable") == (answer.status_code, answer.json()["error"])
    assert "retry-after" in answer.headers
    assert "svc@db" not in answer.text


def parsed(text: str) -> dict[str, dict[tuple[str, ...], float]]:
    """Prometheus text parsed back: sample name -> {label values, by label name: value}."""
    samples: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(value for _, value in sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


async def test_metrics_serves_the_prometheus_text_format(client: httpx.AsyncClient):
    """GET /metrics answers the text format: the repayment made counted, every breaker
    closed, the journal read at the scrape; neither key nor account in it."""
    await client.post("/repayments", json=body())

    answer = await client.get("/metrics")

    assert (200, CONTENT_TYPE_LATEST) == (answer.status_code, answer.headers["content-type"])
    metrics = parsed(answer.text)
    assert {("auto_debit", "succeeded"): 1} == metrics["failover_attempts_total"]
    assert {("succeeded",): 1} == metrics["failover_repayments_total"]
    assert {("auto_debit",): 0, ("bank_card",): 0, ("wallet",): 0} \
        == metrics["failover_breaker_state"]
    assert {("failed",): 0, ("pending",): 0, ("succeeded",): 1} \
        == metrics["failover_journal_repayments"]
    assert {("awaiting_channel",): 0, ("in_flight",): 0} \
        == metrics["failover_repayments_pending"]
    assert {(): 0} == metrics["failover_manual_refunds"]
    assert metrics["failover_journal_batches_total"][()] > 0  # an SQLite journal's
    assert "loan-42" not in answer.text
    assert ACCOUNT not in answer.text


async def test_metrics_answers_when_the_journal_cannot_be_read(
        client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch):
    """A journal that cannot be read at the scrape still gets a 200 with the event
    counters; the journal's figures are the ones read last."""
    await client.post("/repayments", json=body())
    await client.get("/metrics")

    async def down() -> None:
        raise failover.JournalError("cannot connect to journal postgresql://svc@db/x")

    monkeypatch.setattr(app.state.journal_metrics, "refresh", down)
    await client.post("/repayments", json=body(key="loan-42/instalment-8"))

    answer = await client.get("/metrics")

    assert 200 == answer.status_code
    metrics = parsed(answer.text)
    assert {("succeeded",): 2} == metrics["failover_repayments_total"]
    assert 1 == metrics["failover_journal_repayments"][("succeeded",)]


# ---- provider webhooks ----------------------------------------------------------------

SECRET = "whsec-test"

# auto_debit collects and loses the answer, and its status queries fail: the repayment
# waits PENDING until the provider's callback (signed with SECRET) tells what happened.
IN_DOUBT = f"""
[channels.auto_debit]
priority = 1
adapter = "failover.testing:SimulatedChannel"
timeout_s = 2.0

[channels.auto_debit.options]
idempotent = false
seed = 1
callback_secret = "{SECRET}"
profile = {{ unknown_collected = 1.0, query_failure = 1.0 }}

[channels.bank_card]
priority = 2
adapter = "failover.testing:SimulatedChannel"
options = {{ idempotent = true, seed = 2 }}
timeout_s = 2.0
"""


@asynccontextmanager
async def serving(tmp_path: Path, config: str, **kwargs: Any
                  ) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app on ``config`` and a client of it, lifespan run."""
    path = tmp_path / "service.toml"
    path.write_text(config)
    settings = service.Settings(config=path, journal=str(tmp_path / "journal.db"), grace_s=0)
    app = service.create_app(settings, **kwargs)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            yield app, client


@pytest.fixture
async def in_doubt(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client, and the reference of a repayment PENDING on auto_debit."""
    async with serving(tmp_path, IN_DOUBT) as (_, client):
        posted = await client.post("/repayments", json=body())
        assert (202, "auto_debit") == (posted.status_code, posted.json()["pending_channel"])
        yield client, failover.make_reference("loan-42/instalment-7", 1, "auto_debit")


def provider(secret: str = SECRET) -> SimulatedChannel:
    """The provider's side of the webhook: it signs with the shared secret."""
    return SimulatedChannel("auto_debit", callback_secret=secret)


async def test_a_signed_webhook_settles_a_pending_repayment(in_doubt):
    """The provider's signed callback says SUCCEEDED: 200 with the status, and the
    repayment is settled on auto_debit at once, with nothing tried on the card."""
    client, reference = in_doubt
    headers, payload = provider().signed_callback(
        reference, failover.ChannelResult.succeeded("ad-778"))

    answer = await client.post("/webhooks/auto_debit", content=payload, headers=headers)
    read = await client.get("/repayments/loan-42/instalment-7")

    assert (200, {"channel": "auto_debit", "status": "succeeded"}) == (
        answer.status_code, answer.json())
    assert (200, "succeeded", "auto_debit", "ad-778", 1) == (
        read.status_code, read.json()["status"], read.json()["channel"],
        read.json()["channel_reference"], read.json()["attempts"])


@pytest.mark.parametrize("forge", ["body", "secret"])
async def test_a_forged_webhook_is_400_and_changes_nothing(in_doubt, forge):
    """A callback whose body was changed after signing, or signed with another secret, is
    refused (400) and the repayment stays as it was; no account in the answer."""
    client, reference = in_doubt
    headers, payload = provider("not-the-secret" if forge == "secret" else SECRET) \
        .signed_callback(reference, failover.ChannelResult.declined("insufficient_funds"))
    if forge == "body":
        payload = payload.replace(b"declined", b"succeeded")

    answer = await client.post("/webhooks/auto_debit", content=payload, headers=headers)
    read = await client.get("/repayments/loan-42/instalment-7")

    assert (400, {"error": "callback_rejected", "channel": "auto_debit"}) == (
        answer.status_code, answer.json())
    assert (202, "pending", 1) == (read.status_code, read.json()["status"],
                                   read.json()["attempts"])
    assert ACCOUNT not in answer.text


async def test_a_webhook_for_an_unknown_reference_or_channel_is_404(in_doubt):
    """A signed callback naming a reference no repayment sent, or a channel the service
    does not have, is a 404 that echoes neither."""
    client, _ = in_doubt
    headers, payload = provider().signed_callback(
        "fo-nothing-sent", failover.ChannelResult.succeeded("ad-1"))

    unknown = await client.post("/webhooks/auto_debit", content=payload, headers=headers)
    nowhere = await client.post("/webhooks/fax", content=payload, headers=headers)

    assert (404, {"error": "unknown_reference", "channel": "auto_debit"}) == (
        unknown.status_code, unknown.json())
    assert (404, {"error": "unknown_channel"}) == (nowhere.status_code, nowhere.json())
    assert "fo-nothing-sent" not in unknown.text + nowhere.text


# ---- texts to borrowers -------------------------------------------------------------------

SHANGHAI = ZoneInfo("Asia/Shanghai")
TODAY = datetime(2026, 12, 6, 1, 0, tzinfo=UTC)  # 09:00 in Shanghai


def test_reminder_text_names_what_failed_and_how_to_pay():
    """What failed, then the alternatives a borrower pays through by hand (the auto-debit
    is not one), then the due time in the borrower's zone (with the date if not today)."""
    due = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)  # 18:00 in Shanghai

    def text(failed: list[str], alternatives: list[str], due_at: datetime | None) -> str:
        return service.reminder_text(failed=failed, alternatives=alternatives, due_at=due_at,
                                     zone=SHANGHAI, now=TODAY)

    assert "auto-debit failed, pay with your bank card before 18:00" == text(
        ["auto_debit"], ["auto_debit", "bank_card"], due)
    assert "auto-debit and bank card failed, pay with your bank card or wallet before 18:00" \
        " on 7 Dec" == text(["auto_debit", "bank_card"], ["bank_card", "wallet"],
                             due + timedelta(days=1))
    assert "auto-debit failed, please call us to pay" == text(["auto_debit"], ["auto_debit"],
                                                              None)


async def test_the_hook_texts_an_at_risk_repayment_with_its_alternatives():
    """An at-risk event becomes one text: the channels tried (read from the journal),
    the event's alternatives and its due date; a pending one is told to wait instead."""
    sent = service.SmsOutbox()
    tried = SimpleNamespace(round=1, due_at=None, attempts=(
        SimpleNamespace(channel="auto_debit", round=1),))

    async def load(key: str) -> Any:
        return tried

    hook = service.Reminders(sent, load, zone=SHANGHAI, now=lambda: TODAY)
    due = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)

    hook(RepaymentAtRisk("loan-42/instalment-7", due, 7200, "failed",
                         ("auto_debit", "bank_card")))
    hook(RepaymentAtRisk("loan-43/instalment-1", due, 7200, "pending", ("bank_card",)))
    await hook.drain()

    assert [("loan-42/instalment-7", "auto-debit failed, pay with your bank card before 18:00"),
            ("loan-43/instalment-1", service.Reminders.WAIT)] == sorted(sent.sent)


# Both automatic channels decline; the wallet takes the rest.  Reminders two hours before
# a due date.
DECLINING = """
[reminders]
at_risk_s = [7200]

[channels.auto_debit]
priority = 1
adapter = "failover.testing:SimulatedChannel"
options = { idempotent = false, seed = 1, profile = { decline = 1.0 } }

[channels.bank_card]
priority = 2
adapter = "failover.testing:SimulatedChannel"
options = { idempotent = true, seed = 2, profile = { decline = 1.0 } }

[channels.wallet]
priority = 3
adapter = "failover.testing:SimulatedChannel"
options = { idempotent = false, seed = 3 }
"""


def local_time(due: datetime) -> str:
    return due.astimezone(SHANGHAI).strftime("%H:%M")


async def test_a_failed_repayment_is_texted_with_its_alternatives(tmp_path):
    """A repayment the borrower restricted to auto-debit and card fails on both: the
    borrower is texted what failed, the card to pay with by hand, and the due time."""
    sent = service.SmsOutbox()
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    async with serving(tmp_path, DECLINING, sms=sent) as (app, client):
        posted = await client.post("/repayments", json=body(
            due_at=due.isoformat(), channels=["auto_debit", "bank_card"]))
        await app.state.reminders.drain()

    assert (200, "failed") == (posted.status_code, posted.json()["status"])
    [(key, text)] = sent.sent
    assert "loan-42/instalment-7" == key
    assert text.startswith("auto-debit and bank card failed, pay with your bank card before"
                           f" {local_time(due)} on ")
    assert ACCOUNT not in text


async def test_the_service_sends_at_risk_reminders_from_its_background_loop(tmp_path):
    """On SQLite too, the service's router runs the background loop: a failed repayment
    due within the reminder threshold is texted as soon as the service opens."""
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    path = tmp_path / "service.toml"
    path.write_text(DECLINING)
    async with failover.Router.from_config(
            path, journal=failover.SQLiteJournal(tmp_path / "journal.db")) as router:
        failed = await router.repay(failover.Repayment(
            key="loan-42/instalment-7", account=ACCOUNT, amount="1250.00", currency="CNY",
            due_at=due), channels=["auto_debit", "bank_card"])
    assert failover.RepaymentStatus.FAILED == failed.status
    sent = service.SmsOutbox()

    async with serving(tmp_path, DECLINING, sms=sent) as (app, _):
        for _ in range(100):  # the loop's first sweep runs as the router opens
            await app.state.reminders.drain()
            if sent.sent:
                break
            await asyncio.sleep(0.05)

    [(key, text)] = sent.sent
    assert "loan-42/instalment-7" == key
    # (with " on <date>" after it, when run in the hour before midnight in Shanghai)
    assert text.startswith("auto-debit and bank card failed, pay with your bank card before"
                           f" {local_time(due)}")


# ---- under uvicorn --workers 2, on PostgreSQL ---------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def two_workers(postgres_dsn: str, pg_schema: str, config: Path, tmp_path: Path
                ) -> Iterator[Server]:
    """``uvicorn service:app --workers 2`` on a new PostgreSQL schema, once both workers
    answer /healthz; stopped with SIGTERM (as a deploy stops it) at the end."""
    port, log = free_port(), tmp_path / "uvicorn.log"
    env = {**os.environ, "FAILOVER_CONFIG": str(config), "FAILOVER_JOURNAL": postgres_dsn,
           "FAILOVER_SCHEMA": pg_schema, "FAILOVER_GRACE_S": "1"}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service:app", "--app-dir", str(EXAMPLES),
             "--workers", "2", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=output, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 20
        while len(seen) < 2:
            assert process.poll() is None, f"the service stopped:\n{server.output()}"
            assert time.monotonic() < deadline, f"not 2 workers in 20 s:\n{server.output()}"
            try:
                # A new connection each time: a kept-alive one stays with one worker.
                answer = httpx.get(f"{server.url}/healthz", headers={"Connection": "close"})
                if answer.status_code == 200:
                    seen.add(answer.headers["x-worker"])
            except httpx.TransportError:
                time.sleep(0.05)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_two_workers_on_postgres_collect_each_key_once(
        two_workers: Server, postgres_dsn: str, pg_schema: str):
    """Under a bounded load with client retries (a fifth of the keys sent twice at once),
    two workers answer every request, both copies of a key alike, and the journal holds
    each key collected exactly once."""
    report = await loadtest.run(two_workers.url, repayments=170, concurrency=16,
                                repeat_share=0.2, seed=7, timeout_s=20, workers=2)

    assert [8, 8] == sorted(report.connections.values())
    assert report.crossed(), "no key's two copies reached two workers"
    assert 204 == len(report.answers)
    assert [] == [a for a in report.answers if a.http_status != 200]
    assert [] == report.problems()  # repeated keys alike, GET agrees
    answered = {a.key: a.body["channel_reference"] for a in report.answers}

    journal = failover.open_journal(postgres_dsn, read_only=True, schema=pg_schema)
    await journal.open()
    try:
        records = [await journal.load(key) for key in answered]
    finally:
        await journal.close()
    collected = {}
    for record in records:
        assert record is not None
        assert failover.RepaymentStatus.SUCCEEDED == record.status
        collected[record.key] = [a.channel_reference for a in record.attempts
                                 if failover.Outcome.SUCCEEDED in (a.outcome, a.resolution)]
    assert {key: [reference] for key, reference in answered.items()} == collected
