"""Which channels may take a repayment now, and why the others may not.

Plain functions over configuration, shared by the router and ``failover channels``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from failover.config import ChannelConfig, RouterConfig

DISABLED = "disabled"
MAINTENANCE = "maintenance"
BREAKER_OPEN = "breaker_open"
PAUSED = "paused"
LIMITS = "limits"


@dataclass(frozen=True, slots=True)
class Eligibility:
    """One channel's eligibility for one repayment at one moment."""

    channel: str
    reason: str | None
    """``None`` if eligible; else ``disabled``, ``limits``, ``maintenance``, ``paused`` or
    ``breaker_open``."""
    detail: str | None = None

    @property
    def eligible(self) -> bool:
        return self.reason is None


def refusal(
    config: ChannelConfig, amount: Decimal, currency: str,
    now: datetime | Callable[[], datetime],
) -> tuple[str, str] | None:
    """Why the configuration rules the channel out, as (reason, detail), or ``None``.

    ``now`` may be a clock function: it is read only if the channel has windows.
    """
    if not config.enabled:
        return DISABLED, "enabled = false"
    limit = config.limits.refusal(amount, currency)
    if limit is not None:
        return LIMITS, limit
    if config.maintenance:
        moment = now() if callable(now) else now
        for window in config.maintenance:
            if window.contains(moment):
                return MAINTENANCE, window.describe()
    return None


def priority_order(config: RouterConfig, names: Iterable[str]) -> tuple[str, ...]:
    """Channel names by priority: configured priorities first (lower first), the rest
    in the order given."""
    indexed = list(enumerate(names))

    def rank(item: tuple[int, str]) -> tuple[int, int]:
        index, name = item
        priority = config.channel(name).priority
        return (0, priority) if priority is not None else (1, index)

    return tuple(name for _, name in sorted(indexed, key=rank))


def explain(
    config: RouterConfig,
    names: Iterable[str],
    amount: Decimal,
    currency: str,
    now: datetime,
    breakers_open: Mapping[str, bool] | None = None,
) -> list[Eligibility]:
    """Every channel in priority order with its eligibility for this repayment now."""
    verdicts = []
    for name in priority_order(config, names):
        ruled_out = refusal(config.channel(name), amount, currency, now)
        if ruled_out is None and breakers_open and breakers_open.get(name):
            ruled_out = (BREAKER_OPEN, "circuit breaker open")
        reason, detail = ruled_out if ruled_out else (None, None)
        verdicts.append(Eligibility(name, reason, detail))
    return verdicts
