"""Typed configuration: channel priority, policies, limits and maintenance windows.

A TOML or YAML file and these models mirror each other (DESIGN §2,
"Configuration names").  Every ``*_s`` field is seconds as a float.
"""

from __future__ import annotations

import tomllib
from datetime import datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from failover._currencies import MINOR_UNITS
from failover._errors import ConfigError

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


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


class LimitsConfig(_Model):
    """Which repayments a channel may take."""

    currencies: tuple[str, ...] | None = None
    """ISO 4217 codes the channel accepts; ``None`` means any."""
    min_amount: Decimal | None = Field(default=None, ge=0)
    max_amount: Decimal | None = Field(default=None, gt=0)

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
        """Why this repayment is outside the limits, or ``None`` if it is inside."""
        if self.currencies is not None and currency not in self.currencies:
            return f"currency {currency} not accepted"
        if self.min_amount is not None and amount < self.min_amount:
            return f"amount {amount} below min_amount {self.min_amount}"
        if self.max_amount is not None and amount > self.max_amount:
            return f"amount {amount} above max_amount {self.max_amount}"
        return None


class MaintenanceWindow(_Model):
    """A recurring weekly window in a named time zone; ``end`` before ``start`` crosses midnight."""

    weekdays: tuple[Weekday, ...] = _WEEKDAYS
    start: time
    end: time
    timezone: str = "UTC"

    @field_validator("weekdays", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(str(day).lower()[:3] if isinstance(day, str) else day for day in value)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if self.start == self.end:
            raise ValueError("start and end are equal: the window would be empty")
        return self

    def contains(self, moment: datetime) -> bool:
        """True if ``moment`` (timezone-aware) falls inside this window."""
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
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    limits: LimitsConfig = LimitsConfig()
    maintenance: tuple[MaintenanceWindow, ...] = ()


class RetryBudgetConfig(_Model):
    """Caps retries router-wide so a failing channel cannot multiply traffic.

    Retries are allowed while they stay under ``ratio`` of the calls made in the
    last ``window_s``, plus ``min_per_s`` per second so light traffic can always retry.
    """

    ratio: float = Field(default=0.2, ge=0)
    min_per_s: float = Field(default=10.0, ge=0)
    window_s: float = Field(default=10.0, gt=0)


class RouterConfig(_Model):
    """The router's configuration: a pass deadline and per-channel settings."""

    deadline_s: float = Field(default=30.0, gt=0)
    """Bounds one pass over the channels for one repayment."""
    channels: dict[str, ChannelConfig] = Field(default_factory=dict)
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()

    @model_validator(mode="after")
    def _distinct_priorities(self) -> Self:
        seen: dict[int, str] = {}
        for name, channel in self.channels.items():
            if channel.priority is None:
                continue
            if channel.priority in seen:
                raise ValueError(
                    f"channels {seen[channel.priority]!r} and {name!r} "
                    f"share priority {channel.priority}"
                )
            seen[channel.priority] = name
        return self

    def channel(self, name: str) -> ChannelConfig:
        """The config of ``name``, or the defaults if the file does not mention it."""
        return self.channels.get(name) or ChannelConfig()

    @classmethod
    def load(cls, path: str | Path) -> RouterConfig:
        """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file.

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
                raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        else:
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a table of settings at the top level")
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, source: str = "config") -> RouterConfig:
        """Validate a plain mapping (as parsed from a file); errors become ``ConfigError``."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from exc


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: key.path: message (got value)``."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        got = error.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {where}: {message}{shown}")
    return "\n".join(lines)
