"""The failover scenarios: the same seeded traffic over three channels, with the primary
in trouble in a different way in each (and, in ``late``, money that arrives after the
answer)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from random import Random

from failover.testing import FaultProfile

HOUR = 3600.0
TROUBLE = (1200.0, 2400.0)  # the primary's bad 20 minutes, in the middle of the hour


@dataclass(frozen=True, slots=True)
class Change:
    """At ``at`` seconds, channel number ``channel`` (0 = primary) gets ``profile``."""

    at: float
    channel: int
    profile: FaultProfile


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    duration_s: float = HOUR
    trouble: tuple[float, float] | None = None
    """When the primary is in trouble: shaded in plots, the base of detect/recover times."""
    changes: tuple[Change, ...] = ()
    primary: FaultProfile | None = None
    """The primary's profile for the whole run, if not the baseline."""
    maintenance: tuple[float, float] | None = None
    """A one-off maintenance window for the primary, in the failover strategy's config."""
    crash_at: float | None = None
    """The service process dies here and restarts at once."""
    burst: tuple[float, int] | None = None
    """(moment, count): a batch job submits ``count`` more repayments at once."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    profiles: tuple[FaultProfile, ...] | None = None
    """Every channel's profile for the whole run (by priority; the last serves the rest),
    instead of the baselines."""
    refunds: tuple[bool, ...] | None = None
    """Which channels (by priority) offer ``refund``; ``None``: the router sees none."""
    horizon_s: float | None = None
    """The run goes on this long after the traffic (late collections land, the sweep
    works), and the money is measured net of refunds at the end of it."""
    sweep_every_s: float | None = None
    """The ``failover`` strategy calls ``router.sweep()`` this often (simulated seconds)."""
    strategies: tuple[str, ...] | None = None
    """The strategies compared, if not the three of ``STRATEGIES``."""


# Baselines: a healthy day still has some declines and the odd 503.
BASELINE = (
    FaultProfile(decline=0.02, unavailable=0.005, latency_s=0.3, jitter=0.5),
    FaultProfile(decline=0.02, unavailable=0.005, latency_s=0.6, jitter=0.5),
    FaultProfile(decline=0.10, unavailable=0.005, latency_s=0.4, jitter=0.5),
)
IDEMPOTENT = (False, True, False)
DOWN = FaultProfile(unavailable=1.0, latency_s=0.05)


def _during(profile: FaultProfile, window: tuple[float, float] = TROUBLE) -> tuple[Change, ...]:
    return (Change(window[0], 0, profile), Change(window[1], 0, BASELINE[0]))


def _flapping(period: float = 120.0) -> tuple[Change, ...]:
    changes = []
    t, down = TROUBLE[0], True
    while t < TROUBLE[1]:
        changes.append(Change(t, 0, DOWN if down else BASELINE[0]))
        t, down = t + period, not down
    changes.append(Change(TROUBLE[1], 0, BASELINE[0]))
    return tuple(changes)


# ``late``: a share of submits answers a timeout, is NOT_FOUND to status queries, and is
# applied by the provider's queue seconds to minutes later.  The primary and the card can
# refund (with faults: refused, answer lost after refunding or not, 503); the wallet has
# no refund API.  Borrowers are shorter of funds on the card and the wallet than on the
# primary, so some fail everywhere while their first collection is still queued.
LATE_SHARE = 0.04
LATE_PROFILES = (
    FaultProfile(decline=0.02, unavailable=0.005, late_apply_after_query=LATE_SHARE,
                 latency_s=0.3, jitter=0.5, refund_fail=0.03, refund_unknown_applied=0.05,
                 refund_unavailable=0.05),
    FaultProfile(decline=0.25, unavailable=0.005, late_apply_after_query=LATE_SHARE,
                 latency_s=0.6, jitter=0.5, refund_unknown_not_applied=0.05),
    FaultProfile(decline=0.40, unavailable=0.005, late_apply_after_query=LATE_SHARE,
                 latency_s=0.4, jitter=0.5),
)
LATE_REFUNDS = (True, True, False)
LATE_HOURS = 3
LATE_STRATEGIES = ("naive", "retry-only", "failover-no-sweep", "failover")


def _late_delays(hours: int = LATE_HOURS, every_s: float = 600.0) -> tuple[Change, ...]:
    """Every 10 minutes each channel's queue delay moves (log-uniform, 10 s to 15 min):
    a fixed draw, the same for every seed, so the seed changes only traffic and faults."""
    rng = Random("late-delays")
    changes = []
    for step in range(int(hours * HOUR / every_s)):
        for index, profile in enumerate(LATE_PROFILES):
            delay = round(10.0 * 90.0 ** rng.random(), 1)
            changes.append(Change(step * every_s, index,
                                  dataclasses.replace(profile, late_apply_after_s=delay)))
    return tuple(changes)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("steady", "steady state: every channel healthy, ordinary declines"),
    Scenario("outage", "primary hard outage for 20 minutes mid-run, then recovery",
             trouble=TROUBLE, changes=_during(DOWN)),
    Scenario("brownout", "primary slow for 20 minutes: most calls time out after collecting",
             trouble=TROUBLE,
             changes=_during(FaultProfile(latency_s=6.0, jitter=0.5, decline=0.02))),
    Scenario("flapping", "primary flaps down/up every 2 minutes for 20 minutes",
             trouble=TROUBLE, changes=_flapping()),
    Scenario("ambiguous", "primary times out on 20% of calls; half of those did collect",
             primary=FaultProfile(unknown_collected=0.10, unknown_not_collected=0.10,
                                  query_failure=0.2, decline=0.02, latency_s=0.3, jitter=0.5)),
    Scenario("declines", "primary declines 30% of borrowers (short of funds on that rail)",
             primary=FaultProfile(decline=0.30, latency_s=0.3, jitter=0.5)),
    Scenario("maintenance", "primary in a 20-minute maintenance window (down while in it)",
             trouble=TROUBLE, changes=_during(DOWN), maintenance=TROUBLE),
    Scenario("crash", "the process dies 2 s into a 300-repayment batch (primary answering"
             " in ~4 s) and restarts; the queue redelivers what was in flight",
             primary=FaultProfile(decline=0.02, latency_s=4.0, jitter=0.2),
             burst=(HOUR / 2 - 2.0, 300), crash_at=HOUR / 2),
    Scenario("late", f"{LATE_HOURS} hours; {LATE_SHARE:.0%} of submits on every channel time"
             " out, are NOT_FOUND to queries and collect 10 s to 15 min later; the wallet"
             " cannot refund; measured 2 h after the traffic",
             duration_s=LATE_HOURS * HOUR, profiles=LATE_PROFILES, refunds=LATE_REFUNDS,
             changes=_late_delays(), horizon_s=2 * HOUR, sweep_every_s=30.0,
             strategies=LATE_STRATEGIES),
)}
