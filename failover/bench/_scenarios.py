"""The failover scenarios: the same seeded traffic over three channels, with the primary
in trouble in a different way in each."""

from __future__ import annotations

from dataclasses import dataclass, field

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
)}
