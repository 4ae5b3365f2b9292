"""Typed configuration: channel priority, policies, limits and maintenance windows.

A TOML or YAML file and these models mirror each other (DESIGN §2,
"Configuration names").  Every ``*_s`` field is seconds as a float.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from datetime import datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Self, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

from failover._currencies import MINOR_UNITS
from failover._errors import ConfigError

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
CodeOutcome = Literal["succeeded", "declined", "rejected", "unavailable", "unknown"]
Fault = Literal["borrower", "channel"]
_WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_NAMES = {name: day for day in _WEEKDAYS for name in (day, {
    "mon": "monday", "tue": "tuesday", "wed": "wednesday", "thu": "thursday", "fri": "friday",
    "sat": "saturday", "sun": "sunday"}[day])}


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetryConfig(_Model):
    """Retries of the same channel after ``UNAVAILABLE`` (and ``UNKNOWN`` if idempotent)."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    """Calls in all, counting the first."""
    initial_backoff_s: float = Field(default=0.1, ge=0)
    max_backoff_s: float = Field(default=2.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be >= initial_backoff_s")
        return self


class BreakerConfig(_Model):
    """When a channel's circuit breaker opens and how long it stays open."""

    fail_max: int = Field(default=5, ge=1)
    reset_timeout_s: float = Field(default=30.0, gt=0)


class AmountLimits(_Model):
    """Amount bounds, inclusive."""

    min_amount: Decimal | None = Field(default=None, ge=0)
    max_amount: Decimal | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if (
            self.min_amount is not None
            and self.max_amount is not None
            and self.max_amount < self.min_amount
        ):
            raise ValueError(
                f"max_amount {self.max_amount} is below min_amount {self.min_amount}"
            )
        return self

    def refusal(self, amount: Decimal, currency: str) -> str | None:
        if self.min_amount is not None and amount < self.min_amount:
            return f"amount {amount} {currency} below min_amount {self.min_amount}"
        if self.max_amount is not None and amount > self.max_amount:
            return f"amount {amount} {currency} above max_amount {self.max_amount}"
        return None


class LimitsConfig(AmountLimits):
    """Which repayments a channel may take.

    ``min_amount``/``max_amount`` apply to every currency without an entry in
    ``amounts``; ``amounts.USD`` (say) sets the bounds for USD repayments.
    """

    currencies: tuple[str, ...] | None = None
    """ISO 4217 codes the channel accepts; ``None`` means any."""
    amounts: dict[str, AmountLimits] = Field(default_factory=dict)
    """Per-currency amount bounds, by ISO 4217 code."""

    @field_validator("amounts")
    @classmethod
    def _known_amount_codes(cls, value: dict[str, AmountLimits]) -> dict[str, AmountLimits]:
        upper = {code.upper(): limits for code, limits in value.items()}
        for code in upper:
            if code not in MINOR_UNITS:
                raise ValueError(f"unknown ISO 4217 currency code {code!r}")
        return upper

    @field_validator("currencies")
    @classmethod
    def _known(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        codes = tuple(code.upper() for code in value)
        for code in codes:
            if code not in MINOR_UNITS:
                raise ValueError(f"unknown ISO 4217 currency code {code!r}")
        return codes

    def refusal(self, amount: Decimal, currency: str) -> str | None:
        """Why this repayment is outside the limits, or ``None`` if it is inside."""
        if self.currencies is not None and currency not in self.currencies:
            return f"currency {currency} not accepted"
        bounds = self.amounts.get(currency)
        if bounds is not None:
            return bounds.refusal(amount, currency)
        return AmountLimits.refusal(self, amount, currency)


class MaintenanceWindow(_Model):
    """A window in which the channel is skipped.

    Weekly: ``start``/``end`` are times of day in ``timezone`` on ``weekdays``; an
    ``end`` before ``start`` crosses midnight (the part after midnight belongs to
    the day the window started).  One-off: ``start``/``end`` are date-times; one
    without a UTC offset is read in ``timezone``.  ``end`` is excluded.
    """

    weekdays: tuple[Weekday, ...] = _WEEKDAYS
    start: datetime | time
    end: datetime | time
    timezone: str = "UTC"

    @field_validator("weekdays", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(_DAY_NAMES.get(day.lower(), day) if isinstance(day, str) else day
                         for day in value)
        return value

    @field_validator("start", "end", mode="before")
    @classmethod
    def _moment(cls, value: Any) -> Any:
        # Parsed here so a bad value gets one message, not one per member of the union.
        if not isinstance(value, str):
            return value
        try:
            return time.fromisoformat(value) if len(value) <= 8 else datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is neither a time of day (HH:MM) nor an ISO 8601 date-time"
            ) from None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        one_off = isinstance(self.start, datetime)
        if one_off != isinstance(self.end, datetime):
            raise ValueError("start and end must both be times of day or both date-times")
        if one_off:
            if "weekdays" in self.model_fields_set:
                raise ValueError("weekdays apply to weekly windows, not to date-times")
            zone = ZoneInfo(self.timezone)
            for name in ("start", "end"):
                value = getattr(self, name)
                if value.utcoffset() is None:
                    object.__setattr__(self, name, value.replace(tzinfo=zone))
            if self.end <= self.start:  # type: ignore[operator]
                raise ValueError(f"end {self.end} is not after start {self.start}")
        elif self.start == self.end:
            raise ValueError("start and end are equal: the window would be empty")
        return self

    @property
    def one_off(self) -> bool:
        return isinstance(self.start, datetime)

    def describe(self) -> str:
        if isinstance(self.start, datetime):
            return f"{self.start.isoformat()} to {self.end.isoformat()}"
        days = ",".join(self.weekdays) if self.weekdays != _WEEKDAYS else "daily"
        return f"{days} {self.start:%H:%M}-{self.end:%H:%M} {self.timezone}"

    def contains(self, moment: datetime) -> bool:
        """True if ``moment`` (timezone-aware) falls inside this window."""
        if isinstance(self.start, datetime) and isinstance(self.end, datetime):
            return self.start <= moment < self.end
        assert isinstance(self.start, time)
        assert isinstance(self.end, time)
        local = moment.astimezone(ZoneInfo(self.timezone))
        clock = local.time().replace(tzinfo=None)
        today = _WEEKDAYS[local.weekday()]
        if self.start < self.end:
            return today in self.weekdays and self.start <= clock < self.end
        # Crosses midnight: the part after midnight belongs to the previous day's window.
        if clock >= self.start:
            return today in self.weekdays
        yesterday = _WEEKDAYS[(local - timedelta(days=1)).weekday()]
        return clock < self.end and yesterday in self.weekdays


BORROWER_CODES = frozenset({
    "insufficient_funds", "insufficient_balance", "account_frozen", "account_closed",
    "card_expired", "invalid_account", "limit_exceeded", "do_not_honor",
})
"""Decline codes that are the borrower's side when no ``[channels.X.codes]`` entry gives
them a ``fault`` (matched ignoring case): the money or the account was not there."""


class CodeRule(_Model):
    """What one provider code means (``[channels.X.codes]``): the outcome it gives an
    answer, and whose fault a decline with it is, for the evidence report.

    A file may give a plain outcome (``"51" = "declined"``) or a table
    (``"51" = { outcome = "declined", fault = "borrower" }``); either key of the table
    may be left out, not both.
    """

    outcome: CodeOutcome | None = None
    """The outcome an answer with this code gets; ``None`` keeps the adapter's."""
    fault: Fault | None = None
    """``borrower`` or ``channel``; ``None`` leaves it to ``BORROWER_CODES``."""

    @model_validator(mode="before")
    @classmethod
    def _plain_outcome(cls, value: Any) -> Any:
        # Refused here, not by the field, so that a bad plain value is reported at
        # codes.CODE (as before tables were allowed), not at codes.CODE.outcome.
        if isinstance(value, str):
            if value not in _CODE_OUTCOMES:
                raise PydanticCustomError("literal_error", "Input should be {expected}",
                                          {"expected": _CODE_OUTCOMES_TEXT})
            return {"outcome": value}
        if not isinstance(value, dict | CodeRule):
            raise PydanticCustomError(
                "code_rule_type",
                "Input should be an outcome ({expected}) or a table with outcome and/or fault",
                {"expected": _CODE_OUTCOMES_TEXT})
        return value

    @model_validator(mode="after")
    def _says_something(self) -> Self:
        if self.outcome is None and self.fault is None:
            raise ValueError("give outcome, fault or both")
        return self


_CODE_OUTCOMES: tuple[str, ...] = get_args(CodeOutcome)
_CODE_OUTCOMES_TEXT = (", ".join(repr(o) for o in _CODE_OUTCOMES[:-1])
                       + f" or {_CODE_OUTCOMES[-1]!r}")


class ChannelConfig(_Model):
    """Everything configurable about one channel."""

    priority: int | None = None
    """Lower runs first; channels without a priority follow, in the order given."""
    enabled: bool = True
    adapter: str | None = None
    """``"module:Class"``, used when the router is built from a file."""
    options: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float = Field(default=10.0, gt=0)
    """One call; past it the outcome is ``UNKNOWN``."""
    settle_s: float = Field(default=5.0, ge=0)
    """How long after a submit was sent a ``NOT_FOUND`` from a status query counts as
    proof that nothing was collected.  A request cut off by a timeout can still be in
    the network or in the provider's queue; a query made sooner than this is asked
    again once the time has passed (within the deadline), or the repayment waits
    ``PENDING``.  The default, 5 s, covers a congested network round trip and a
    provider's processing queue under load; raise it for a gateway known to queue
    longer (its documentation's "status may lag" figure)."""
    sync_workers: int = Field(default=8, ge=1)
    """Threads a plain-``def`` adapter may use at once.  Each such channel has its own
    pool: a channel whose calls hang cannot take threads from another channel, the
    journal or ``close()``.  A submit that finds every thread busy is ``UNAVAILABLE``
    (``sync_workers_busy``): nothing was sent."""
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    limits: LimitsConfig = LimitsConfig()
    maintenance: tuple[MaintenanceWindow, ...] = ()
    codes: dict[str, CodeRule] = Field(default_factory=dict)
    """Provider code -> outcome and fault, so operators can classify codes without code
    changes.  A code without an outcome keeps the one the adapter gave (an unrecognised
    error is ``unknown``, never a failure)."""

    @property
    def outcome_map(self) -> dict[str, str]:
        """Provider code -> outcome name, for the codes that set an outcome."""
        return {code: rule.outcome for code, rule in self.codes.items()
                if rule.outcome is not None}

    def fault_of(self, code: str | None) -> Fault | None:
        """Whose side a decline with ``code`` is: the ``fault`` its ``codes`` entry gives,
        else ``"borrower"`` for the ``BORROWER_CODES``, else ``None`` (unclassified)."""
        if code is None:
            return None
        rule = self.codes.get(code)
        if rule is not None and rule.fault is not None:
            return rule.fault
        return "borrower" if code.lower() in BORROWER_CODES else None

    @field_validator("adapter")
    @classmethod
    def _adapter_form(cls, value: str | None) -> str | None:
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError(f"adapter must look like 'package.module:Class', got {value!r}")
        return value


class RetryBudgetConfig(_Model):
    """Caps retries router-wide so a failing channel cannot multiply traffic.

    Retries are allowed while they stay under ``ratio`` of the calls made in the
    last ``window_s``, plus ``min_per_s`` per second so light traffic can always retry.
    """

    ratio: float = Field(default=0.2, ge=0)
    min_per_s: float = Field(default=10.0, ge=0)
    window_s: float = Field(default=10.0, gt=0)


class LateConfig(_Model):
    """When the background loop looks again for money that arrived late.

    Each attempt settled by ``NOT_FOUND`` or never answered is re-queried ``checks_s``
    seconds after its repayment ended (by default after 1 minute, 1 hour and 1 day);
    the last one is the horizon, after which it is no longer watched.  An empty list
    turns the re-queries off (collections proven otherwise are still settled)."""

    checks_s: tuple[float, ...] = (60.0, 3600.0, 86400.0)
    retry_s: float = Field(default=60.0, gt=0)
    """When a check or a refund that proved nothing (channel down, unknown answer) is
    tried again."""

    @field_validator("checks_s")
    @classmethod
    def _ascending(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(v < 0 for v in value):
            raise ValueError("checks_s must not be negative")
        if list(value) != sorted(value):
            raise ValueError("checks_s must be in ascending order")
        return value


class RemindersConfig(_Model):
    """``failover.repayment.at_risk`` events before a repayment's ``due_at``."""

    at_risk_s: tuple[float, ...] = ()
    """Seconds before ``due_at`` at which a repayment not yet collected is reported at
    risk, once per threshold (e.g. ``[86400, 7200]``: a day and two hours before)."""

    @field_validator("at_risk_s")
    @classmethod
    def _positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(v <= 0 for v in value):
            raise ValueError("at_risk_s must be positive")
        return value


class RouterConfig(_Model):
    """The router's configuration: a pass deadline and per-channel settings."""

    deadline_s: float = Field(default=30.0, gt=0)
    """Bounds one pass over the channels for one repayment."""
    channels: dict[str, ChannelConfig] = Field(default_factory=dict)
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    late: LateConfig = LateConfig()
    reminders: RemindersConfig = RemindersConfig()

    @model_validator(mode="after")
    def _distinct_priorities(self) -> Self:
        clash = _priority_clash({name: c.priority for name, c in self.channels.items()})
        if clash is not None:
            raise ValueError(clash)
        return self

    def channel(self, name: str) -> ChannelConfig:
        """The config of ``name``, or the defaults if the file does not mention it."""
        return self.channels.get(name) or ChannelConfig()

    @classmethod
    def load(cls, path: str | Path, *, environ: Mapping[str, str] | None = None) -> RouterConfig:
        """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file, then apply
        ``FAILOVER_*`` environment variables on top of it (see ``env_overrides``).

        Raises ``ConfigError`` naming the file, the key path and the bad value.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        data: Any
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ConfigError(
                    f"{path}: reading YAML needs PyYAML: pip install 'failover[yaml]'"
                ) from exc
            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(exc, "problem", None) or "cannot parse"
                raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from exc
        else:
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a table of settings at the top level")
        env = os.environ if environ is None else environ
        overrides = env_overrides(env)
        if not overrides:
            return cls.from_mapping(data, source=str(path))
        data = _merge(data, overrides)

        def blame(loc: tuple[int | str, ...]) -> str:
            # A bad value is reported where it came from: the variable, or the file.
            name = _env_variable(env, loc)
            if name is not None:
                return f"environment variable {name}"
            return str(path) if loc else f"{path} (with FAILOVER_ environment overrides)"

        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_every_problem(exc, data, str(path), blame)) from exc

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, source: str = "config") -> RouterConfig:
        """Validate a plain mapping (as parsed from a file); errors become ``ConfigError``."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_every_problem(exc, data, source)) from exc


def _priority_clash(priorities: Mapping[str, object]) -> str | None:
    seen: dict[object, str] = {}
    for name, priority in priorities.items():
        if priority is None or isinstance(priority, bool) or not isinstance(priority, int):
            continue
        if priority in seen:
            return f"channels {seen[priority]!r} and {name!r} share priority {priority}"
        seen[priority] = name
    return None


def _every_problem(
    exc: ValidationError, data: Any, source: str,
    blame: Callable[[tuple[int | str, ...]], str] | None = None,
) -> str:
    """Every problem in a file: pydantic skips the checks across fields (two channels
    with one priority) once a field is invalid, so they are run again on the raw data."""
    message = format_validation_error(exc, source, blame)
    channels = data.get("channels") if isinstance(data, dict) else None
    if isinstance(channels, dict):
        clash = _priority_clash({name: c.get("priority") for name, c in channels.items()
                                 if isinstance(c, dict)})
        if clash is not None and clash not in message:
            where = blame(()) if blame is not None else source
            message += f"\n{where}: {clash}"
    return message


class _EnvShape(BaseSettings):
    """The top-level keys environment variables may set (values are validated later)."""

    model_config = SettingsConfigDict(extra="ignore")

    deadline_s: Any = None
    channels: dict[str, Any] = {}
    retry_budget: dict[str, Any] = {}
    late: dict[str, Any] = {}
    reminders: dict[str, Any] = {}


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from ``FAILOVER_*`` variables, nested by ``__``.

    ``FAILOVER_CHANNELS__AUTO_DEBIT__ENABLED=false`` gives
    ``{"channels": {"auto_debit": {"enabled": False}}}``.  Names are lower-cased,
    so channels meant to be set this way should have lower-case names.
    """
    source = EnvSettingsSource(
        _EnvShape, case_sensitive=False, env_prefix="FAILOVER_", env_nested_delimiter="__",
    )
    source.env_vars = {k.lower(): v for k, v in environ.items()
                       if k.upper().startswith("FAILOVER_")}
    try:
        values = source()
    except SettingsError as exc:
        # pydantic-settings names the field only: find the variable that fails alone.
        names = [k for k in environ if k.upper().startswith("FAILOVER_")]
        if len(names) > 1:
            for name in names:
                env_overrides({name: environ[name]})  # raises, naming it, if it fails alone
        table = ".".join(names[0].lower().removeprefix("failover_").split("__"))
        raise ConfigError(
            f"environment variable {', '.join(names)}: not valid JSON for the {table} table"
        ) from exc
    return {k: v for k, v in values.items() if v not in (None, {})}


def _env_variable(environ: Mapping[str, str], loc: tuple[int | str, ...]) -> str | None:
    """The ``FAILOVER_*`` variable that set the value at ``loc``, if one did."""
    if not loc:
        return None
    for name, value in environ.items():
        if not name.upper().startswith("FAILOVER_"):
            continue
        node: Any = env_overrides({name: value})
        for part in loc:
            if not isinstance(node, Mapping):
                break  # the variable set a whole value (JSON) that holds the bad part
            if str(part) not in node:
                node = None
                break
            node = node[str(part)]
        if node is not None:
            return name
    return None


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def format_validation_error(
    exc: ValidationError, source: str,
    blame: Callable[[tuple[int | str, ...]], str] | None = None,
) -> str:
    """One line per problem: ``source: key.path: message (got value)``; ``blame``
    gives the source of the value at a key path when sources differ."""
    lines = []
    for error in exc.errors():
        if blame is not None:
            source = blame(error["loc"])
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        got = error.get("input")
        quoted = isinstance(got, str) and repr(got) in message
        shown = "" if isinstance(got, dict) or quoted else f" (got {got!r})"
        lines.append(f"{source}: {where + ': ' if where else ''}{message}{shown}")
    return "\n".join(lines)
