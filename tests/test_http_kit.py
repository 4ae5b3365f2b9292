"""The httpx channel kit (failover.http): every row of its table, over real sockets.

A Starlette app under uvicorn on 127.0.0.1 plays the gateway (one behaviour per URL
prefix); raw sockets play the transport faults (nothing listening, a full backlog, a
server that never reads, one that resets or closes after reading the request).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import struct
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import failover
import failover.http
from failover import ChannelRequest, ChannelResult, Outcome
from failover._adapters import build_channels
from failover.config import ChannelConfig, RetryConfig, RouterConfig
from failover.http import GatewayChannel, HttpCall, HttpChannel
from failover.testing import FakeClock, ScriptedChannel

ACCOUNT = "6222020200112233"
SLOW_S = 1.5
"""How long the slow endpoint takes to answer a submit (its status query is quick)."""
READ_TIMEOUT_S = 0.3
"""The read timeout of the tests that time out on it: far below SLOW_S, and far above
what a quick answer takes, so the status queries that follow get theirs."""

STATUS_MODES: dict[str, tuple[int, dict[str, str], dict[str, Any]]] = {
    "s503ra": (503, {"Retry-After": "30"}, {"code": "maintenance"}),
    "s503": (503, {}, {"code": "overloaded"}),
    "s429ra": (429, {"Retry-After": "2"}, {"code": "slow_down"}),
    "s429": (429, {}, {}),
    "s500": (500, {}, {"code": "internal"}),
    "s502": (502, {}, {}),
    "s400": (400, {}, {"code": "bad_request"}),
    "s402": (402, {}, {"code": "insufficient_funds"}),
    "s409": (409, {}, {"code": "idempotency_key_in_use"}),
    "s422": (422, {}, {"code": "invalid_account"}),
    "s303": (303, {"Location": "/elsewhere"}, {}),
}
"""URL prefix -> the status, headers and JSON body the gateway answers with."""


@dataclass
class Seen:
    mode: str
    what: str
    headers: dict[str, str]
    body: bytes
    client_port: int


@dataclass
class Gateway:
    """The test gateway and the sockets around it (ports filled in when it starts)."""

    payments: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    raw_seen: list[bytes] = field(default_factory=list)
    http_port: int = 0
    raw_port: int = 0
    deaf_port: int = 0
    """Listens but never reads: a big request fills the buffers (write timeout)."""
    full_port: int = 0
    """Its accept queue is full: a new connection never completes (connect timeout)."""
    closed_port: int = 0
    """Bound, not listening: connections are refused."""

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.http_port}/{mode}"

    def count(self, mode: str) -> int:
        return sum(1 for s in self.seen if s.mode == mode)


def make_app(gw: Gateway) -> Starlette:
    """The JSON gateway of failover.http.GatewayChannel's docstring, misbehaving on cue:
    ``/{mode}/...``, where ``mode`` is ``post~get`` or one mode for both."""

    def modes(request: Request) -> tuple[str, str]:
        post, _, get = request.path_params["mode"].partition("~")
        return post, get or post

    def canned(mode: str) -> Response | None:
        if mode in STATUS_MODES:
            status, headers, payload = STATUS_MODES[mode]
            return JSONResponse(payload, status, headers)
        if mode == "s404html":
            return Response("<html>Not Found</html>", 404, media_type="text/html")
        if mode == "garbage":
            return Response("<html>oops</html>", 200, media_type="text/html")
        return None

    async def see(request: Request, mode: str, what: str) -> bytes:
        body = await request.body()
        assert request.client is not None
        gw.seen.append(Seen(mode, what, dict(request.headers), body, request.client.port))
        return body

    async def pay(request: Request) -> Response:
        mode, _ = modes(request)
        await see(request, mode, "POST /payments")
        if mode == "s500":  # acted, then failed: why a 500 is UNKNOWN
            gw.payments.setdefault(request.headers["idempotency-key"],
                                   {"status": "succeeded", "payment_id": "pay-500"})
        answer = canned(mode)
        if answer is not None:
            return answer
        key = request.headers["idempotency-key"]
        payment = gw.payments.setdefault(
            key, {"status": "succeeded", "payment_id": f"pay-{len(gw.payments) + 1}"})
        if mode == "slow":  # collected at once, answers late: why a read timeout is UNKNOWN
            await asyncio.sleep(SLOW_S)
        return JSONResponse(payment)

    async def payment_status(request: Request) -> Response:
        _, mode = modes(request)
        await see(request, mode, "GET /payments")
        answer = canned(mode)
        if answer is not None:
            return answer
        payment = gw.payments.get(request.path_params["reference"])
        if payment is None:
            return JSONResponse({"status": "not_found"}, 404)
        return JSONResponse(payment)

    async def refund(request: Request) -> Response:
        mode, _ = modes(request)
        data = json.loads(await see(request, mode, "POST /refunds"))
        answer = canned(mode)
        if answer is not None:
            return answer
        if not any(p["payment_id"] == data["payment_id"] for p in gw.payments.values()):
            return JSONResponse({"code": "no_such_payment"}, 404)
        done = gw.refunds.setdefault(
            request.headers["idempotency-key"],
            {"status": "succeeded", "refund_id": f"rf-{len(gw.refunds) + 1}"})
        return JSONResponse(done)

    async def refund_status(request: Request) -> Response:
        _, mode = modes(request)
        await see(request, mode, "GET /refunds")
        done = gw.refunds.get(request.path_params["reference"])
        if done is None:
            return JSONResponse({"status": "not_found"}, 404)
        return JSONResponse(done)

    return Starlette(routes=[
        Route("/{mode}/payments", pay, methods=["POST"]),
        Route("/{mode}/payments/{reference}", payment_status, methods=["GET"]),
        Route("/{mode}/refunds", refund, methods=["POST"]),
        Route("/{mode}/refunds/{reference}", refund_status, methods=["GET"]),
    ])


async def raw_handler(gw: Gateway, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    """Read one whole request, then reset the connection (``/reset/``) or close it
    without a word (``/close/``)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    gw.raw_seen.append(head + await reader.readexactly(length))
    if b" /reset/" in head.split(b"\r\n", 1)[0]:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with SO_LINGER 0: an RST
    else:
        writer.close()


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    gw = Gateway()
    sockets: list[socket.socket] = []

    def sock() -> socket.socket:
        s = socket.socket()
        sockets.append(s)
        s.bind(("127.0.0.1", 0))
        return s

    closed = sock()
    gw.closed_port = closed.getsockname()[1]
    deaf = socket.socket()
    sockets.append(deaf)
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.bind(("127.0.0.1", 0))
    deaf.listen(8)
    gw.deaf_port = deaf.getsockname()[1]
    full = sock()
    full.listen(0)
    gw.full_port = full.getsockname()[1]
    for _ in range(3):  # fill the accept queue: later handshakes are dropped
        filler = socket.socket()
        sockets.append(filler)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # completes in the background
            filler.connect(("127.0.0.1", gw.full_port))
    http = sock()
    http.listen(64)
    gw.http_port = http.getsockname()[1]

    started = threading.Event()
    stop: list[Callable[[], None]] = []

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        stop.append(lambda: loop.call_soon_threadsafe(stopping.set))
        server = uvicorn.Server(uvicorn.Config(
            make_app(gw), log_level="critical", lifespan="off", access_log=False,
            timeout_graceful_shutdown=1))
        serving = asyncio.create_task(server.serve(sockets=[http]))
        raw = await asyncio.start_server(
            lambda r, w: raw_handler(gw, r, w), "127.0.0.1", 0)
        gw.raw_port = raw.sockets[0].getsockname()[1]
        while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
            await asyncio.sleep(0.01)
        started.set()
        await stopping.wait()
        server.should_exit = True
        raw.close()
        await serving

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert started.wait(10), "the test gateway did not start"
    yield gw
    stop[0]()
    thread.join(10)
    for s in sockets:
        s.close()


@pytest.fixture
async def channels() -> AsyncIterator[list[HttpChannel]]:
    """Adapters made by a test, closed after it."""
    made: list[HttpChannel] = []
    yield made
    for channel in made:
        await channel.aclose()


@pytest.fixture
def make(channels: list[HttpChannel]) -> Callable[..., GatewayChannel]:
    def build(base_url: str, **options: Any) -> GatewayChannel:
        options.setdefault("read_timeout_s", 5.0)
        options.setdefault("trust_env", False)
        channel = GatewayChannel(base_url=base_url, **options)
        channels.append(channel)
        return channel
    return build


def request(reference: str | None = None) -> ChannelRequest:
    return ChannelRequest(
        repayment_key="loan-42/instalment-7", reference=reference or f"ref-{uuid.uuid4().hex}",
        account=ACCOUNT, amount=Decimal("1250.00"), currency="CNY")


def outcome(result: ChannelResult) -> tuple[Outcome, str | None]:
    return result.outcome, result.code


# -- 2xx ----------------------------------------------------------------------------


async def test_success_sends_the_reference_as_idempotency_key(gateway, make):
    """A 200 succeeded is SUCCEEDED; the reference went as Idempotency-Key, the amount
    as a string."""
    req = request()

    result = await make(gateway.url("ok")).submit(req)

    assert ChannelResult.succeeded(gateway.payments[req.reference]["payment_id"]) == result
    sent = next(s for s in gateway.seen if s.headers.get("idempotency-key") == req.reference)
    assert {"repayment_key": req.repayment_key, "account": ACCOUNT, "amount": "1250.00",
            "currency": "CNY"} == json.loads(sent.body)


async def test_query_finds_a_payment_by_reference(gateway, make):
    """The status query of a collected reference is SUCCEEDED with its payment id."""
    channel, req = make(gateway.url("ok")), request()
    submitted = await channel.submit(req)

    assert submitted == await channel.query(req)


async def test_query_404_not_found_is_not_found(gateway, make):
    """The gateway's own 404 {"status": "not_found"} is NOT_FOUND."""
    assert ChannelResult.not_found() == await make(gateway.url("ok")).query(request())


async def test_a_bare_404_on_a_query_proves_nothing(gateway, make):
    """A 404 that is not the gateway's (a proxy's page, a wrong base_url) is UNKNOWN."""
    result = await make(gateway.url("s404html")).query(request())

    assert (Outcome.UNKNOWN, "http_404") == outcome(result)


async def test_a_refused_query_proves_nothing(gateway, make):
    """A 4xx answer to a status query is UNKNOWN, never a DECLINED that would allow
    failover."""
    result = await make(gateway.url("s400")).query(request())

    assert (Outcome.UNKNOWN, "bad_request") == outcome(result)


async def test_unreadable_2xx_is_unknown(gateway, make):
    """A 200 whose body cannot be read is UNKNOWN (bad_response): it may have collected."""
    result = await make(gateway.url("garbage")).submit(request())

    assert (Outcome.UNKNOWN, "bad_response") == outcome(result)


async def test_one_connection_is_reused(gateway, make):
    """Calls of one channel share its client's pool: two calls, one connection."""
    channel = make(gateway.url("pooled"))
    await channel.submit(request())
    await channel.submit(request())

    ports = {s.client_port for s in gateway.seen if s.mode == "pooled"}
    assert 1 == len(ports)


# -- transport: nothing sent -> UNAVAILABLE -------------------------------------------


async def test_connection_refused_is_unavailable(gateway, make):
    """Nothing listening on the port: UNAVAILABLE (connect_error)."""
    result = await make(f"http://127.0.0.1:{gateway.closed_port}").submit(request())

    assert (Outcome.UNAVAILABLE, "connect_error") == outcome(result)


async def test_dns_failure_is_unavailable(make):
    """A name that does not resolve: UNAVAILABLE (connect_timeout if the resolver is
    slower than the connect timeout)."""
    result = await make("http://gateway.invalid").submit(request())

    assert Outcome.UNAVAILABLE == result.outcome
    assert result.code in ("connect_error", "connect_timeout")


async def test_tls_failure_is_unavailable_and_sends_nothing(gateway, make):
    """https to a plain-HTTP port fails in the handshake: UNAVAILABLE, and the gateway
    never saw a request."""
    result = await make(f"https://127.0.0.1:{gateway.http_port}/tls").submit(request())

    assert (Outcome.UNAVAILABLE, "connect_error") == outcome(result)
    assert 0 == gateway.count("tls")


async def test_connect_timeout_is_unavailable(gateway, make):
    """A handshake that never completes (full accept queue): UNAVAILABLE (connect_timeout)."""
    channel = make(f"http://127.0.0.1:{gateway.full_port}", connect_timeout_s=0.2)

    result = await channel.submit(request())

    assert (Outcome.UNAVAILABLE, "connect_timeout") == outcome(result)


async def test_pool_timeout_is_unavailable_and_sends_nothing(gateway, make):
    """No free connection in time: UNAVAILABLE (pool_timeout); only the first call reached
    the gateway."""
    channel = make(gateway.url("slow"), max_connections=1, pool_timeout_s=0.1)
    first = asyncio.create_task(channel.submit(request()))
    # The gateway runs on another thread's loop: there is nothing of it to await.
    while gateway.count("slow") == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.01)

    result = await channel.submit(request())

    assert (Outcome.UNAVAILABLE, "pool_timeout") == outcome(result)
    assert 1 == gateway.count("slow")
    first.cancel()


async def test_a_build_error_is_unavailable_and_masks_the_account(gateway, channels):
    """A request that cannot be built was never sent: UNAVAILABLE (build_error), and the
    account in the error is masked."""
    class Broken(GatewayChannel):
        def build_submit(self, request: ChannelRequest) -> HttpCall:
            raise ValueError(f"bad account {request.account}")

    channel = Broken(base_url=gateway.url("broken"))
    channels.append(channel)

    result = await channel.submit(request())

    assert (Outcome.UNAVAILABLE, "build_error") == outcome(result)
    assert ACCOUNT not in (result.detail or "")
    assert request().masked_account in (result.detail or "")
    assert 0 == gateway.count("broken")


# -- transport: after sending -> UNKNOWN ----------------------------------------------


async def test_read_timeout_is_unknown(gateway, make):
    """No answer within the read timeout: UNKNOWN, and indeed the gateway collected."""
    req = request()

    result = await make(gateway.url("slow"), read_timeout_s=READ_TIMEOUT_S).submit(req)

    assert (Outcome.UNKNOWN, "read_timeout") == outcome(result)
    assert req.reference in gateway.payments


async def test_reset_after_the_request_is_unknown(gateway, make):
    """The connection reset once the gateway read the request: UNKNOWN (read_error)."""
    before = len(gateway.raw_seen)

    result = await make(f"http://127.0.0.1:{gateway.raw_port}/reset").submit(request())

    assert (Outcome.UNKNOWN, "read_error") == outcome(result)
    assert before + 1 == len(gateway.raw_seen)


async def test_closed_without_an_answer_is_unknown(gateway, make):
    """The gateway read the request and closed without answering: UNKNOWN."""
    before = len(gateway.raw_seen)

    result = await make(f"http://127.0.0.1:{gateway.raw_port}/close").submit(request())

    assert (Outcome.UNKNOWN, "remote_protocol_error") == outcome(result)
    assert before + 1 == len(gateway.raw_seen)


async def test_write_timeout_is_unknown(gateway, channels):
    """A request stuck while being written (part of it left): UNKNOWN (write_timeout)."""
    class Big(GatewayChannel):
        def build_submit(self, request: ChannelRequest) -> HttpCall:
            return HttpCall("POST", "/payments", content=b"x" * (32 << 20))

    channel = Big(base_url=f"http://127.0.0.1:{gateway.deaf_port}", write_timeout_s=0.2,
                  trust_env=False)
    channels.append(channel)

    result = await channel.submit(request())

    assert (Outcome.UNKNOWN, "write_timeout") == outcome(result)


# -- statuses -------------------------------------------------------------------------


async def test_503_with_retry_after_pauses_the_channel(gateway, make):
    """503 + Retry-After: UNAVAILABLE, and payments are refused without sending until the
    pause has passed on the adapter's clock; status queries still go."""
    clock = FakeClock()
    channel = make(gateway.url("s503ra~after503"), clock=clock)

    first = await channel.submit(request())
    paused = await channel.submit(request())
    queried = await channel.query(request())
    clock.advance(30)
    after = await channel.submit(request())

    assert (Outcome.UNAVAILABLE, "service_unavailable") == outcome(first)
    assert (Outcome.UNAVAILABLE, "retry_after") == outcome(paused)
    assert Outcome.NOT_FOUND == queried.outcome
    assert (Outcome.UNAVAILABLE, "service_unavailable") == outcome(after)
    assert (2, 1) == (gateway.count("s503ra"), gateway.count("after503"))


async def test_a_pause_holds_back_refunds_but_not_status_queries(gateway, make):
    """During a pause a payment in doubt can still be settled by its query (leaving it
    in doubt costs more than one read); a refund, which moves money, waits."""
    collected = request()
    await make(gateway.url("ok")).submit(collected)
    clock = FakeClock()
    channel = make(gateway.url("s429ra~ok"), clock=clock)

    await channel.submit(request())
    queried = await channel.query(collected)
    refunded = await channel.refund(request(collected.reference + "-refund"), "pay-1",
                                    Decimal("1250.00"))

    assert (Outcome.SUCCEEDED, 0.0 < channel.paused_for) == (queried.outcome, True)
    assert (Outcome.UNAVAILABLE, "retry_after") == outcome(refunded)


async def test_503_without_retry_after_is_unknown(gateway, make):
    """A bare 503 may come from a proxy after the gateway acted: UNKNOWN."""
    result = await make(gateway.url("s503")).submit(request())

    assert (Outcome.UNKNOWN, "http_503") == outcome(result)


async def test_429_is_unavailable_and_honours_retry_after(gateway, make):
    """429 + Retry-After: UNAVAILABLE, then refused without sending for the pause."""
    clock = FakeClock()
    channel = make(gateway.url("s429ra"), clock=clock)
    before = gateway.count("s429ra")

    answers = [await channel.submit(request()), await channel.submit(request())]
    clock.advance(2)
    last = await channel.submit(request())

    assert [(Outcome.UNAVAILABLE, "rate_limited"), (Outcome.UNAVAILABLE, "retry_after")] \
        == [outcome(r) for r in answers]
    assert (Outcome.UNAVAILABLE, "rate_limited") == outcome(last)
    assert 2 == gateway.count("s429ra") - before


async def test_429_without_retry_after_is_unavailable_without_a_pause(gateway, make):
    """A bare 429 is UNAVAILABLE; the next call is sent."""
    channel = make(gateway.url("s429"))

    answers = [await channel.submit(request()), await channel.submit(request())]

    assert [(Outcome.UNAVAILABLE, "rate_limited")] * 2 == [outcome(r) for r in answers]
    assert 2 == gateway.count("s429")


async def test_500_is_unknown(gateway, make):
    """A 500 may come after the gateway acted (this one did): UNKNOWN."""
    req = request()

    result = await make(gateway.url("s500")).submit(req)

    assert (Outcome.UNKNOWN, "http_500") == outcome(result)
    assert req.reference in gateway.payments


async def test_500_mapped_by_the_operator(gateway, make):
    """status_map (as a config file gives it, string keys) turns a 500 into UNAVAILABLE."""
    channel = make(gateway.url("s500"), status_map={"500": "unavailable"})

    assert (Outcome.UNAVAILABLE, "http_500") == outcome(await channel.submit(request()))


async def test_502_is_unknown(gateway, make):
    """Any other 5xx is UNKNOWN."""
    assert (Outcome.UNKNOWN, "http_502") == outcome(
        await make(gateway.url("s502")).submit(request()))


async def test_400_is_declined_with_the_body_code(gateway, make):
    """An unlisted 4xx is DECLINED, with the body's code."""
    assert (Outcome.DECLINED, "bad_request") == outcome(
        await make(gateway.url("s400")).submit(request()))


async def test_codes_map_a_refusal(gateway, make):
    """The codes option gives a refusal's code another outcome."""
    channel = make(gateway.url("s400"), codes={"bad_request": "rejected"})

    assert (Outcome.REJECTED, "bad_request") == outcome(await channel.submit(request()))


async def test_402_is_declined(gateway, make):
    """402 with a code: DECLINED with that code."""
    assert (Outcome.DECLINED, "insufficient_funds") == outcome(
        await make(gateway.url("s402")).submit(request()))


async def test_409_is_unknown(gateway, make):
    """409 on an idempotency key (in use, reused): UNKNOWN, to be settled by a query."""
    assert (Outcome.UNKNOWN, "conflict") == outcome(
        await make(gateway.url("s409")).submit(request()))


async def test_422_is_rejected_by_the_gateway_adapter(gateway, make):
    """The example gateway's 422: REJECTED with its code."""
    assert (Outcome.REJECTED, "invalid_account") == outcome(
        await make(gateway.url("s422")).submit(request()))


async def test_a_redirect_is_unknown(gateway, make):
    """Redirects are not followed: a 303 after a POST may mean it was processed."""
    assert (Outcome.UNKNOWN, "http_303") == outcome(
        await make(gateway.url("s303")).submit(request()))


# -- refunds and callbacks ------------------------------------------------------------


async def test_refund_and_its_query(gateway, make):
    """A refund goes with its own reference as Idempotency-Key; its query finds it."""
    channel, req = make(gateway.url("ok")), request()
    paid = await channel.submit(req)
    refund = request(req.reference + "-refund")

    result = await channel.refund(refund, paid.channel_reference, Decimal("1250.00"))

    assert ChannelResult.succeeded(gateway.refunds[refund.reference]["refund_id"]) == result
    sent = next(s for s in gateway.seen if s.what == "POST /refunds"
                and s.headers.get("idempotency-key") == refund.reference)
    assert {"reference": req.reference, "payment_id": paid.channel_reference,
            "amount": "1250.00"} == json.loads(sent.body)
    assert result == await channel.query_refund(refund)
    assert ChannelResult.not_found() == await channel.query_refund(request())


async def test_a_refused_refund_is_declined(gateway, make):
    """A refund the gateway refuses is DECLINED (the manual-refund list)."""
    result = await make(gateway.url("ok")).refund(request(), "pay-none", Decimal("1"))

    assert (Outcome.DECLINED, "no_such_payment") == outcome(result)


def test_a_channel_without_refunds_has_no_refund_attribute():
    """A subclass that builds no refund has no refund/query_refund: the router sends its
    late collections to the manual-refund list."""
    class Plain(HttpChannel):
        def build_submit(self, request: ChannelRequest) -> HttpCall:
            return HttpCall("POST", "/p")

        def read_submit(self, request: ChannelRequest, response: httpx.Response
                        ) -> ChannelResult:
            return ChannelResult.succeeded()

        def build_query(self, request: ChannelRequest) -> HttpCall:
            return HttpCall("GET", "/p")

        def read_query(self, request: ChannelRequest, response: httpx.Response
                       ) -> ChannelResult:
            return ChannelResult.not_found()

    plain = Plain(base_url="http://gateway.example")

    assert (None, None) == (getattr(plain, "refund", None), getattr(plain, "query_refund", None))
    assert isinstance(plain, failover.Channel)


def signed(secret: bytes, payload: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    body = json.dumps(payload).encode()
    return {"X-Signature": "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()}, body


def test_parse_callback_checks_the_signature():
    """A webhook signed with the secret is read; a bad signature raises."""
    channel = GatewayChannel(base_url="http://gateway.example", secret="whsec")
    headers, body = signed(b"whsec", {"reference": "ref-1", "status": "succeeded",
                                      "payment_id": "pay-9"})

    assert failover.Callback("ref-1", ChannelResult.succeeded("pay-9")) \
        == channel.parse_callback({k.lower(): v for k, v in headers.items()}, body)
    with pytest.raises(ValueError, match="bad signature"):
        channel.parse_callback(*signed(b"other", {"reference": "ref-1", "status": "succeeded"}))


def test_parse_callback_refuses_what_settles_nothing():
    """A callback that is malformed or says nothing definitive is refused."""
    channel = GatewayChannel(base_url="http://gateway.example", secret="whsec")

    with pytest.raises(ValueError, match="malformed"):
        channel.parse_callback(*signed(b"whsec", {"status": "succeeded"}))
    with pytest.raises(ValueError, match="settles nothing"):
        channel.parse_callback(*signed(b"whsec", {"reference": "r", "status": "pending"}))


# -- logs, options, closing -----------------------------------------------------------


async def test_logs_mask_the_account_and_never_show_a_body(gateway, make, caplog):
    """The kit logs the masked account and the outcome, never the full account or a body."""
    caplog.set_level(logging.DEBUG)
    channel = make(gateway.url("ok"), headers={"Authorization": "Bearer s3cret"})
    req = request()

    await channel.submit(req)
    await make(gateway.url("slow"), read_timeout_s=READ_TIMEOUT_S).submit(request())

    kit = [r.getMessage() for r in caplog.records if r.name == "failover.http"]
    assert any(req.masked_account in m and "succeeded" in m for m in kit)
    assert any("read_timeout" in m for m in kit)
    assert ACCOUNT not in caplog.text
    assert "repayment_key" not in caplog.text
    assert "s3cret" not in caplog.text


def test_options_are_checked():
    """Bad options fail at construction, naming the option."""
    for options, words in (
        ({"status_map": {"200": "declined"}}, "status_map"),
        ({"status_map": {500: "maybe"}}, "status_map"),
        ({"codes": {"x": "fine"}}, "codes"),
        ({"connect_timeout_s": 0}, "connect_timeout_s"),
    ):
        with pytest.raises(ValueError, match=words):
            GatewayChannel(base_url="http://gateway.example", **options)
    with pytest.raises(ValueError, match="base_url"):
        GatewayChannel(base_url="ftp://gateway.example")


def test_http2_needs_h2():
    """http2=True without the h2 package is refused with the install command."""
    pytest.importorskip("httpx")
    try:
        import h2  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="h2"):
            GatewayChannel(base_url="http://gateway.example", http2=True)
    else:
        GatewayChannel(base_url="http://gateway.example", http2=True)


async def test_built_from_a_config_file(gateway):
    """adapter = "failover.http:GatewayChannel" with options builds a named channel, and
    aclose_all closes its client."""
    config = RouterConfig(channels={"partner": ChannelConfig(
        adapter="failover.http:GatewayChannel",
        options={"base_url": gateway.url("s500"), "status_map": {"500": "unavailable"},
                 "trust_env": False})})
    async with failover.Router.from_config(config, journal=failover.MemoryJournal()) as router:
        result = await router.repay(failover.Repayment(
            key=f"cfg-{uuid.uuid4().hex}", account=ACCOUNT, amount="10.00", currency="CNY"))

    assert failover.RepaymentStatus.FAILED == result.status
    assert {"partner"} == {a.channel for a in result.attempts}
    assert {(Outcome.UNAVAILABLE, "http_500")} == {(a.outcome, a.code) for a in result.attempts}
    await failover.http.aclose_all()
    assert [] == list(failover.http._OPEN)


async def test_aclose_closes_and_a_later_call_reopens(gateway, make):
    """aclose() closes the client; the channel opens a new one when used again."""
    channel = make(gateway.url("ok"))
    await channel.submit(request())

    await channel.aclose()

    assert Outcome.SUCCEEDED == (await channel.submit(request())).outcome


# -- the decisions as plain functions -------------------------------------------------


def test_error_answer_table():
    """Each httpx error class maps to its row of the table."""
    rows = {
        httpx.ConnectError("x"): (Outcome.UNAVAILABLE, "connect_error"),
        httpx.ConnectTimeout("x"): (Outcome.UNAVAILABLE, "connect_timeout"),
        httpx.PoolTimeout("x"): (Outcome.UNAVAILABLE, "pool_timeout"),
        httpx.ProxyError("x"): (Outcome.UNAVAILABLE, "proxy_error"),
        httpx.UnsupportedProtocol("x"): (Outcome.UNAVAILABLE, "unsupported_protocol"),
        httpx.ReadTimeout("x"): (Outcome.UNKNOWN, "read_timeout"),
        httpx.ReadError("x"): (Outcome.UNKNOWN, "read_error"),
        httpx.RemoteProtocolError("x"): (Outcome.UNKNOWN, "remote_protocol_error"),
        httpx.WriteTimeout("x"): (Outcome.UNKNOWN, "write_timeout"),
        httpx.WriteError("x"): (Outcome.UNKNOWN, "write_error"),
        httpx.LocalProtocolError("x"): (Outcome.UNKNOWN, "transport_error"),
        OSError("x"): (Outcome.UNKNOWN, "transport_error"),
    }

    assert rows == {error: outcome(failover.http.error_answer(error)) for error in rows}


def test_retry_after_values():
    """Retry-After is delta-seconds or an HTTP-date; anything else is ignored."""
    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    assert [30.0, 1.5, 90.0, 0.0, None] == [
        failover.http.parse_retry_after(value, now) for value in
        ("30", "1.5", "Mon, 05 Jan 2026 09:01:30 GMT", "Mon, 05 Jan 2026 08:00:00 GMT", "soon")]


# -- through the router ---------------------------------------------------------------


def router_for(*channels: Any) -> failover.Router:
    config = RouterConfig(channels={c.name: ChannelConfig(
        timeout_s=3, retry=RetryConfig(max_attempts=1)) for c in channels})
    return failover.Router(list(channels), failover.MemoryJournal(), config)


def new_repayment() -> failover.Repayment:
    return failover.Repayment(key=f"loan-{uuid.uuid4().hex}", account=ACCOUNT,
                              amount="1250.00", currency="CNY")


async def test_router_queries_after_a_read_timeout_instead_of_failing_over(gateway, make):
    """A read timeout is never a failure: the router asks the gateway, which collected,
    and the backup channel is never tried."""
    backup = ScriptedChannel("backup")
    kit = make(gateway.url("slow"), read_timeout_s=READ_TIMEOUT_S)

    async with router_for(kit, backup) as router:
        result = await router.repay(new_repayment())

    assert (failover.RepaymentStatus.SUCCEEDED, "gateway") == (result.status, result.channel)
    assert 0 == backup.submits


async def test_router_waits_when_the_query_cannot_tell(gateway, make):
    """A read timeout whose query fails (500) leaves the repayment PENDING on the kit's
    channel; the backup is never tried."""
    backup = ScriptedChannel("backup")
    kit = make(gateway.url("slow~s500"), read_timeout_s=READ_TIMEOUT_S)

    async with router_for(kit, backup) as router:
        result = await router.repay(new_repayment())

    assert (failover.RepaymentStatus.PENDING, failover.PendingReason.AWAITING_CHANNEL,
            "gateway") == (result.status, result.pending_reason, result.pending_channel)
    assert 0 == backup.submits


async def test_a_pause_skips_the_channel_and_never_opens_its_breaker(gateway, make):
    """One 503 with Retry-After: 30 puts the gateway aside for 30 s: later repayments
    skip it (journaled as "paused") without a call and without counting against its
    breaker, so it is tried again as soon as the pause has passed, not a reset_timeout
    after a breaker opened on calls it never received."""
    clock = FakeClock()
    backup = ScriptedChannel("backup")
    kit = make(gateway.url("s503ra"), clock=clock)
    config = RouterConfig(channels={c.name: ChannelConfig(
        timeout_s=3, retry=RetryConfig(max_attempts=1),
        breaker=failover.config.BreakerConfig(fail_max=2, reset_timeout_s=600))
        for c in (kit, backup)})
    before = gateway.count("s503ra")
    journal = failover.MemoryJournal()

    async with failover.Router([kit, backup], journal, config, clock=clock) as router:
        during = [await router.repay(new_repayment()) for _ in range(5)]
        records = [await journal.load(r.key) for r in during[1:]]
        state = router.breaker("gateway").state
        clock.advance(30)
        after = await router.repay(new_repayment())

    assert {(failover.RepaymentStatus.SUCCEEDED, "backup")} \
        == {(r.status, r.channel) for r in [*during, after]}
    assert [["paused"]] * 4 == [[s.reason for s in r.skips if s.channel == "gateway"]
                                for r in records if r is not None]
    assert ("closed", 2) == (state, gateway.count("s503ra") - before)
    assert [(Outcome.UNAVAILABLE, "service_unavailable")] \
        == [(a.outcome, a.code) for a in after.attempts if a.channel == "gateway"]


async def test_router_fails_over_when_the_connection_is_refused(gateway, make):
    """Connection refused proves nothing was sent: the backup collects."""
    backup = ScriptedChannel("backup")
    kit = make(f"http://127.0.0.1:{gateway.closed_port}")

    async with router_for(kit, backup) as router:
        result = await router.repay(new_repayment())

    assert (failover.RepaymentStatus.SUCCEEDED, "backup") == (result.status, result.channel)


def test_the_readme_config_builds_the_gateway_adapter(tmp_path):
    """The README's config for the kit loads and builds a GatewayChannel with its options."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## HTTP channels: the httpx kit", 1)[1].split("\n## ", 1)[0]
    toml = section.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "failover.toml").write_text(toml)

    [channel] = build_channels(RouterConfig.load(tmp_path / "failover.toml"))

    assert isinstance(channel, GatewayChannel)
    assert ("gateway", {500: Outcome.UNAVAILABLE}, {"card_blocked": Outcome.REJECTED}) \
        == (channel.name, channel.status_map, channel.codes)


# -- against failover.gateway_sim (the gateway simulator) -----------------------------


@pytest.fixture
def sim_module() -> Any:
    return pytest.importorskip("failover.gateway_sim")


async def test_sim_collects_queries_and_refunds(sim_module, make):
    """Against the simulator: a payment, its query, its refund (found by the payment's
    reference when no payment id is known) and the refund's query."""
    sim = sim_module.GatewaySim(seed=1)
    async with sim.serve() as url:
        channel, req = make(url), request()
        paid = await channel.submit(req)
        queried = await channel.query(req)
        refund = request(req.reference + "-refund")
        refunded = await channel.refund(refund, None, Decimal("1250.00"))
        refund_queried = await channel.query_refund(refund)
        unknown = await channel.query(request())

    assert Outcome.SUCCEEDED == paid.outcome
    assert paid == queried
    assert Outcome.SUCCEEDED == refunded.outcome
    assert refunded == refund_queried
    assert ChannelResult.not_found() == unknown
    assert ([req.reference], [refund.reference]) == (
        [c.reference for c in sim.collections()], [r.refund_reference for r in sim.refunds()])


async def test_sim_declines_rejects_and_late_applications(sim_module, make):
    """The simulator's 402, 422 and 202 read as DECLINED, REJECTED and UNKNOWN (whose
    query, before the late application, is NOT_FOUND)."""
    answers = []
    for faults in ("decline=1", "reject=1", "late_apply=1"):
        async with sim_module.GatewaySim(faults=faults, seed=1).serve() as url:
            channel, req = make(url), request()
            answers.append(outcome(await channel.submit(req)))
            if faults == "late_apply=1":
                answers.append(outcome(await channel.query(req)))

    assert [(Outcome.DECLINED, "insufficient_funds"), (Outcome.REJECTED, "rejected"),
            (Outcome.UNKNOWN, "pending"), (Outcome.NOT_FOUND, "not_found")] == answers


async def test_sim_rate_limit_pauses_the_channel(sim_module, make):
    """The simulator's 429 Retry-After: 1 holds the channel back for a second of its clock."""
    clock = FakeClock()
    async with sim_module.GatewaySim(faults="rate_limit=1", seed=1).serve() as url:
        channel = make(url, clock=clock)
        answers = [await channel.submit(request()), await channel.submit(request())]
        clock.advance(1)
        answers.append(await channel.submit(request()))

    assert ["rate_limited", "retry_after", "rate_limited"] == [a.code for a in answers]
    assert {Outcome.UNAVAILABLE} == {a.outcome for a in answers}


async def test_sim_reset_after_apply_is_settled_by_a_query(sim_module, make):
    """The simulator collects, then resets the connection: the router asks, finds the
    collection, and never tries the backup; the gateway collected once."""
    sim = sim_module.GatewaySim(faults="reset_after_apply=1", seed=1)
    backup = ScriptedChannel("backup")
    async with sim.serve() as url:
        kit = make(url)
        async with router_for(kit, backup) as router:
            result = await router.repay(new_repayment())

    assert (failover.RepaymentStatus.SUCCEEDED, "gateway") == (result.status, result.channel)
    assert [(Outcome.UNKNOWN, "read_error")] == [(a.outcome, a.code) for a in result.attempts]
    assert (1, 0) == (len(sim.collections()), backup.submits)


def test_sim_callbacks_are_read(sim_module):
    """A callback signed as the simulator signs it is read by parse_callback."""
    body = json.dumps({"reference": "ref-1", "status": "declined", "payment_id": None,
                       "code": "insufficient_funds"}).encode()
    headers = {sim_module.SIGNATURE_HEADER: sim_module.sign("whsec", body)}
    channel = GatewayChannel(base_url="http://gateway.example", secret="whsec")

    assert failover.Callback("ref-1", ChannelResult.declined("insufficient_funds")) \
        == channel.parse_callback(headers, body)


# -- the whole table, row by row, against the simulator server -------------------------


def sim_reference(sim_module: Any, faults: str, status: int, retry_after: bool) -> str:
    """A payment reference the simulator (seed 1, these faults) answers first with this
    5xx, found through its documented decision function."""
    parsed, now = sim_module.Faults.parse(faults), datetime.now(UTC)
    for i in range(1000):
        refusal = sim_module.decide(parsed, 1, "payment", f"ref-{i}", 1, now).refusal
        if refusal is not None and (refusal.status, refusal.retry_after is not None) \
                == (status, retry_after):
            return f"ref-{i}"
    raise AssertionError(f"no reference draws {status}")  # pragma: no cover


def window_now() -> str:
    """A maintenance window from a minute ago to ten minutes on (UTC)."""
    now = datetime.now(UTC)
    start, end = now - timedelta(minutes=1), now + timedelta(minutes=10)
    return f"{start:%H:%M}-{end:%H:%M}"


async def test_every_row_of_the_table_against_the_simulator(sim_module, make):
    """Each transport fact of the table, produced by the gateway simulator over real
    sockets (or by its absence: stopped, behind TLS it does not speak, a name that does
    not resolve), read as the table says; the simulator's ledger shows why: nothing was
    collected behind an UNAVAILABLE or a DECLINED, and a reset came after the payment
    was applied."""
    rows: dict[str, tuple[Outcome, str | None]] = {}
    ledgers: dict[str, int] = {}

    async def row(name: str, faults: str = "", reference: str | None = None,
                  url: Callable[[str], str] = lambda u: u, **options: Any) -> float:
        """The row's outcome and ledger recorded; the pause the answer set returned."""
        sim = sim_module.GatewaySim(faults=faults, seed=1)
        async with sim.serve() as served:
            channel = make(url(served), **options)
            rows[name] = outcome(await channel.submit(request(reference)))
            paused = channel.paused_for
        ledgers[name] = len(sim.collections())
        return paused

    stopped = sim_module.GatewaySim(seed=1)
    async with stopped.serve() as gone:
        pass
    rows["refused"] = outcome(await make(gone).submit(request()))
    rows["dns"] = outcome(await make("http://gateway-sim.invalid").submit(request()))
    await row("tls", url=lambda u: u.replace("http://", "https://"))
    await row("read timeout", "latency_ms=1500,jitter=0", read_timeout_s=READ_TIMEOUT_S)
    await row("reset", "reset_after_apply=1")
    paused429 = await row("429", "rate_limit=1")
    paused503 = await row("503 retry-after", f"maintenance={window_now()}")
    await row("500", "error_5xx=1", sim_reference(sim_module, "error_5xx=1", 500, False))
    await row("500 mapped", "error_5xx=1", sim_reference(sim_module, "error_5xx=1", 500, False),
              status_map={500: "unavailable"})
    await row("502", "error_5xx=1", sim_reference(sim_module, "error_5xx=1", 502, False))
    await row("bare 503", "error_5xx=1", sim_reference(sim_module, "error_5xx=1", 503, False))
    await row("402", "decline=1")
    await row("422", "reject=1")
    await row("200")

    assert {
        "refused": (Outcome.UNAVAILABLE, "connect_error"),
        "dns": (Outcome.UNAVAILABLE, "connect_error"),
        "tls": (Outcome.UNAVAILABLE, "connect_error"),
        "read timeout": (Outcome.UNKNOWN, "read_timeout"),
        "reset": (Outcome.UNKNOWN, "read_error"),
        "429": (Outcome.UNAVAILABLE, "rate_limited"),
        "503 retry-after": (Outcome.UNAVAILABLE, "service_unavailable"),
        "500": (Outcome.UNKNOWN, "http_500"),
        "500 mapped": (Outcome.UNAVAILABLE, "http_500"),
        "502": (Outcome.UNKNOWN, "http_502"),
        "bare 503": (Outcome.UNKNOWN, "http_503"),
        "402": (Outcome.DECLINED, "insufficient_funds"),
        "422": (Outcome.REJECTED, "rejected"),
        "200": (Outcome.SUCCEEDED, None),
    } == rows
    assert {"tls": 0, "reset": 1, "429": 0, "503 retry-after": 0, "500 mapped": 0,
            "402": 0, "422": 0, "200": 1} \
        == {k: v for k, v in ledgers.items() if k not in ("read timeout", "500", "502",
                                                             "bare 503")}
    assert 0.0 < paused429 <= 1.0
    assert 9 * 60 < paused503 <= 11 * 60


# -- clients across event loops --------------------------------------------------------


@pytest.fixture
def made_clients(monkeypatch: pytest.MonkeyPatch) -> list[httpx.AsyncClient]:
    """Every httpx.AsyncClient the kit makes during the test."""
    made: list[httpx.AsyncClient] = []
    plain = httpx.AsyncClient

    def counting(*args: Any, **kwargs: Any) -> httpx.AsyncClient:
        client = plain(*args, **kwargs)
        made.append(client)
        return client

    monkeypatch.setattr(failover.http.httpx, "AsyncClient", counting)
    return made


async def test_a_channel_used_from_two_loops_closes_both_clients(gateway, made_clients):
    """Used from this loop and from a BlockingRouter's, alternately: one client per
    loop, kept (it was replaced and dropped open), and every one closed at the end."""
    channel = GatewayChannel(base_url=gateway.url("ok"), trust_env=False)

    def blocking_repay() -> failover.RepaymentResult:
        with failover.BlockingRouter([channel], failover.MemoryJournal()) as router:
            return router.repay(new_repayment())

    answers = []
    for _ in range(2):
        answers.append((await channel.submit(request())).outcome)
        answers.append((await asyncio.to_thread(blocking_repay)).status)
    await failover.http.aclose_all()

    assert [Outcome.SUCCEEDED, failover.RepaymentStatus.SUCCEEDED] * 2 == answers
    assert 3 == len(made_clients)  # this loop's, and one per BlockingRouter's loop
    assert all(client.is_closed for client in made_clients)


def test_a_blocking_router_closes_the_kits_clients_on_its_loop(gateway, made_clients):
    """Closing a BlockingRouter closes the kit's clients on its loop before the loop
    stops: a stopped loop's sockets stay open, and aclose_all() could not reach them."""
    channel = GatewayChannel(base_url=gateway.url("ok"), trust_env=False)
    with failover.BlockingRouter([channel], failover.MemoryJournal()) as router:
        result = router.repay(new_repayment())

    assert failover.RepaymentStatus.SUCCEEDED == result.status
    assert [True] == [client.is_closed for client in made_clients]


async def test_closing_one_loops_clients_leaves_anothers_calls_alone(gateway, made_clients):
    """aclose_all() on this loop while a BlockingRouter's submit through the same
    channel is in the air: that call keeps its client and gets its answer (another
    router's shutdown once turned it into a reset, UNKNOWN)."""
    channel = GatewayChannel(base_url=gateway.url("slow"), trust_env=False)
    await channel.submit(request())  # this loop's client
    before = gateway.count("slow")
    with failover.BlockingRouter([channel], failover.MemoryJournal()) as router:
        call = asyncio.create_task(asyncio.to_thread(router.repay, new_repayment()))
        async with asyncio.timeout(5):
            while gateway.count("slow") == before:  # noqa: ASYNC110 - the gateway's list
                await asyncio.sleep(0.01)
        await failover.http.aclose_all()
        result = await call

    assert [(Outcome.SUCCEEDED, None)] == [(a.outcome, a.code) for a in result.attempts]
    assert all(client.is_closed for client in made_clients)
