"""The channel set: lanes (a channel with its configuration and breaker), their
order, and eligibility, on one path for the router, ``Router.explain`` and the CLI."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from failover._channel import Channel, SyncRunner, check_channel, is_sync, runner_for
from failover._clock import Clock
from failover._eligibility import (
    BREAKER_OPEN,
    DISABLED,
    PAUSED,
    Eligibility,
    priority_order,
    refusal,
)
from failover._errors import ConfigError
from failover._flow import LanePlan
from failover._models import Override
from failover._policy import Breaker, Permit
from failover.config import ChannelConfig, RouterConfig
from failover.events import Hook


@dataclass(slots=True)
class Lane:
    """One channel with its configuration, breaker and (plain-``def`` adapters) threads."""

    channel: Channel
    config: ChannelConfig
    breaker: Breaker
    runner: SyncRunner | None
    """Set when ``submit`` is a plain ``def``."""
    query_runner: SyncRunner | None

    @property
    def name(self) -> str:
        return self.channel.name

    @property
    def idempotent(self) -> bool:
        return bool(getattr(self.channel, "idempotent", False))

    def spec(self) -> LanePlan:
        """What the repayment flow needs to know of this channel."""
        retry = self.config.retry
        return LanePlan(
            self.name, self.idempotent, retry.max_attempts,
            retry.initial_backoff_s, retry.max_backoff_s, self.config.settle_s,
        )


class Overrides:
    """Operators' channel switches as last read from the journal (``Override``), shared
    by every layout of a router: a reload keeps them, the journal changes them."""

    def __init__(self) -> None:
        self._by_channel: dict[str, Override] = {}

    def replace(self, overrides: Sequence[Override]) -> None:
        self._by_channel = {o.channel: o for o in overrides}

    def set(self, override: Override) -> None:
        self._by_channel[override.channel] = override

    def active(self, channel: str, now: datetime) -> Override | None:
        override = self._by_channel.get(channel)
        return override if override is not None and override.active(now) else None

    def __iter__(self) -> Iterator[Override]:
        return iter(list(self._by_channel.values()))


def _refusal(lane: Lane, overrides: Overrides, amount: Decimal, currency: str,
             now: Callable[[], datetime]) -> tuple[str, str] | None:
    """The configuration's refusal, as an operator's switch changes it, then the
    channel's own pause."""
    ruled_out = _configured(lane, overrides, amount, currency, now)
    if ruled_out is not None:
        return ruled_out
    # An adapter may say it must not be called for a while (the httpx kit after a
    # Retry-After): passed over without a call, so nothing counts against its breaker.
    paused = paused_for(lane.channel)
    if paused > 0:
        return PAUSED, f"the channel asked for a pause: {paused:.1f}s left"
    return None


def paused_for(channel: Channel) -> float:
    """The seconds an adapter's optional ``paused_for`` says it must not be called (0
    if it has none, or if reading it fails: a pause is advice, never a reason to lose a
    call's answer)."""
    try:
        paused = getattr(channel, "paused_for", None)
    except Exception:
        return 0.0
    return float(paused) if isinstance(paused, int | float) and paused > 0 else 0.0


def _configured(lane: Lane, overrides: Overrides, amount: Decimal, currency: str,
                now: Callable[[], datetime]) -> tuple[str, str] | None:
    if overrides._by_channel:  # the usual case has none: no clock read, no copy
        override = overrides.active(lane.name, now())
        if override is not None:
            if not override.enabled:
                return DISABLED, (f"by {override.by} until {override.until.isoformat()}:"
                                  f" {override.reason}")
            config = lane.config.model_copy(update={"enabled": True})
            return refusal(config, amount, currency, now)
    return refusal(lane.config, amount, currency, now)


@dataclass(slots=True)
class Layout:
    """A configuration and its lanes in priority order: what ``reconfigure`` swaps.

    A repayment is driven under the layout it started with; lanes are named, never
    compared by identity, so a reload between two steps cannot make a channel vanish."""

    config: RouterConfig
    lanes: dict[str, Lane] = field(default_factory=dict)
    order: tuple[str, ...] = ()
    specs: dict[str, LanePlan] = field(default_factory=dict)
    overrides: Overrides = field(default_factory=Overrides)

    def refusal(self, name: str, amount: Decimal, currency: str, clock: Clock) -> str | None:
        """Why channel ``name`` cannot take this money now (configuration or breaker)."""
        lane = self.lanes[name]
        ruled_out = _refusal(lane, self.overrides, amount, currency, clock.now)
        if ruled_out is not None:
            return f"{ruled_out[0]}: {ruled_out[1]}"
        if not lane.breaker.admits():
            return BREAKER_OPEN
        return None

    def admit(
        self, name: str, amount: Decimal, currency: str, clock: Clock
    ) -> tuple[str | None, Permit | None]:
        """Eligibility and a breaker permit: (None, permit) or (why not, None)."""
        reason = self.refusal(name, amount, currency, clock)
        if reason is not None:
            return reason, None
        permit = self.lanes[name].breaker.acquire()
        if permit is None:
            return BREAKER_OPEN, None
        return None, permit

    def names_for(self, preference: Sequence[str] | None) -> tuple[str, ...]:
        """The pass order: the preference (restricted to known channels) or priority."""
        if preference is None:
            return self.order
        return tuple(name for name in preference if name in self.lanes)

    def alternatives(self, amount: Decimal, currency: str, clock: Clock,
                     preference: Sequence[str] | None = None) -> tuple[str, ...]:
        """Channels a borrower could pay through by hand now: eligible, breaker not open."""
        return tuple(v.channel for v in self.explain(amount, currency, clock, preference)
                     if v.eligible)

    def explain(
        self, amount: Decimal, currency: str, clock: Clock,
        preference: Sequence[str] | None = None,
    ) -> list[Eligibility]:
        verdicts = []
        for name in self.names_for(preference):
            lane = self.lanes[name]
            ruled_out = _refusal(lane, self.overrides, amount, currency, clock.now)
            if ruled_out is None and not lane.breaker.admits():
                ruled_out = (BREAKER_OPEN, f"circuit breaker {lane.breaker.state}")
            reason, detail = ruled_out if ruled_out else (None, None)
            verdicts.append(Eligibility(name, reason, detail))
        return verdicts


class ChannelSet:
    """The router's channels: builds layouts, keeps breakers across reloads."""

    def __init__(
        self, channels: Sequence[Channel], config: RouterConfig, clock: Clock,
        hooks: Sequence[Hook] = (),
    ) -> None:
        self._channels = list(channels)
        self._clock = clock
        self._hooks = hooks
        self.overrides = Overrides()
        self.layout = self._build(config, {})

    def _build(self, config: RouterConfig, breakers: Mapping[str, Breaker]) -> Layout:
        names: list[str] = []
        for channel in self._channels:
            check_channel(channel)
            if channel.name in names:
                raise ConfigError(f"two channels are named {channel.name!r}")
            names.append(channel.name)
        if not names:
            raise ConfigError("a router needs at least one channel")
        unknown = sorted(set(config.channels) - set(names))
        if unknown:
            raise ConfigError(
                f"configuration names channels the router does not have: {', '.join(unknown)}"
                f" (channels: {', '.join(names)})"
            )
        layout = Layout(config, overrides=self.overrides)
        for channel in self._channels:
            channel_config = config.channel(channel.name)
            breaker = breakers.get(channel.name)
            if breaker is None:
                breaker = Breaker(channel.name, channel_config.breaker, self._clock, self._hooks)
            else:
                breaker.reconfigure(channel_config.breaker)
            layout.lanes[channel.name] = Lane(
                channel, channel_config, breaker,
                self._runner(channel, "submit", channel_config),
                self._runner(channel, "query", channel_config),
            )
        layout.order = priority_order(config, names)
        layout.specs = {name: lane.spec() for name, lane in layout.lanes.items()}
        return layout

    def _runner(self, channel: Channel, method: str, config: ChannelConfig) -> SyncRunner | None:
        if not is_sync(getattr(channel, method)):
            return None
        return runner_for(channel.name, method, config.sync_workers)

    def reconfigure(self, config: RouterConfig) -> Layout:
        breakers = {name: lane.breaker for name, lane in self.layout.lanes.items()}
        self.layout = self._build(config, breakers)
        return self.layout

    def check_preference(self, channels: Sequence[str] | None) -> tuple[str, ...] | None:
        """A per-repayment preference as names, or ``ConfigError`` naming unknown ones."""
        if channels is None:
            return None
        if isinstance(channels, str):
            raise ConfigError("channels must be a list of channel names, not one string")
        names = tuple(channels)
        unknown = [name for name in names if name not in self.layout.lanes]
        if unknown:
            raise ConfigError(
                f"unknown channel name(s) in channels=: {', '.join(map(repr, unknown))}"
                f" (known: {', '.join(self.layout.order)})"
            )
        return tuple(dict.fromkeys(names))
