"""The httpx channel kit (``pip install 'failover[http]'``): adapters for HTTP gateways.

Most channels are HTTP APIs, and the commonest way to charge a borrower twice is to
treat a read timeout as a failure: the gateway had the request and may have collected.
``HttpChannel`` is a base class for async httpx adapters.  A subclass says how to
build each request and read each answer (``build_submit``/``read_submit``,
``build_query``/``read_query``, optionally ``build_refund``/``read_refund``,
``build_query_refund``/``read_query_refund`` and ``parse_callback``); the base sends
it and turns what the transport did into an outcome, by this table:

=========================================================  ============  ======================
what happened                                              outcome       code
=========================================================  ============  ======================
a submit or refund while an earlier 429/503 asked for a   UNAVAILABLE   ``retry_after``
  pause that has not passed (nothing is sent)
``build_*`` raised (``ChannelUnavailable`` keeps its code) UNAVAILABLE   ``build_error``
``ConnectError``: connection refused, DNS failure, TLS     UNAVAILABLE   ``connect_error``
  handshake failure
``ConnectTimeout``                                         UNAVAILABLE   ``connect_timeout``
``PoolTimeout`` (no free connection in the pool)           UNAVAILABLE   ``pool_timeout``
``ProxyError`` (the proxy refused the tunnel)              UNAVAILABLE   ``proxy_error``
``UnsupportedProtocol`` (not an http/https URL)            UNAVAILABLE   ``unsupported_protocol``
``ReadTimeout``                                            UNKNOWN       ``read_timeout``
``ReadError`` (connection reset after sending)             UNKNOWN       ``read_error``
``RemoteProtocolError`` (closed without an answer,         UNKNOWN       ``remote_protocol_error``
  malformed answer)
``WriteTimeout`` / ``WriteError`` (part of the request     UNKNOWN       ``write_timeout`` /
  may have left)                                                         ``write_error``
any other exception while sending                          UNKNOWN       ``transport_error``
HTTP status in ``status_map`` (submit and refund only)     as mapped     ``http_<status>``
429 Too Many Requests (pauses if ``Retry-After``)          UNAVAILABLE   ``rate_limited``
503 with ``Retry-After`` (pauses)                          UNAVAILABLE   ``service_unavailable``
any other 5xx (503 without ``Retry-After`` included)       UNKNOWN       ``http_<status>``
409 Conflict (the idempotency key is busy or reused)       UNKNOWN       ``conflict``
1xx, 3xx (redirects are not followed)                      UNKNOWN       ``http_<status>``
other 4xx on submit/refund: ``read_refusal``; by default   DECLINED      the body's ``code``,
  the body's ``code`` through ``codes``                    unless mapped else ``http_<status>``
other 4xx on query/query_refund: ``read_refusal``; by      UNKNOWN       the same
  default, a refused status query proves nothing
2xx: the subclass's ``read_*``                             what it says  (``bad_response`` if
                                                                         it raises)
=========================================================  ============  ======================

Why: httpx raises ``ConnectError``/``ConnectTimeout`` only while opening a connection
(TCP connect, DNS, TLS handshake, a proxy's tunnel), before a byte of the request is
written, and ``PoolTimeout`` before a connection is even chosen; everything else may
come after the gateway received the request.  A 4xx says the gateway refused it, so
nothing was collected; a 5xx may come after the gateway acted (an operator who knows
the gateway rolls back on 500 maps it: ``status_map = {500: "unavailable"}``).
``Retry-After`` is honoured on the adapter's clock: until the pause has passed, a
submit or refund answers ``UNAVAILABLE`` without sending, and ``paused_for`` says how
long is left, which a router reads to pass the channel over (a journaled ``paused``
skip: no call, nothing counted against its breaker) until then.  Status queries still
go during a pause: a payment left in doubt costs more than one read.

The kit sends ``request.reference`` in the idempotency header (``Idempotency-Key``,
configurable) with every submit and refund, shares one ``httpx.AsyncClient`` (one
connection pool) per channel, and logs (logger ``failover.http``) the operation, the
reference, the masked account, the HTTP status and the outcome: never the full
account, a header or a body.  Close it with ``await channel.aclose()`` (or ``async
with channel``), or ``await failover.http.aclose_all()`` for adapters a router built
from a file.

Every constructor option is a keyword, so a config file can build it::

    [channels.gateway]
    adapter = "failover.http:GatewayChannel"
    timeout_s = 10

    [channels.gateway.options]
    base_url = "https://pay.example.com/v1"
    secret = "whsec_..."
    connect_timeout_s = 2
    read_timeout_s = 7
    status_map = { 500 = "unavailable" }
"""

from __future__ import annotations

import abc
import asyncio
import email.utils
import importlib.util
import json
import logging
import math
import re
import ssl
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import httpx

from failover._clock import Clock, SystemClock
from failover._errors import ChannelUnavailable
from failover._late import REFUND_SUFFIX
from failover._models import Callback, ChannelRequest, ChannelResult, Outcome, scrubbed
from failover._policy import answer_of
from failover._signing import signed

__all__ = [
    "GatewayChannel",
    "HttpCall",
    "HttpChannel",
    "Operation",
    "aclose_all",
    "error_answer",
    "parse_retry_after",
    "response_code",
    "status_answer",
]

_log = logging.getLogger("failover.http")

Operation = Literal["submit", "query", "refund", "query_refund"]
"""Which call of the channel a request is for."""

_ACTING: frozenset[str] = frozenset({"submit", "refund"})
"""Operations that ask the gateway to move money (the others only ask what it did)."""


@dataclass(frozen=True, slots=True)
class HttpCall:
    """One HTTP request as a subclass's ``build_*`` describes it; the kit sends it.

    ``url`` is relative to the channel's ``base_url`` (``"/payments"``) or absolute.
    Give the body as ``json`` (amounts as strings: JSON has no decimals) or ``content``.
    """

    method: str
    url: str
    json: Any = None
    content: bytes | None = None
    params: Mapping[str, str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


# -- the decisions: plain functions over what the transport did ---------------------

_NOT_SENT: tuple[tuple[type[Exception], str], ...] = (
    # Raised only while opening a connection (httpcore's connect_tcp / start_tls /
    # proxy tunnel) or waiting for one: no byte of the request was written.
    (httpx.ConnectTimeout, "connect_timeout"),
    (httpx.ConnectError, "connect_error"),
    (httpx.PoolTimeout, "pool_timeout"),
    (httpx.ProxyError, "proxy_error"),
    (httpx.UnsupportedProtocol, "unsupported_protocol"),
)
_MAYBE_SENT: tuple[tuple[type[Exception], str], ...] = (
    (httpx.ReadTimeout, "read_timeout"),
    (httpx.ReadError, "read_error"),
    (httpx.RemoteProtocolError, "remote_protocol_error"),
    # A write that failed midway may still have delivered a whole request (the gateway
    # can answer and close before reading the rest): not proof of anything.
    (httpx.WriteTimeout, "write_timeout"),
    (httpx.WriteError, "write_error"),
)


def error_answer(error: BaseException) -> ChannelResult:
    """What an exception raised while sending a request means (the module's table).

    ``UNAVAILABLE`` only for the httpx errors that prove no byte of the request left;
    anything else, an unfamiliar exception included, is ``UNKNOWN``."""
    detail = _describe(error)
    for kind, code in _NOT_SENT:
        if isinstance(error, kind):
            return ChannelResult.unavailable(code, detail)
    for kind, code in _MAYBE_SENT:
        if isinstance(error, kind):
            return ChannelResult.unknown(code, detail)
    return ChannelResult.unknown("transport_error", detail)


def status_answer(
    operation: Operation, status: int, *, retry_after: bool,
    status_map: Mapping[int, Outcome] | None = None,
) -> ChannelResult | None:
    """What a response's status alone decides (the module's table), or ``None`` when
    the subclass reads the response: a 2xx (``read_*``) or a 4xx (``read_refusal``).

    ``retry_after`` is whether the response carries a ``Retry-After`` header;
    ``status_map`` is the operator's, and applies to submits and refunds only (a
    status query's answer is read by the subclass, never classified by a map meant
    for calls that move money)."""
    if status_map and operation in _ACTING and status in status_map:
        return ChannelResult(status_map[status], code=f"http_{status}",
                             detail=f"HTTP {status}, mapped by status_map")
    if status == 429:
        return ChannelResult.unavailable("rate_limited", "HTTP 429")
    if status == 503 and retry_after:
        return ChannelResult.unavailable("service_unavailable", "HTTP 503 with Retry-After")
    if 500 <= status:
        return ChannelResult.unknown(f"http_{status}", f"HTTP {status}: the gateway may have"
                                                       " acted before it failed")
    if status == 409:
        return ChannelResult.unknown("conflict", "HTTP 409: the idempotency key is in use")
    if 200 <= status < 300 or 400 <= status < 500:
        return None
    # A 303 after a POST says it was processed; redirects are not followed.
    return ChannelResult.unknown(f"http_{status}", f"HTTP {status}")


_DELTA_SECONDS = re.compile(r"\d+(\.\d+)?")


def parse_retry_after(value: str, now: datetime) -> float | None:
    """Seconds a ``Retry-After`` value asks to wait from ``now`` (delta-seconds or an
    HTTP-date), ``None`` if it is neither.  A date in the past is 0."""
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # an HTTP-date is GMT
    return max(0.0, (when - now).total_seconds())


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def response_code(response: httpx.Response) -> str | None:
    """The error code a JSON body gives (``{"code": ...}`` or ``{"error": {"code":
    ...}}``), or ``None``."""
    try:
        data = response.json()
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    code = data.get("code")
    if code is None and isinstance(data.get("error"), dict):
        code = data["error"].get("code")
    if isinstance(code, str | int) and not isinstance(code, bool) and str(code):
        return str(code)
    return None


def _outcome(value: object, where: str) -> Outcome:
    try:
        return Outcome(str(value))
    except ValueError:
        choices = ", ".join(o.value for o in Outcome)
        raise ValueError(f"{where}: {value!r} is not an outcome ({choices})") from None


# -- the base class -------------------------------------------------------------------

_OPEN: weakref.WeakSet[HttpChannel] = weakref.WeakSet()
_OPEN_LOCK = threading.Lock()
"""Guards ``_OPEN`` and every channel's clients: loops in several threads use them."""
"""Every channel with a client, for ``aclose_all``."""


class HttpChannel(abc.ABC):
    """A ``failover.Channel`` over an HTTP API: subclasses build requests and read
    answers, the base sends them and maps transport facts to outcomes (module table).

    Options (all keywords, so ``options`` in a config file can give them):

    - ``base_url``: the gateway's root; ``HttpCall.url`` is relative to it.
    - ``headers``: sent with every request (``Authorization``...); never logged.
    - ``connect_timeout_s`` (2), ``read_timeout_s`` (7), ``write_timeout_s`` (as read),
      ``pool_timeout_s`` (as connect).  Keep connect + read below the channel's
      ``timeout_s``, so that the kit, not the router's timeout, says what happened:
      a connect timeout is ``UNAVAILABLE``, the router's timeout always ``UNKNOWN``.
    - ``status_map``: HTTP status -> outcome for submits and refunds, overriding the
      table (``{500: "unavailable"}`` for a gateway documented to roll back on 500).
    - ``codes``: a refusal's code (the body's ``code``, else ``http_<status>``) ->
      outcome for submits and refunds; an unlisted 4xx is ``DECLINED``.
    - ``idempotency_header`` (``"Idempotency-Key"``; ``None`` sends none): carries
      ``request.reference`` with every submit and refund.
    - ``idempotent``: whether the gateway deduplicates by that header (default: True
      when ``idempotency_header`` is sent, False without one; True without one is refused).
    - ``http2`` (False; needs the ``h2`` package), ``max_connections`` (20),
      ``verify`` (True, False, a CA bundle path or an ``ssl.SSLContext``),
      ``client_cert`` (a PEM path, or ``[cert, key]``), ``trust_env`` (True: proxy
      and CA settings from the environment).
    - ``max_retry_after_s`` (3600): the longest pause a ``Retry-After`` can impose.
    - ``clock`` (a ``failover.Clock``, default the system's): what pauses run on.
    - ``transport``: an ``httpx.AsyncBaseTransport`` to send through instead
      (``httpx.MockTransport`` in a service's own tests).
    """

    name: str = "http"
    idempotent: bool = True
    """The kit sends ``request.reference`` as the idempotency key."""

    refund: Callable[[ChannelRequest, str | None, Decimal], Awaitable[ChannelResult]]
    """Present when the subclass implements ``build_refund``."""
    query_refund: Callable[[ChannelRequest], Awaitable[ChannelResult]]
    """Present when the subclass implements ``build_query_refund``."""

    def __init__(
        self, *, base_url: str, name: str | None = None,
        headers: Mapping[str, str] | None = None,
        connect_timeout_s: float = 2.0, read_timeout_s: float = 7.0,
        write_timeout_s: float | None = None, pool_timeout_s: float | None = None,
        status_map: Mapping[int | str, Outcome | str] | None = None,
        codes: Mapping[str, Outcome | str] | None = None,
        idempotency_header: str | None = "Idempotency-Key",
        idempotent: bool | None = None,
        http2: bool = False, max_connections: int = 20,
        verify: bool | str | ssl.SSLContext = True,
        client_cert: str | Sequence[str] | None = None,
        trust_env: bool = True,
        max_retry_after_s: float = 3600.0,
        clock: Clock | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        if name is not None:
            self.name = name
        if idempotent is not None:
            self.idempotent = idempotent
        elif idempotency_header is None:
            # No key on the wire: nothing lets the gateway recognise a resend.
            self.idempotent = False
        if self.idempotent and idempotency_header is None:
            raise ValueError("idempotent=True needs an idempotency_header: without the"
                             " reference on the wire a resend would collect again")
        self.base_url = base_url
        for label, seconds in (("connect_timeout_s", connect_timeout_s),
                               ("read_timeout_s", read_timeout_s),
                               ("write_timeout_s", write_timeout_s),
                               ("pool_timeout_s", pool_timeout_s),
                               ("max_retry_after_s", max_retry_after_s)):
            if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
                raise ValueError(f"{label} must be a positive number, got {seconds!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if idempotency_header is not None and not idempotency_header.strip():
            raise ValueError("idempotency_header must be a header name, or None")
        if http2 and importlib.util.find_spec("h2") is None:
            raise ValueError("http2=True needs the h2 package: pip install 'httpx[http2]'")
        self.status_map: dict[int, Outcome] = {}
        for key, value in (status_map or {}).items():
            status = int(key) if isinstance(key, int | str) and str(key).isdigit() else None
            if status is None or not 300 <= status <= 599:
                raise ValueError(f"status_map: {key!r} is not an HTTP status from 300 to 599")
            self.status_map[status] = _outcome(value, f"status_map[{status}]")
        self.codes: dict[str, Outcome] = {
            str(code): _outcome(value, f"codes[{code!r}]") for code, value in (codes or {}).items()
        }
        self.idempotency_header = idempotency_header
        self._headers = dict(headers or {})
        self._timeout = httpx.Timeout(
            connect=connect_timeout_s, read=read_timeout_s,
            write=read_timeout_s if write_timeout_s is None else write_timeout_s,
            pool=connect_timeout_s if pool_timeout_s is None else pool_timeout_s)
        self._limits = httpx.Limits(max_connections=max_connections,
                                    max_keepalive_connections=max_connections)
        self._http2 = http2
        self._verify = _ssl_setting(verify, client_cert)
        self._trust_env = trust_env
        self._transport = transport
        self._max_pause_s = max_retry_after_s
        self._clock: Clock = clock or SystemClock()
        self._paused_until: float | None = None
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                                 httpx.AsyncClient] = weakref.WeakKeyDictionary()
        """One client per event loop that used the channel (a pool's connections belong
        to the loop that opened them)."""
        # Only a subclass that can refund has ``refund``: the router sends a channel
        # without it straight to the manual-refund list.
        if type(self).build_refund is not HttpChannel.build_refund:
            self.refund = self._refund
        if type(self).build_query_refund is not HttpChannel.build_query_refund:
            self.query_refund = self._query_refund

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, base_url={self.base_url!r})"

    # -- what a subclass fills in

    @abc.abstractmethod
    def build_submit(self, request: ChannelRequest) -> HttpCall:
        """The request that asks the gateway to collect ``request``.  The idempotency
        header is added by the kit.  Raising here sends nothing: ``UNAVAILABLE``."""

    @abc.abstractmethod
    def read_submit(self, request: ChannelRequest, response: httpx.Response) -> ChannelResult:
        """What a 2xx answer to the submit says."""

    @abc.abstractmethod
    def build_query(self, request: ChannelRequest) -> HttpCall:
        """The status query for ``request.reference``."""

    @abc.abstractmethod
    def read_query(self, request: ChannelRequest, response: httpx.Response) -> ChannelResult:
        """What a 2xx answer to the status query says (``SUCCEEDED``, ``DECLINED``...)."""

    def build_refund(self, request: ChannelRequest, channel_reference: str | None,
                     amount: Decimal) -> HttpCall:
        """The refund of ``amount`` of the collection ``channel_reference``;
        ``request.reference`` is the refund's own reference (its idempotency key)."""
        raise NotImplementedError

    def read_refund(self, request: ChannelRequest, response: httpx.Response) -> ChannelResult:
        """What a 2xx answer to the refund says."""
        raise NotImplementedError

    def build_query_refund(self, request: ChannelRequest) -> HttpCall:
        """The status query for the refund ``request.reference``."""
        raise NotImplementedError

    def read_query_refund(self, request: ChannelRequest,
                          response: httpx.Response) -> ChannelResult:
        """What a 2xx answer to the refund's status query says."""
        raise NotImplementedError

    def read_refusal(self, operation: Operation, request: ChannelRequest,
                     response: httpx.Response) -> ChannelResult:
        """What a 4xx (other than 409 and 429) says.  By default: for a submit or a
        refund, the body's code through ``codes``, else ``DECLINED`` (the gateway
        refused it: nothing moved); for a status query, ``UNKNOWN`` (a refused query
        proves nothing).  Override it to read a gateway's refusals (``NOT_FOUND``...),
        and call ``refusal`` to keep the operator's ``codes``."""
        default = Outcome.DECLINED if operation in _ACTING else Outcome.UNKNOWN
        return self.refusal(operation, response, default)

    def refusal(self, operation: Operation, response: httpx.Response,
                default: Outcome) -> ChannelResult:
        """A refusal's answer: its code (the body's, else ``http_<status>``) and the
        outcome ``codes`` gives it for a submit or refund, else ``default``."""
        code = response_code(response) or f"http_{response.status_code}"
        outcome = self.codes.get(code, default) if operation in _ACTING else default
        return ChannelResult(outcome, code=code, detail=f"HTTP {response.status_code}")

    # -- the Channel shape

    async def submit(self, request: ChannelRequest) -> ChannelResult:
        return await self._perform("submit", request, lambda: self.build_submit(request),
                                   lambda response: self.read_submit(request, response))

    async def query(self, request: ChannelRequest) -> ChannelResult:
        return await self._perform("query", request, lambda: self.build_query(request),
                                   lambda response: self.read_query(request, response))

    async def _refund(self, request: ChannelRequest, channel_reference: str | None,
                      amount: Decimal) -> ChannelResult:
        return await self._perform(
            "refund", request, lambda: self.build_refund(request, channel_reference, amount),
            lambda response: self.read_refund(request, response))

    async def _query_refund(self, request: ChannelRequest) -> ChannelResult:
        return await self._perform(
            "query_refund", request, lambda: self.build_query_refund(request),
            lambda response: self.read_query_refund(request, response))

    # -- the client

    @property
    def paused_for(self) -> float:
        """Seconds (on the adapter's clock) a ``Retry-After`` still holds calls back."""
        if self._paused_until is None:
            return 0.0
        left = self._paused_until - self._clock.monotonic()
        if left <= 0:
            self._paused_until = None
            return 0.0
        return left

    def _http(self) -> httpx.AsyncClient:
        """The channel's client on the running loop (a pool's connections belong to the
        loop that opened them: another loop gets a client of its own, kept beside)."""
        loop = asyncio.get_running_loop()
        with _OPEN_LOCK:
            client = self._clients.get(loop)
            if client is None or client.is_closed:
                client = self._clients[loop] = httpx.AsyncClient(
                    base_url=self.base_url, headers=self._headers, timeout=self._timeout,
                    limits=self._limits, http2=self._http2, verify=self._verify,
                    trust_env=self._trust_env, transport=self._transport,
                    follow_redirects=False)
                _OPEN.add(self)
        return client

    async def aclose(self) -> None:
        """Close the client of the running loop and its connections (a later call opens
        a new one).  A client another running loop opened is that loop's to close (its
        calls may be in the air): a ``BlockingRouter`` closes its own when it closes."""
        loop = asyncio.get_running_loop()
        with _OPEN_LOCK:
            client = self._clients.pop(loop, None)
            for gone in [other for other in self._clients if other.is_closed()]:
                del self._clients[gone]  # its loop, and the means to close it, are gone
            if not self._clients:
                _OPEN.discard(self)
        if client is not None and not client.is_closed:
            await client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    # -- one call

    async def _perform(
        self, operation: Operation, request: ChannelRequest,
        build: Callable[[], HttpCall], read: Callable[[httpx.Response], ChannelResult],
    ) -> ChannelResult:
        status: int | None = None
        pause = self.paused_for if operation in _ACTING else 0.0
        if pause > 0:
            result = ChannelResult.unavailable(
                "retry_after", f"the gateway asked for a pause (Retry-After): {pause:.1f}s left")
            return self._done(operation, request, status, result)
        try:
            call = build()
            client = self._http()
            sending = client.build_request(
                call.method, call.url, json=call.json, content=call.content,
                params=call.params, headers=self._headers_for(operation, request, call))
        except ChannelUnavailable as exc:
            return self._done(operation, request, status,
                              ChannelResult.unavailable(exc.code, exc.detail))
        except Exception as exc:  # nothing was sent
            return self._done(operation, request, status,
                              ChannelResult.unavailable("build_error", _describe(exc)))
        try:
            response = await client.send(sending)
        except Exception as exc:
            return self._done(operation, request, status, error_answer(exc))
        status = response.status_code
        return self._done(operation, request, status,
                          self._answer(operation, request, response, read))

    def _headers_for(self, operation: Operation, request: ChannelRequest,
                     call: HttpCall) -> dict[str, str]:
        headers = dict(call.headers)
        if self.idempotency_header is not None and operation in _ACTING \
                and not any(k.lower() == self.idempotency_header.lower() for k in headers):
            headers[self.idempotency_header] = request.reference
        return headers

    def _answer(self, operation: Operation, request: ChannelRequest, response: httpx.Response,
                read: Callable[[httpx.Response], ChannelResult]) -> ChannelResult:
        status = response.status_code
        retry_after = response.headers.get("Retry-After")
        if retry_after is not None and status in (429, 503):
            self._pause(retry_after)
        decided = status_answer(operation, status, retry_after=retry_after is not None,
                                status_map=self.status_map)
        if decided is not None:
            return decided
        try:
            value: object = (read(response) if 200 <= status < 300
                             else self.read_refusal(operation, request, response))
        except ChannelUnavailable as exc:
            if 200 <= status < 300:
                # The gateway answered 2xx: it acted.  Never "certainly not collected".
                return ChannelResult.unknown("bad_response",
                                             f"HTTP {status}: {_describe(exc)}")
            return ChannelResult.unavailable(exc.code, exc.detail)
        except Exception as exc:
            return ChannelResult.unknown("bad_response", f"HTTP {status}: {_describe(exc)}")
        return answer_of(value)  # a read that returns anything else is UNKNOWN

    def _pause(self, value: str) -> None:
        seconds = parse_retry_after(value, self._clock.now())
        if seconds is None or seconds <= 0:
            return
        until = self._clock.monotonic() + min(seconds, self._max_pause_s)
        if self._paused_until is None or until > self._paused_until:
            self._paused_until = until

    def _done(self, operation: Operation, request: ChannelRequest, status: int | None,
              result: ChannelResult) -> ChannelResult:
        # The gateway's own code or message may echo the account: masked in both.
        result = scrubbed(result, request.account)
        # A call that moves money and ends in doubt is worth a warning; a status query
        # that cannot tell yet is routine.
        doubt = result.outcome is Outcome.UNKNOWN and operation in _ACTING
        _log.log(
            logging.WARNING if doubt else logging.DEBUG,
            "%s %s reference=%s account=%s status=%s -> %s (%s)",
            self.name, operation, request.reference, request.masked_account,
            status if status is not None else "-", result.outcome.value, result.code)
        return result


def _ssl_setting(verify: bool | str | ssl.SSLContext,
                 client_cert: str | Sequence[str] | None) -> bool | ssl.SSLContext:
    if isinstance(verify, str):
        context = ssl.create_default_context(cafile=verify)
    elif isinstance(verify, ssl.SSLContext):
        context = verify
    elif client_cert is None:
        return verify
    else:
        context = ssl.create_default_context()
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        if isinstance(client_cert, str):
            context.load_cert_chain(client_cert)
        else:
            context.load_cert_chain(*client_cert)
    return context


async def aclose_all() -> None:
    """Close every ``HttpChannel`` client this loop opened in this process: for
    adapters a router built from a file (``Router.from_config``), after
    ``router.close()``.  Clients other running loops opened are left to them."""
    with _OPEN_LOCK:
        channels = list(_OPEN)
    for channel in channels:
        await channel.aclose()


# -- an example: a simple JSON gateway -------------------------------------------------

_STATUS_OUTCOMES = {
    "succeeded": Outcome.SUCCEEDED,
    "declined": Outcome.DECLINED,
    "rejected": Outcome.REJECTED,
}


class GatewayChannel(HttpChannel):
    """An adapter for a simple JSON payment gateway (``failover.http:GatewayChannel``).

    ==============================  ========================================================
    ``POST {base}/payments``        ``Idempotency-Key: <reference>``, JSON ``{repayment_key,
                                    account, amount, currency}`` (amount a string).
                                    200 ``{"status": "succeeded", "payment_id"}``;
                                    402 ``{"code"}``: declined; 422 ``{"code"}``: rejected.
    ``GET {base}/payments/{ref}``   200 ``{"status", "payment_id", "code"}``;
                                    404 ``{"status": "not_found"}``.
    ``POST {base}/refunds``         ``Idempotency-Key: <refund reference>``, JSON
                                    ``{reference, payment_id, amount}``: the payment's
                                    reference and id; 200 ``{"status": "succeeded",
                                    "refund_id"}``; 4xx ``{"code"}``: declined (the
                                    manual-refund list).
    ``GET {base}/refunds/{ref}``    200 ``{"status", "refund_id"}``; 404 ``{"status":
                                    "not_found"}``.
    callback (webhook)              ``X-Signature: sha256=<hex HMAC-SHA256 of the body>``
                                    under ``secret``; JSON ``{"reference", "status",
                                    "payment_id", "code"}``.
    ==============================  ========================================================

    ``status`` is ``succeeded``, ``declined``, ``rejected`` or ``pending`` / ``processing``
    (``UNKNOWN``: asked again later); anything else is ``UNKNOWN`` (``unexpected_status``).
    A 404 proves nothing unless its body is the gateway's own ``{"status": "not_found"}``
    (or ``{"code": "not_found"}``): a 404 from a proxy or a wrong ``base_url`` must never
    read as "never received".  ``failover.gateway_sim`` serves this API.
    Options: ``secret`` (the webhook key) and every ``HttpChannel`` option.
    """

    name = "gateway"
    SIGNATURE_HEADER = "X-Signature"

    def __init__(self, *, base_url: str, secret: str | None = None, **options: Any) -> None:
        super().__init__(base_url=base_url, **options)
        self._secret = secret.encode() if secret else None

    def build_submit(self, request: ChannelRequest) -> HttpCall:
        return HttpCall("POST", "/payments", json={
            "repayment_key": request.repayment_key, "account": request.account,
            "amount": str(request.amount), "currency": request.currency})

    def read_submit(self, request: ChannelRequest, response: httpx.Response) -> ChannelResult:
        return _status_result(response.json(), "payment_id")

    def build_query(self, request: ChannelRequest) -> HttpCall:
        return HttpCall("GET", f"/payments/{quote(request.reference, safe='')}")

    def read_query(self, request: ChannelRequest, response: httpx.Response) -> ChannelResult:
        return _status_result(response.json(), "payment_id")

    def build_refund(self, request: ChannelRequest, channel_reference: str | None,
                     amount: Decimal) -> HttpCall:
        # The refund's own reference is the Idempotency-Key; the body names the payment,
        # by id and by its reference (the router derives a refund's from it).
        return HttpCall("POST", "/refunds", json={
            "reference": request.reference.removesuffix(REFUND_SUFFIX),
            "payment_id": channel_reference, "amount": str(amount)})

    def read_refund(self, request: ChannelRequest, response: httpx.Response) -> ChannelResult:
        return _status_result(response.json(), "refund_id")

    def build_query_refund(self, request: ChannelRequest) -> HttpCall:
        return HttpCall("GET", f"/refunds/{quote(request.reference, safe='')}")

    def read_query_refund(self, request: ChannelRequest,
                          response: httpx.Response) -> ChannelResult:
        return _status_result(response.json(), "refund_id")

    def read_refusal(self, operation: Operation, request: ChannelRequest,
                     response: httpx.Response) -> ChannelResult:
        status = response.status_code
        if operation in ("query", "query_refund") and status == 404 \
                and "not_found" in (response_code(response), _json_status(response)):
            return ChannelResult.not_found()
        if operation == "submit" and status == 422:
            return self.refusal(operation, response, Outcome.REJECTED)
        return super().read_refusal(operation, request, response)

    def parse_callback(self, headers: Mapping[str, str], body: bytes) -> Callback:
        """A webhook's notice, once its ``X-Signature`` is checked; ``ValueError``
        (``CallbackRejected`` through the router) for a bad signature or body."""
        if self._secret is None:
            raise ValueError("no callback secret configured (the secret option)")
        if not signed(self._secret, headers, body, self.SIGNATURE_HEADER):
            raise ValueError("bad signature")
        try:
            data = json.loads(body)
            reference = data["reference"]
            result = _status_result(data, "payment_id")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError("malformed callback") from exc
        if not isinstance(reference, str) or not reference:
            raise ValueError("malformed callback: no reference")
        if result.outcome is Outcome.UNKNOWN:
            raise ValueError(f"callback status {data.get('status')!r} settles nothing")
        return Callback(reference, result)


def _json_status(response: httpx.Response) -> object:
    try:
        data = response.json()
    except ValueError:
        return None
    return data.get("status") if isinstance(data, dict) else None


def _status_result(data: object, id_field: str) -> ChannelResult:
    """A gateway's ``{"status": ...}`` body as an answer."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    status = data.get("status")
    outcome = _STATUS_OUTCOMES.get(status) if isinstance(status, str) else None
    code = data.get("code")
    code = str(code) if isinstance(code, str | int) and not isinstance(code, bool) else None
    if outcome is Outcome.SUCCEEDED:
        given = data.get(id_field)
        return ChannelResult.succeeded(None if given is None else str(given))
    if outcome is Outcome.DECLINED:
        return ChannelResult.declined(code or "declined")
    if outcome is Outcome.REJECTED:
        return ChannelResult.rejected(code or "rejected")
    if status in ("pending", "processing"):
        return ChannelResult.unknown(str(status), "the gateway has not finished it")
    return ChannelResult.unknown("unexpected_status", f"status {status!r}")
