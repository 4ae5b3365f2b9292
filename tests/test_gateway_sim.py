"""The gateway simulator over real sockets: idempotency, faults, callbacks, its ledger."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import failover
from failover.cli import build_parser, main
from failover.config import ChannelConfig, RetryConfig, RouterConfig
from failover.gateway_sim import (
    Faults,
    GatewaySim,
    Window,
    decide,
    parse_callback,
    sign,
    verify_signature,
)
from failover.testing import FakeClock, SQLiteLedger, audit

ORDER = {"repayment_key": "loan-42/instalment-7", "account": "acct-00001234",
         "amount": "1250.00", "currency": "CNY"}


@contextlib.asynccontextmanager
async def client_of(sim: GatewaySim) -> AsyncIterator[httpx.AsyncClient]:
    async with sim.serve() as url, httpx.AsyncClient(base_url=url) as client:
        yield client


async def pay(client: httpx.AsyncClient, reference: str, **order: Any) -> httpx.Response:
    return await client.post("/payments", json=ORDER | order,
                             headers={"Idempotency-Key": reference})


async def refund(client: httpx.AsyncClient, refund_reference: str, **body: Any
                 ) -> httpx.Response:
    return await client.post("/refunds", json=body,
                             headers={"Idempotency-Key": refund_reference})


class Receiver:
    """A callback endpoint on a plain asyncio server: every request's headers and body."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in head[1:] if line)
        length = next(int(v) for k, v in headers.items() if k.lower() == "content-length")
        await self.received.put((headers, await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        async with server:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/webhook"

    async def next(self) -> tuple[dict[str, str], bytes]:
        async with asyncio.timeout(5):
            return await self.received.get()


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - the sim's ledger has no event to wait on
            await asyncio.sleep(0.01)


def troubles(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every log record at WARNING or above, or carrying a traceback."""
    return [f"{r.name} {r.levelname}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.WARNING or r.exc_info]


# The caller gives up (read timeout) well before the simulator answers.
SLOW = "latency_ms=300,jitter=0"
IMPATIENT = httpx.Timeout(5, read=0.05)


async def test_a_repeated_key_collects_once(ledger):
    """A repeat with the same Idempotency-Key gets the first answer and collects nothing."""
    sim = GatewaySim("card", ledger)
    async with client_of(sim) as client:
        first, again = await pay(client, "ref-1"), await pay(client, "ref-1")
        audit = (await client.get("/ledger")).json()

    assert 200 == first.status_code
    assert first.json() == again.json()
    assert "succeeded" == first.json()["status"]
    assert [("ref-1", "1250.00", first.json()["payment_id"])] == [
        (c["reference"], c["amount"], c["payment_id"]) for c in audit["collections"]]
    sim.close()


async def test_concurrent_repeats_collect_once(ledger):
    """Twenty requests with one key at once, with latency, still collect once."""
    sim = GatewaySim("card", ledger, "latency_ms=20")
    async with client_of(sim) as client:
        answers = await asyncio.gather(*(pay(client, "ref-1") for _ in range(20)))

    assert {200} == {a.status_code for a in answers}
    assert 1 == len({a.json()["payment_id"] for a in answers})
    assert 1 == len(sim.collections())
    sim.close()


async def test_a_key_reused_for_another_payment_is_rejected(ledger):
    """A known key sent with another amount is refused (422) and collects nothing more."""
    sim = GatewaySim("card", ledger)
    async with client_of(sim) as client:
        await pay(client, "ref-1")
        reused = await pay(client, "ref-1", amount="1.00")

    assert (422, "idempotency_key_reused") == (reused.status_code, reused.json()["code"])
    assert 1 == len(sim.collections())
    sim.close()


async def test_declines_are_answered_402_and_collect_nothing(ledger):
    """The decline fault answers 402 insufficient_funds; a status query says declined."""
    sim = GatewaySim("card", ledger, "decline=1")
    async with client_of(sim) as client:
        declined = await pay(client, "ref-1")
        status = await client.get("/payments/ref-1")

    assert (402, "insufficient_funds") == (declined.status_code, declined.json()["code"])
    assert (200, "declined") == (status.status_code, status.json()["status"])
    assert [] == sim.collections()
    sim.close()


async def test_late_application_is_not_found_until_applied(ledger):
    """A late application answers 202, is 404 to status queries for late_apply_s, then is
    collected once, tells the callback URL, and a repeat gets the 200."""
    clock = FakeClock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))
    receiver = Receiver()
    async with receiver.serve() as hook:
        sim = GatewaySim("card", ledger, "late_apply=1,late_apply_s=30", callback_url=hook,
                         clock=clock)
        async with client_of(sim) as client:
            accepted = await pay(client, "ref-1")
            before = await client.get("/payments/ref-1")
            pending = (await client.get("/ledger")).json()
            clock.advance(31)
            after = await client.get("/payments/ref-1")
            again = await pay(client, "ref-1")
            headers, body = await receiver.next()

    assert (202, "pending") == (accepted.status_code, accepted.json()["status"])
    assert (404, "not_found") == (before.status_code, before.json()["status"])
    assert ([], ["ref-1"]) == (pending["collections"],
                               [p["reference"] for p in pending["pending"]])
    assert (200, "succeeded") == (after.status_code, after.json()["status"])
    assert after.json() == again.json()
    assert ["ref-1"] == [c.reference for c in sim.collections()]
    callback = parse_callback(sim.secret, headers, body)
    assert failover.Callback("ref-1", failover.ChannelResult.succeeded(
        after.json()["payment_id"])) == callback
    sim.close()


async def test_refunds_are_idempotent(ledger):
    """A refund key gives money back once; its status is found; too much is refused."""
    sim = GatewaySim("card", ledger)
    async with client_of(sim) as client:
        payment_id = (await pay(client, "ref-1")).json()["payment_id"]
        first = await refund(client, "ref-1-refund", payment_id=payment_id, amount="1000.00")
        again = await refund(client, "ref-1-refund", payment_id=payment_id, amount="1000.00")
        status = await client.get("/refunds/ref-1-refund")
        unknown = await client.get("/refunds/no-such-refund")
        too_much = await refund(client, "ref-1-refund-2", reference="ref-1", amount="300.00")
        rest = await refund(client, "ref-1-refund-3", reference="ref-1", amount="250.00")

    assert 200 == first.status_code
    assert first.json() == again.json() == status.json()
    assert 404 == unknown.status_code
    assert (422, "amount_exceeds_refundable") == (too_much.status_code,
                                                  too_much.json()["code"])
    assert 200 == rest.status_code
    assert [("ref-1-refund", "1000.00"), ("ref-1-refund-3", "250.00")] == [
        (r.refund_reference, str(r.amount)) for r in sim.refunds()]
    sim.close()


async def test_reset_after_apply_gives_a_transport_error_but_collects(ledger):
    """The reset fault records the payment, then drops the connection: the client gets a
    transport error and no response, the ledger shows the collection, a retry the answer."""
    sim = GatewaySim("card", ledger, "reset_after_apply=1")
    async with client_of(sim) as client:
        with pytest.raises(httpx.TransportError):
            await pay(client, "ref-1")
        status = await client.get("/payments/ref-1")
        audit = (await client.get("/ledger")).json()
        sim.faults = Faults()
        retried = await pay(client, "ref-1")

    assert ["ref-1"] == [c["reference"] for c in audit["collections"]]
    assert (200, "succeeded") == (status.status_code, status.json()["status"])
    assert (200, status.json()) == (retried.status_code, retried.json())
    assert 1 == len(sim.collections())
    sim.close()


async def test_a_refund_reset_after_apply_is_given_once(ledger):
    """A refund whose connection is reset was given: its retry gets the answer."""
    sim = GatewaySim("card", ledger)
    async with client_of(sim) as client:
        await pay(client, "ref-1")
        sim.faults = Faults(reset_after_apply=1)
        with pytest.raises(httpx.TransportError):
            await refund(client, "rf-1", reference="ref-1", amount="1250.00")
        sim.faults = Faults()
        retried = await refund(client, "rf-1", reference="ref-1", amount="1250.00")

    assert (200, "succeeded") == (retried.status_code, retried.json()["status"])
    assert ["rf-1"] == [r.refund_reference for r in sim.refunds()]
    sim.close()


@pytest.mark.parametrize("faults", [SLOW, SLOW + ",reset_after_apply=1"])
async def test_a_payment_whose_caller_left_is_collected_once_without_a_traceback(
        ledger, caplog, faults):
    """A caller whose read timeout fires during the latency has sent its whole request:
    the payment is collected (the gateway had it), once, and nothing is logged as an
    error; its retry gets the answer."""
    caplog.set_level(logging.INFO)
    sim = GatewaySim("card", ledger, faults)
    async with sim.serve() as url:
        async with httpx.AsyncClient(base_url=url, timeout=IMPATIENT) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await pay(impatient, "ref-1")
        await until(lambda: len(sim.collections()) == 1)
        sim.faults = Faults()
        async with httpx.AsyncClient(base_url=url) as client:
            retried = await pay(client, "ref-1")

    assert (200, "succeeded") == (retried.status_code, retried.json()["status"])
    assert [("ref-1", retried.json()["payment_id"])] == [
        (c.reference, c.channel_reference) for c in sim.collections()]
    assert [] == troubles(caplog)
    sim.close()


async def test_a_refund_whose_caller_left_is_given_once_without_a_traceback(ledger, caplog):
    """As for payments: a refund whose whole request arrived is given once, though its
    caller left during the latency, and nothing is logged as an error."""
    caplog.set_level(logging.INFO)
    sim = GatewaySim("card", ledger)
    async with client_of(sim) as client:
        await pay(client, "ref-1")
        sim.faults = Faults.parse(SLOW)
        async with httpx.AsyncClient(base_url=client.base_url, timeout=IMPATIENT) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await refund(impatient, "rf-1", reference="ref-1", amount="1250.00")
        await until(lambda: len(sim.refunds()) == 1)
        sim.faults = Faults()
        retried = await refund(client, "rf-1", reference="ref-1", amount="1250.00")

    assert (200, "succeeded") == (retried.status_code, retried.json()["status"])
    assert ["rf-1"] == [r.refund_reference for r in sim.refunds()]
    assert [] == troubles(caplog)
    sim.close()


@pytest.mark.parametrize(("path", "order"), [
    ("/payments", ORDER), ("/refunds", {"reference": "ref-0", "amount": "1250.00"})])
async def test_a_caller_gone_before_its_body_arrived_applies_nothing(ledger, caplog, path,
                                                                      order):
    """A payment or refund whose body never arrived whole applies nothing and logs no
    traceback; its key is still free for the whole request."""
    caplog.set_level(logging.INFO)
    body = json.dumps(order).encode()
    sim = GatewaySim("card", ledger)
    async with client_of(sim) as client:
        await pay(client, "ref-0")
        _, writer = await asyncio.open_connection(client.base_url.host, client.base_url.port)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: sim\r\nIdempotency-Key: key-1\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     "\r\n".encode() + body[:10])
        await writer.drain()
        await asyncio.sleep(0.1)  # the server has the head: the handler waits for the rest
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.1)
        unapplied = ([c.reference for c in sim.collections()], sim.refunds())
        whole = await client.post(path, json=order, headers={"Idempotency-Key": "key-1"})

    assert (["ref-0"], []) == unapplied
    assert 200 == whole.status_code
    assert ["ref-0", "key-1"] == ([c.reference for c in sim.collections()]
                                  + [r.refund_reference for r in sim.refunds()])
    assert [] == troubles(caplog)
    sim.close()


async def test_5xx_and_429_come_with_retry_after_and_collect_nothing(ledger):
    """error_5xx answers 500, 502 or 503 (some 503s with Retry-After: 1); rate_limit
    answers 429 with Retry-After: 1; neither collects."""
    sim = GatewaySim("card", ledger, "error_5xx=1", seed=3)
    async with client_of(sim) as client:
        errors = [await pay(client, f"ref-{i}") for i in range(30)]
        sim.faults = Faults(rate_limit=1)
        limited = await pay(client, "ref-0")

    assert {500, 502, 503} == {e.status_code for e in errors}
    assert {"1"} == {e.headers["retry-after"] for e in errors if "retry-after" in e.headers}
    assert any(e.status_code == 503 and "retry-after" in e.headers for e in errors)
    assert not any(e.status_code != 503 and "retry-after" in e.headers for e in errors)
    assert (429, "1", "rate_limited") == (limited.status_code, limited.headers["retry-after"],
                                          limited.json()["code"])
    assert [] == sim.collections()
    sim.close()


async def test_maintenance_window_answers_503_until_it_ends(ledger):
    """Inside the window (by the server's clock) every call is 503 with the seconds left
    as Retry-After; at its end the gateway collects again."""
    clock = FakeClock(datetime(2026, 3, 2, 10, 10, tzinfo=UTC))
    sim = GatewaySim("card", ledger, "maintenance=10:00-10:30", clock=clock)
    async with client_of(sim) as client:
        during = await pay(client, "ref-1")
        query = await client.get("/payments/ref-1")
        clock.advance(20 * 60)
        after = await pay(client, "ref-1")

    assert (503, "1200", "maintenance") == (during.status_code, during.headers["retry-after"],
                                            during.json()["code"])
    assert (503, "maintenance") == (query.status_code, query.json()["code"])
    assert 200 == after.status_code
    assert 1 == len(sim.collections())
    sim.close()


async def test_same_seed_same_answers(tmp_path):
    """The same seed and requests give the same answers; another seed, others."""
    faults = "error_5xx=0.2,rate_limit=0.1,decline=0.2,reject=0.1,late_apply=0.1"

    async def answers(seed: int, name: str) -> list[int]:
        sim = GatewaySim("card", tmp_path / f"{name}.db", faults, seed=seed)
        async with client_of(sim) as client:
            got = [(await pay(client, f"ref-{i % 8}")).status_code for i in range(24)]
        sim.close()
        return got

    first, second, other = await answers(5, "a"), await answers(5, "b"), await answers(6, "c")

    assert first == second
    assert first != other
    assert {200, 202, 402, 422, 429} <= set(first) | set(other)


def test_decisions_are_a_function_of_their_inputs():
    """decide() is pure: the same request gives the same decision, whatever came before."""
    faults = Faults.parse("latency_ms=20,error_5xx=0.3,decline=0.3,late_apply=0.3")
    now = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

    decisions = [decide(faults, 7, "payment", f"ref-{i}", 1, now) for i in range(40)]

    assert decisions == [decide(faults, 7, "payment", f"ref-{i}", 1, now) for i in range(40)]
    assert {"apply", "decline", "late"} == {d.action for d in decisions}
    assert all(0.01 <= d.latency_s <= 0.03 for d in decisions)


def test_fault_specs_read_back_and_name_bad_items():
    """A spec reads into Faults and back; a bad item is named in the error."""
    spec = ("latency_ms=20,error_5xx=0.05,decline=0.02,late_apply=0.05,late_apply_s=30,"
            "reset_after_apply=0.05,maintenance=10:00-10:30;22:00-02:00")
    faults = Faults.parse(spec)

    assert faults == Faults.parse(faults.to_spec())
    assert (Window.parse("10:00-10:30"), Window.parse("22:00-02:00")) == faults.maintenance
    assert "none" == Faults.parse("").to_spec()
    with pytest.raises(ValueError, match="unknown fault 'lag'"):
        Faults.parse("lag=3")
    with pytest.raises(ValueError, match="decline"):
        Faults.parse("decline=2")
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        Faults.parse("maintenance=10")


async def test_signed_callback_is_read_and_a_forged_one_refused(ledger):
    """The callback for a payment is signed with the secret: parse_callback reads it, and
    refuses it altered or signed with another secret, as Router.callback does."""
    receiver = Receiver()
    async with receiver.serve() as hook:
        sim = GatewaySim("card", ledger, secret="s3cret", callback_url=hook)
        async with client_of(sim) as client:
            paid = (await pay(client, "ref-1")).json()
            headers, body = await receiver.next()

    forged = body.replace(b"ref-1", b"ref-2")
    other_key = {"X-Signature": sign("guess", forged)}

    assert verify_signature("s3cret", headers, body)
    assert failover.Callback("ref-1", failover.ChannelResult.succeeded(paid["payment_id"])
                             ) == parse_callback("s3cret", headers, body)
    assert not verify_signature("s3cret", headers, forged)
    for bad_headers, bad_body in ((headers, forged), (other_key, forged)):
        with pytest.raises(ValueError, match="bad signature"):
            parse_callback("s3cret", bad_headers, bad_body)
    async with failover.Router(channels=[CardAdapter("s3cret")],
                               journal=failover.MemoryJournal()) as router:
        with pytest.raises(failover.CallbackRejected, match="bad signature"):
            await router.callback("card", headers, forged)
        with pytest.raises(failover.UnknownReference):  # signed: read, then looked up
            await router.callback("card", headers, body)
    sim.close()


class CardAdapter:
    """Enough of an adapter for Router.callback: it reads the simulator's callbacks."""

    name = "card"
    idempotent = True

    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def submit(self, request: failover.ChannelRequest) -> failover.ChannelResult:
        raise AssertionError("not called")

    async def query(self, request: failover.ChannelRequest) -> failover.ChannelResult:
        raise AssertionError("not called")

    def parse_callback(self, headers: dict[str, str], body: bytes) -> failover.Callback:
        return parse_callback(self.secret, headers, body)


def counting_clients(monkeypatch: pytest.MonkeyPatch) -> list[httpx.AsyncClient]:
    """Every httpx.AsyncClient made from now on (the test makes its own with the class
    it held before)."""
    made: list[httpx.AsyncClient] = []

    class Counted(httpx.AsyncClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(httpx, "AsyncClient", Counted)
    return made


async def test_callbacks_share_one_client_closed_when_the_server_stops(ledger, monkeypatch):
    """Every callback while serving goes through one httpx client (a new one costs tens
    of milliseconds of CPU), made at the first callback and closed when serving ends."""
    plain, made = httpx.AsyncClient, counting_clients(monkeypatch)
    receiver = Receiver()
    async with receiver.serve() as hook:
        sim = GatewaySim("card", ledger, "decline=0.5", seed=1, callback_url=hook)
        async with sim.serve() as url, plain(base_url=url) as client:
            for i in range(4):
                await pay(client, f"ref-{i}")
            await until(lambda: len(sim.deliveries) == 4)
            open_while_serving = [c.is_closed for c in made]

    assert [False] == open_while_serving
    assert [True] == [c.is_closed for c in made]
    assert {(204, 1)} == {(d.answered, d.attempts) for d in sim.deliveries}
    assert {"succeeded", "declined"} == {d.status for d in sim.deliveries}
    sim.close()


async def test_a_sim_served_again_sends_callbacks_through_a_new_client(ledger, monkeypatch):
    """Stopped and served again, the simulator makes a fresh client for its callbacks
    (the first was closed) and closes that one too."""
    plain, made = httpx.AsyncClient, counting_clients(monkeypatch)
    receiver = Receiver()
    async with receiver.serve() as hook:
        sim = GatewaySim("card", ledger, callback_url=hook)
        for serving in range(2):
            async with sim.serve() as url, plain(base_url=url) as client:
                for i in range(2):
                    await pay(client, f"ref-{serving}-{i}")
                await until(lambda n=2 * serving + 2: len(sim.deliveries) == n)

    assert [True, True] == [c.is_closed for c in made]
    assert [204] * 4 == [d.answered for d in sim.deliveries]
    sim.close()


async def test_the_ledger_survives_a_restart(ledger):
    """A new server on the same ledger file knows every key: a repeat collects nothing,
    and a late application still pending is applied when due."""
    clock = FakeClock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))
    first = GatewaySim("card", ledger, clock=clock)
    async with client_of(first) as client:
        paid = await pay(client, "ref-1")
        first.faults = Faults(late_apply=1, late_apply_s=60)
        await pay(client, "ref-2")
    first.close()

    clock.advance(61)
    second = GatewaySim("card", ledger, clock=clock)
    async with client_of(second) as client:
        repeat = await pay(client, "ref-1")
        late = await client.get("/payments/ref-2")

    assert paid.json() == repeat.json()
    assert (200, "succeeded") == (late.status_code, late.json()["status"])
    assert ["ref-1", "ref-2"] == [c.reference for c in second.collections()]
    audit = SQLiteLedger(ledger)  # the file reads as failover.testing's own ledger
    assert second.collections() == audit.collections()
    audit.close()
    second.close()


async def test_a_refund_is_bounded_by_the_payment_whatever_the_sims_name(ledger):
    """A payment refunded in full, then the simulator restarted on its ledger under
    another name: a second refund is refused (it once gave back twice the amount); a
    fault spec assigned as text is read as one."""
    first = GatewaySim("card", ledger)
    async with client_of(first) as client:
        await pay(client, "ref-1")
        given = await refund(client, "rf-1", reference="ref-1", amount="1250.00")
    first.close()
    second = GatewaySim("card-v2", ledger)
    second.faults = "decline=1"
    async with client_of(second) as client:
        again = await refund(client, "rf-2", reference="ref-1", amount="1250.00")
        declined = await pay(client, "ref-2")
    second.close()

    assert 200 == given.status_code
    assert (422, "amount_exceeds_refundable") == (again.status_code, again.json()["code"])
    assert (402, Faults(decline=1)) == (declined.status_code, second.faults)


async def test_the_gateway_channel_collects_once_through_resets(ledger):
    """failover.http.GatewayChannel under a Router: payments whose connection was reset
    after they applied are found by the status query, and the ledger audits clean."""
    from failover.http import GatewayChannel

    sim = GatewaySim("gateway", ledger, "reset_after_apply=0.4,decline=0.1,latency_ms=2",
                     seed=11)
    config = RouterConfig(channels={"gateway": ChannelConfig(
        timeout_s=3, retry=RetryConfig(max_attempts=1))})
    async with sim.serve() as url:
        channel = GatewayChannel(base_url=url, trust_env=False)
        async with failover.Router([channel], failover.MemoryJournal(), config) as router:
            results = await asyncio.gather(*(router.repay(failover.Repayment(
                key=f"loan-{i}/1", account=f"acct-{i:08d}", amount="1250.00",
                currency="CNY")) for i in range(16)))
        await channel.aclose()
    ledger_file = SQLiteLedger(ledger)
    checked = audit({r.key: r for r in results}, [ledger_file])
    ledger_file.close()
    found_after_reset = [r.key for r in results if any(
        a.code == "read_error" and a.resolution is failover.Outcome.SUCCEEDED
        for a in r.attempts)]

    assert (0, (), (), ()) == (checked.pending, checked.duplicates, checked.lost,
                               checked.false_successes)
    assert checked.succeeded == len(sim.collections())
    assert found_after_reset
    sim.close()


def test_cli_starts_a_gateway_that_answers_health(tmp_path):
    """`python -m failover gateway-sim --port 0 --json` prints its URL and serves."""
    ledger = tmp_path / "cli.db"
    with subprocess.Popen(
        [sys.executable, "-m", "failover", "gateway-sim", "--port", "0", "--json",
         "--name", "wallet", "--ledger", str(ledger), "--faults", "latency_ms=1,decline=1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as process:
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 30)
            assert ready, "no URL printed within 30 s"
            started = json.loads(process.stdout.readline())
            health = httpx.get(f"{started['url']}/health", timeout=5)
            declined = httpx.post(f"{started['url']}/payments", json=ORDER,
                                  headers={"Idempotency-Key": "ref-1"}, timeout=5)
        finally:
            process.terminate()
            process.wait(timeout=10)

    assert ("wallet", str(ledger), "latency_ms=1,decline=1") == (
        started["name"], started["ledger"], started["faults"])
    assert (200, {"status": "ok", "name": "wallet"}) == (health.status_code, health.json())
    assert 402 == declined.status_code
    assert ledger.exists()


def test_cli_refuses_a_bad_fault_spec(capsys):
    """A bad --faults is one line and exit 2, before anything listens."""
    code = main(["gateway-sim", "--port", "0", "--faults", "error_5xx=lots"])

    assert 2 == code
    assert "failover gateway-sim: --faults: error_5xx: not a number: 'lots'\n" == (
        capsys.readouterr().err)


def test_the_readme_command_parses():
    """The README's gateway-sim command line is one the parser and the fault spec accept."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## A gateway simulator", 1)[1].split("\n## ", 1)[0]
    command = section.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")

    args = build_parser().parse_args(shlex.split(command)[1:])

    assert ("gateway-sim", 8900, 7) == (args.command, args.port, args.seed)
    assert 30 == Faults.parse(args.faults).late_apply_s
