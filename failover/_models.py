"""Value objects: what goes in (``Repayment``), what a channel answers, what comes out."""

from __future__ import annotations

import dataclasses
import enum
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from failover._currencies import MINOR_UNITS

JSONScalar = str | int | float | bool | None


class Outcome(enum.StrEnum):
    """How one channel call ended (see the table in DESIGN §1)."""

    SUCCEEDED = "succeeded"
    """The channel collected the money."""
    DECLINED = "declined"
    """The channel refused without collecting; the next channel may be tried."""
    REJECTED = "rejected"
    """The repayment must not be tried anywhere: it fails."""
    UNAVAILABLE = "unavailable"
    """The channel certainly did not collect (down, maintenance, rate limited)."""
    UNKNOWN = "unknown"
    """The channel may have collected; never fail over before this is resolved."""
    NOT_FOUND = "not_found"
    """Answer to a status query: the channel holds no such request."""

    @property
    def is_definitive(self) -> bool:
        """True for answers that settle whether money was collected."""
        return self in _DEFINITIVE


_DEFINITIVE = frozenset({Outcome.SUCCEEDED, Outcome.DECLINED, Outcome.REJECTED, Outcome.NOT_FOUND})


SETTLING_SUBMIT_OUTCOMES = frozenset(
    {Outcome.SUCCEEDED, Outcome.DECLINED, Outcome.REJECTED, Outcome.UNAVAILABLE}
)
"""Submit answers that prove what happened to the attempt (DESIGN §1).

``UNKNOWN`` may have collected; ``NOT_FOUND`` means nothing as a submit answer (it
answers status queries): both leave the attempt in doubt, as does no answer at all.
"""


def attempt_in_doubt(outcome: Outcome | None, resolution: Outcome | None) -> bool:
    """The one definition of "in doubt": the attempt may have collected and neither
    its own submit answer nor a journaled resolution proved what happened.

    Every journal applies this rule (the SQLite one builds its SQL from
    ``SETTLING_SUBMIT_OUTCOMES``), and so does everything that reads attempts.
    """
    return resolution is None and outcome not in SETTLING_SUBMIT_OUTCOMES


class RepaymentStatus(enum.StrEnum):
    """Where a repayment stands."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class PendingReason(enum.StrEnum):
    """Why a repayment is ``PENDING``."""

    IN_FLIGHT = "in_flight"
    """The router is working on it now (or was, when a process stopped)."""
    AWAITING_CHANNEL = "awaiting_channel"
    """A channel's outcome is unknown; ``reconcile()`` asks it again."""


def _mask(value: str) -> str:
    """Keep the last four characters of an account number, star the rest."""
    if len(value) <= 4:
        return "*" * len(value)
    return "*" * (len(value) - 4) + value[-4:]


def _checked_identifier(field: str, value: str) -> str:
    """Refuse a blank value or one holding a control character (Unicode category Cc)."""
    if not value.strip():
        raise ValueError(f"{field} must not be blank")
    for position, char in enumerate(value):
        if unicodedata.category(char) == "Cc":
            raise ValueError(
                f"{field} must not contain control characters"
                f" (found {char!r} at position {position})"
            )
    return value


class Repayment(BaseModel):
    """One repayment to collect, identified by ``key`` (the idempotency key).

    Validated on construction; a bad field raises ``pydantic.ValidationError``
    naming it, before anything is written.

    ``key`` and ``account`` are identifiers: they are stored, compared and sent
    exactly as given, never stripped or case-folded (``" k1 "`` and ``"k1"`` are
    two repayments; ``get(" k1 ")`` finds the first).  Both are refused when empty,
    blank (only whitespace: almost surely a missing value), longer than 200
    characters, or holding a control character (``\\n``, ``\\t``, ``\\x00``, any
    Unicode category Cc), which cannot be told apart in logs or may be cut by the
    systems a key passes through.  Other invisible characters (category Cf, such as
    a zero-width space) are accepted, exactly as given.  ``currency`` is a code,
    not an identifier: it is stripped and upper-cased (``" cny"`` is ``"CNY"``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(min_length=1, max_length=200)
    account: str = Field(min_length=1, max_length=200)
    amount: Decimal
    currency: str
    due_at: datetime | None = None
    metadata: dict[str, JSONScalar] = Field(default_factory=dict)

    @field_validator("amount", mode="before")
    @classmethod
    def _no_floats(cls, value: Any) -> Any:
        # A float such as 0.1 has no exact decimal value; money comes as str, int or Decimal.
        if isinstance(value, float):
            raise ValueError("amount must be a Decimal, int or string, not a float")
        return value

    @field_validator("key", "account")
    @classmethod
    def _identifier(cls, value: str, info: ValidationInfo) -> str:
        assert info.field_name is not None
        return _checked_identifier(info.field_name, value)

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        code = value.strip().upper()
        if code not in MINOR_UNITS:
            raise ValueError(f"unknown ISO 4217 currency code {value!r}")
        return code

    @field_validator("amount")
    @classmethod
    def _positive_finite(cls, value: Decimal) -> Decimal:
        if not value.is_finite():
            raise ValueError("amount must be a finite number")
        if value <= 0:
            raise ValueError("amount must be positive")
        return value

    @field_validator("due_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.utcoffset() is None:
            raise ValueError("due_at must be timezone-aware")
        return value

    def model_post_init(self, __context: Any) -> None:
        places = MINOR_UNITS[self.currency]
        exponent = self.amount.as_tuple().exponent
        assert isinstance(exponent, int)  # finite, checked above
        if -exponent > places:
            # Raised through pydantic so callers see one error type naming the field.
            from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

            error = PydanticCustomError(
                "amount_precision",
                "amount {amount} has more decimal places than {currency} allows ({places})",
                {"amount": str(self.amount), "currency": self.currency, "places": places},
            )
            details: list[InitErrorDetails] = [
                {"type": error, "loc": ("amount",), "input": str(self.amount)}
            ]
            raise ValidationError.from_exception_data(type(self).__name__, details)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, _mask(value) if name == "account" and isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class ChannelRequest:
    """What an adapter receives: one repayment on one channel.

    ``reference`` is the same for this repayment on this channel across retries,
    restarts and instances: idempotent channels deduplicate on it, ``query`` finds by it.
    """

    repayment_key: str
    reference: str
    account: str = field(repr=False)
    amount: Decimal
    currency: str
    metadata: Mapping[str, JSONScalar] = field(default_factory=dict)

    @property
    def masked_account(self) -> str:
        """The account with all but its last four characters hidden, for logs."""
        return _mask(self.account)


@dataclass(frozen=True, slots=True)
class ChannelResult:
    """What an adapter answers; build it with the named constructors."""

    outcome: Outcome
    channel_reference: str | None = None
    code: str | None = None
    detail: str | None = None

    @classmethod
    def succeeded(cls, channel_reference: str | None = None) -> Self:
        return cls(Outcome.SUCCEEDED, channel_reference=channel_reference)

    @classmethod
    def declined(cls, code: str = "declined", detail: str | None = None) -> Self:
        return cls(Outcome.DECLINED, code=code, detail=detail)

    @classmethod
    def rejected(cls, code: str = "rejected", detail: str | None = None) -> Self:
        return cls(Outcome.REJECTED, code=code, detail=detail)

    @classmethod
    def unavailable(cls, code: str = "unavailable", detail: str | None = None) -> Self:
        return cls(Outcome.UNAVAILABLE, code=code, detail=detail)

    @classmethod
    def unknown(cls, code: str = "unknown", detail: str | None = None) -> Self:
        return cls(Outcome.UNKNOWN, code=code, detail=detail)

    @classmethod
    def not_found(cls) -> Self:
        return cls(Outcome.NOT_FOUND, code="not_found")


@dataclass(frozen=True, slots=True)
class Attempt:
    """One submit to one channel, as journaled.

    ``outcome`` is what the call answered: ``None`` while it is in the air or
    when a crash lost the answer, until a status query resolves it (it then reads
    ``UNKNOWN`` with code ``interrupted``).  ``resolution`` is what a status query
    or a definitive resubmit with the same reference proved about an attempt in
    doubt (one whose submit answer was none, ``UNKNOWN`` or ``NOT_FOUND``).
    """

    channel: str
    reference: str
    outcome: Outcome | None
    code: str | None
    started_at: datetime
    finished_at: datetime | None
    detail: str | None = None
    resolution: Outcome | None = None
    round: int = 1
    channel_reference: str | None = None

    @property
    def in_doubt(self) -> bool:
        """True while this attempt may have collected and nothing proved otherwise
        (see ``attempt_in_doubt``)."""
        return attempt_in_doubt(self.outcome, self.resolution)


@dataclass(frozen=True, slots=True)
class Skip:
    """A channel the router passed over for a repayment, and why (journaled with the
    repayment's ending, for the evidence report)."""

    channel: str
    reason: str
    """``disabled``, ``limits``, ``maintenance``, ``paused`` (the adapter's
    ``paused_for``), ``breaker_open``, ``retry_budget`` or ``ineligible``."""
    at: datetime
    round: int = 1


@dataclass(frozen=True, slots=True)
class Correction:
    """A journaled change of a terminal repayment, backed by a channel's answer: the
    ending it replaced is kept here (DESIGN §4, invariant 4)."""

    at: datetime
    reason: str
    """``late_collection``: a channel collected after the repayment ended."""
    old_status: RepaymentStatus
    old_channel: str | None
    old_channel_reference: str | None
    old_code: str | None
    new_status: RepaymentStatus
    new_channel: str | None
    new_channel_reference: str | None
    reference: str | None = None
    """The reference of the collection the correction rests on."""
    evidence: str | None = None
    """What proved it: ``query`` (a status query) or ``callback`` (a provider's notice)."""


class LateState(enum.StrEnum):
    """Where the watch over one attempt that might still collect stands."""

    WATCHING = "watching"
    """Settled as not collected (``NOT_FOUND``, or never answered): re-queried on schedule."""
    COLLECTED = "collected"
    """A channel collected under this reference after all (a late collection)."""
    CLEARED = "cleared"
    """Still not collected at the end of the schedule: no longer watched."""


class RefundState(enum.StrEnum):
    """Where the reversal of a second collection stands."""

    DUE = "due"
    SENT = "sent"
    """Journaled, then asked of the channel; no answer yet (or the process stopped)."""
    UNKNOWN = "unknown"
    """The channel's answer was lost: resolved by a query before anything else."""
    REFUNDED = "refunded"
    MANUAL = "manual"
    """On the manual-refund list: the channel cannot refund, or refused."""


@dataclass(frozen=True, slots=True)
class LateCheck:
    """One reference of a repayment that may still collect late, as the journal watches it.

    Made when a repayment ends, for each attempt settled by ``NOT_FOUND`` or never
    answered; ``state`` says whether money turned up, ``refund`` whether it was given back.
    """

    key: str
    channel: str
    reference: str
    round: int
    state: LateState
    checks: int = 0
    next_at: datetime | None = None
    found_at: datetime | None = None
    found_by: str | None = None
    channel_reference: str | None = None
    refund: RefundState | None = None
    refund_reference: str | None = None
    refund_code: str | None = None
    refund_at: datetime | None = None

    @property
    def collected(self) -> bool:
        return self.state is LateState.COLLECTED


@dataclass(frozen=True, slots=True)
class RepaymentResult:
    """Where a repayment stands, with every attempt made for it."""

    key: str
    status: RepaymentStatus
    channel: str | None
    channel_reference: str | None
    attempts: tuple[Attempt, ...]
    amount: Decimal
    currency: str
    code: str | None = None
    """Why it failed (``deadline``, ``no_eligible_channel``, a channel's code) or is pending."""
    pending_reason: PendingReason | None = None
    pending_channel: str | None = None
    round: int = 1
    created_at: datetime | None = None
    updated_at: datetime | None = None
    corrections: tuple[Correction, ...] = ()
    """Journaled changes of its ending, oldest first (the first keeps the original)."""
    late: tuple[LateCheck, ...] = ()
    """Late collections found for it and their refunds (filled by ``Router.get``)."""

    @property
    def is_terminal(self) -> bool:
        return self.status is not RepaymentStatus.PENDING


@dataclass(frozen=True, slots=True)
class Callback:
    """A provider's asynchronous notice about one request, as an adapter's
    ``parse_callback`` reads it from a webhook (after checking its signature)."""

    reference: str
    result: ChannelResult


MAX_OVERRIDE_S = 366 * 86400.0
"""The longest an operator's switch may last: every switch ends by itself."""


@dataclass(frozen=True, slots=True)
class Override:
    """An operator's switch of one channel, shared by every instance through the journal
    and over by itself at ``until``: ``enabled=False`` takes the channel out (whatever
    its config says), ``enabled=True`` puts a channel the config disables back in."""

    channel: str
    enabled: bool
    until: datetime
    reason: str
    by: str
    at: datetime

    def active(self, now: datetime) -> bool:
        return now < self.until


_SEPARATORS = re.compile(r"[\s.\-]")


def scrubbed(result: ChannelResult, account: str) -> ChannelResult:
    """``result`` with the account masked wherever an adapter put it (an exception's
    text, a provider's message), as written or grouped (``6222 0212 3456 7890``,
    ``62220212-34567890``): an answer is journaled, and the journal holds no account
    number but the repayment's own field (encrypted with a codec)."""
    texts = (result.detail, result.code)
    # Without its separators a text holding the account in any form holds it whole:
    # most answers are let through on that, without building a pattern.
    bare = _SEPARATORS.sub("", account)
    if len(account) < 4 or not any(text and bare in _SEPARATORS.sub("", text)
                                   for text in texts):
        return result
    # Each character of the account, with at most one space, dash or dot between two.
    pattern = re.compile(r"[\s.\-]?".join(re.escape(c) for c in account))
    if not any(text and pattern.search(text) for text in texts):
        return result
    masked = _mask(account)

    def mask(text: str | None) -> str | None:
        return None if text is None else pattern.sub(lambda _: masked, text)

    return dataclasses.replace(result, detail=mask(result.detail), code=mask(result.code))
