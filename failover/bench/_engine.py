"""Run a scenario's traffic through each strategy on simulated time and measure it
against the simulated channels' ledgers."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from random import Random
from typing import Any

from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt, wait_exponential

from failover._eligibility import priority_order
from failover._models import (
    ChannelRequest,
    ChannelResult,
    Outcome,
    RefundState,
    Repayment,
    RepaymentResult,
    RepaymentStatus,
)
from failover._policy import invoke
from failover._router import Router
from failover.bench._loop import START, LoopClock, VirtualTimeLoop
from failover.bench._scenarios import BASELINE, IDEMPOTENT, Scenario
from failover.config import ChannelConfig, RouterConfig
from failover.events import BreakerOpened, Event
from failover.journal import MemoryJournal
from failover.testing import (
    Collection,
    FaultProfile,
    MemoryLedger,
    Refund,
    SimulatedChannel,
    audit,
    crash,
)

STRATEGIES = ("naive", "retry-only", "failover")

DEFAULT_CONFIG = RouterConfig.model_validate({
    "deadline_s": 30,
    "channels": {
        "auto_debit": {"priority": 1, "timeout_s": 5,
                       "breaker": {"fail_max": 5, "reset_timeout_s": 30}},
        "bank_card": {"priority": 2, "timeout_s": 5},
        "wallet": {"priority": 3, "timeout_s": 5},
    },
})


@dataclass(slots=True)
class Call:
    at: float
    channel: str
    key: str
    outcome: str


class TimedLedger(MemoryLedger):
    """A ledger that also notes when (simulated seconds) each collection and refund
    happened: the base of the time a late collection took to be made right."""

    def __init__(self, clock: LoopClock) -> None:
        super().__init__()
        self._clock = clock
        self.collected_at: list[tuple[float, Collection]] = []
        self.refunded_at: list[tuple[float, Refund]] = []

    def record(self, collection: Collection) -> None:
        super().record(collection)
        self.collected_at.append((self._clock.monotonic(), collection))

    def record_refund(self, refund: Refund) -> None:
        super().record_refund(refund)
        self.refunded_at.append((self._clock.monotonic(), refund))


class Recorded:
    """A channel wrapper that logs every submit, for detect/recover times and failovers.

    It offers ``refund``/``query_refund`` only when ``refunds`` is set and the channel
    has them (the router looks for the attribute).  On simulated time the provider's
    queue of late applications moves when it is due (a ``FakeClock`` would do this
    itself; the loop's clock needs a timer)."""

    refund: Any
    query_refund: Any

    def __init__(self, inner: SimulatedChannel, log: list[Call], clock: LoopClock,
                 refunds: bool = False) -> None:
        self.inner = inner
        self.name = inner.name
        self.idempotent = inner.idempotent
        self._log = log
        self._clock = clock
        if refunds and hasattr(inner, "refund"):
            self.refund = inner.refund
            self.query_refund = inner.query_refund

    async def submit(self, request: ChannelRequest) -> ChannelResult:
        started = self._clock.monotonic()
        profile = self.inner.profile
        if profile.late_apply_after_query:  # this submit may be queued: apply it on time
            asyncio.get_running_loop().call_at(started + profile.late_apply_after_s,
                                               self.inner.apply_due)
        try:
            result = await self.inner.submit(request)
        except BaseException as exc:
            self._log.append(Call(started, self.name, request.repayment_key,
                                  type(exc).__name__))
            raise
        self._log.append(Call(started, self.name, request.repayment_key, result.outcome.value))
        return result

    async def query(self, request: ChannelRequest) -> ChannelResult:
        return await self.inner.query(request)


# ---- strategies ------------------------------------------------------------------------------

class Strategy:
    name = "strategy"

    def __init__(self, channels: Sequence[Recorded], config: RouterConfig,
                 clock: LoopClock) -> None:
        self.channels = list(channels)
        self.config = config
        self.clock = clock

    def timeout(self, channel: Recorded) -> float:
        return self.config.channel(channel.name).timeout_s

    async def open(self) -> None:
        return None

    async def repay(self, repayment: Repayment) -> tuple[str, str | None]:
        raise NotImplementedError

    async def crash(self) -> None:
        """The process died: in-memory state is gone (the engine cancels the callers)."""

    async def horizon(self, until: float) -> None:
        """After the traffic: the run goes on to simulated second ``until``."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, until - loop.time()))

    async def settle(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """After the traffic (with channels healthy, unless the scenario has a horizon):
        the final state of every key."""
        return {}

    def breaker_log(self) -> list[tuple[float, str]]:
        return []


def _request(repayment: Repayment, reference: str) -> ChannelRequest:
    return ChannelRequest(repayment.key, reference, repayment.account, repayment.amount,
                          repayment.currency)


class Naive(Strategy):
    """On any error try the next channel; no journal, no breaker, no status query."""

    name = "naive"

    async def repay(self, repayment: Repayment) -> tuple[str, str | None]:
        for channel in self.channels:
            request = _request(repayment, f"{repayment.key}/{channel.name}")
            result = await invoke(channel.submit, request, self.timeout(channel))
            if result.outcome is Outcome.SUCCEEDED:
                return "succeeded", channel.name
            if result.outcome is Outcome.REJECTED:
                return "failed", None
        return "failed", None


class RetryOnly(Strategy):
    """Tenacity retries on the primary (same request id), no failover."""

    name = "retry-only"

    async def repay(self, repayment: Repayment) -> tuple[str, str | None]:
        primary = self.channels[0]
        request = _request(repayment, f"{repayment.key}/{primary.name}")
        policy = self.config.channel(primary.name).retry
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.max_attempts),
            wait=wait_exponential(multiplier=policy.initial_backoff_s, max=policy.max_backoff_s),
            retry=retry_if_result(lambda r: r.outcome in (Outcome.UNAVAILABLE, Outcome.UNKNOWN)),
            sleep=asyncio.sleep,
            retry_error_callback=lambda state: state.outcome.result(),  # type: ignore[union-attr]
        )
        result: ChannelResult = await retrying(invoke, primary.submit, request,
                                               self.timeout(primary))
        if result.outcome is Outcome.SUCCEEDED:
            return "succeeded", primary.name
        return "failed", None


class Failover(Strategy):
    """This library: Router with the given config on a journal that survives the crash.

    With ``sweep_every_s`` it calls ``router.sweep()`` that often on the simulated
    clock, as ``Router(background=True)`` or a scheduled job would: late collections are
    found, corrected and refunded."""

    name = "failover"

    def __init__(self, channels: Sequence[Recorded], config: RouterConfig,
                 clock: LoopClock, sweep_every_s: float | None = None) -> None:
        super().__init__(channels, config, clock)
        self.journal = MemoryJournal()
        self.failovers = 0
        self.breaker_opens = 0
        self._breaker_history: list[tuple[float, str]] = []
        self.router = self._router()
        self.sweep_every_s = sweep_every_s
        self.sweeps = 0
        self._sweeper: asyncio.Task[None] | None = None
        self.corrected_at: dict[str, list[tuple[float, str, str]]] = {}
        """Key -> (simulated second, old status, new status) of each correction."""
        self.manual: set[str] = set()
        """Keys on the manual-refund list at the end."""
        self.reconciled_at: float | None = None

    def _router(self) -> Router:
        return Router(self.channels, self.journal, self.config, clock=self.clock,
                      hooks=[self._event])

    def _event(self, event: Event) -> None:
        if isinstance(event, BreakerOpened):
            self.breaker_opens += 1

    async def open(self) -> None:
        await self.router.open()
        self._start_sweeping()

    def _start_sweeping(self) -> None:
        if self.sweep_every_s is not None:
            self._sweeper = asyncio.create_task(self._sweep_forever(self.sweep_every_s))

    async def _sweep_forever(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.router.sweep()
            self.sweeps += 1

    async def _stop_sweeping(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper  # a sweep that failed raises here

    async def repay(self, repayment: Repayment) -> tuple[str, str | None]:
        result = await self.router.repay(repayment)
        return result.status.value, result.channel

    async def crash(self) -> None:
        self._breaker_history += self.breaker_log()
        await self._stop_sweeping()
        crash(self.router)
        await asyncio.sleep(0)
        self.router = self._router()  # breakers start closed again, as in a new process
        await self.router.open()
        self._start_sweeping()

    async def horizon(self, until: float) -> None:
        await self.router.wait_recovered()
        await self.router.reconcile()
        self.reconciled_at = asyncio.get_running_loop().time()
        await super().horizon(until)

    async def settle(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        await self._stop_sweeping()
        await self.router.wait_recovered()
        await self.router.reconcile()
        final = {}
        for key in keys:
            result = await self.router.get(key)
            final[key] = (result.status.value, result.channel) if result else ("missing", None)
            if result is not None and result.corrections:
                self.corrected_at[key] = [
                    (seconds_since_start(c.at), c.old_status.value, c.new_status.value)
                    for c in result.corrections]
        self.manual = {c.key for c in await self.journal.late_checks(refund=RefundState.MANUAL)}
        await self.router.close()
        return final

    def breaker_log(self) -> list[tuple[float, str]]:
        primary = self.channels[0].name
        return self._breaker_history + list(self.router.breaker(primary).transitions)


Factory = Callable[[Sequence[Recorded], RouterConfig, LoopClock, Scenario], Strategy]
FACTORIES: dict[str, Factory] = {
    "naive": lambda channels, config, clock, _: Naive(channels, config, clock),
    "retry-only": lambda channels, config, clock, _: RetryOnly(channels, config, clock),
    "failover": lambda channels, config, clock, scenario: Failover(
        channels, config, clock, sweep_every_s=scenario.sweep_every_s),
    "failover-no-sweep": lambda channels, config, clock, _: Failover(channels, config, clock),
}


def seconds_since_start(moment: datetime) -> float:
    """The simulated second a wall time of the router's clock stands for."""
    return (moment - START).total_seconds()


# ---- traffic and runs ----------------------------------------------------------------------

def traffic(count: int, duration_s: float, seed: int,
            burst: tuple[float, int] | None = None) -> list[tuple[float, Repayment]]:
    """``count`` repayments arriving at seeded random moments over ``duration_s``, plus a
    batch of ``burst[1]`` arriving together at ``burst[0]``."""
    rng = Random(seed)
    arrivals = [(rng.uniform(0, duration_s), f"loan-{i:06d}") for i in range(count)]
    if burst is not None:
        arrivals += [(burst[0], f"batch-{i:06d}") for i in range(burst[1])]
    arrivals.sort()
    return [
        (at, Repayment(key=key, account=f"6222{rng.randrange(10**12):012d}",
                       amount=Decimal(rng.randrange(10_000, 500_000)).scaleb(-2),
                       currency="CNY"))
        for at, key in arrivals
    ]


@dataclass(slots=True)
class Finished:
    arrival: float
    done: float
    status: str
    channel: str | None


@dataclass(slots=True)
class StrategyRun:
    strategy: str
    metrics: dict[str, Any]
    timeline: list[Finished]
    breaker: list[tuple[float, str]] = field(default_factory=list)
    wronged: list[tuple[float, int]] = field(default_factory=list)
    """Scenarios with a horizon: (simulated second, borrowers wronged from then on):
    charged more than their status allows, or shown FAILED while their money was taken."""
    times_to_right: list[float] = field(default_factory=list)
    """Scenarios with a horizon: seconds from each wrong to the refund or correction."""
    final: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    """Key -> (status, channel) at the end of the run (after the horizon, if any)."""
    ledger: TimedLedger | None = None
    """What the channels really collected and gave back, with when."""


def channel_names(config: RouterConfig) -> list[str]:
    names = priority_order(config, list(config.channels))
    if len(names) < 2:
        raise ValueError("benchmarking failover needs a config with at least two channels")
    return list(names)


def scenario_config(config: RouterConfig, scenario: Scenario) -> RouterConfig:
    """The config, plus the scenario's maintenance window on the primary."""
    if scenario.maintenance is None:
        return config
    primary = channel_names(config)[0]
    start, end = (config_moment(t) for t in scenario.maintenance)
    current = config.channel(primary)
    window = {"start": start, "end": end}
    updated = ChannelConfig.model_validate({
        **current.model_dump(), "maintenance": [*current.model_dump()["maintenance"], window]})
    return config.model_copy(update={"channels": {**config.channels, primary: updated}})


def config_moment(seconds: float) -> str:
    """The wall time of a simulated moment, as the router's clock will read it."""
    return (START + timedelta(seconds=seconds)).isoformat()


async def run_strategy(
    name: str, scenario: Scenario, config: RouterConfig, arrivals: list[tuple[float, Repayment]],
    seed: int,
) -> StrategyRun:
    loop = asyncio.get_running_loop()
    clock = LoopClock(loop)
    ledger, log = TimedLedger(clock), list[Call]()
    names = channel_names(config)
    sims, refunds = [], []
    for index, channel_name in enumerate(names):
        base = BASELINE[min(index, len(BASELINE) - 1)]
        if scenario.profiles is not None:
            base = scenario.profiles[min(index, len(scenario.profiles) - 1)]
        if index == 0 and scenario.primary is not None:
            base = scenario.primary
        idempotent = config.channel(channel_name).options.get(
            "idempotent", IDEMPOTENT[min(index, len(IDEMPOTENT) - 1)])
        sims.append(SimulatedChannel(channel_name, base, seed=seed + index,
                                     idempotent=bool(idempotent), clock=clock,
                                     sleep=asyncio.sleep, ledger=ledger))
        refunds.append(scenario.refunds is not None
                       and scenario.refunds[min(index, len(scenario.refunds) - 1)])
    channels = [Recorded(sim, log, clock, refunds=can)
                for sim, can in zip(sims, refunds, strict=True)]
    strategy = FACTORIES[name](channels, scenario_config(config, scenario), clock, scenario)
    await strategy.open()

    def change(channel: int, profile: FaultProfile) -> None:
        if scenario.profiles is not None:  # a profile per channel: none for a missing one
            if channel < len(sims):
                sims[channel].profile = profile
            return
        sims[min(channel, len(sims) - 1)].profile = profile

    for step in scenario.changes:
        loop.call_at(step.at, change, step.channel, step.profile)

    finished: dict[str, Finished] = {}
    inflight: dict[str, asyncio.Task[None]] = {}
    arrived: dict[str, tuple[float, Repayment]] = {}

    async def caller(arrival: float, repayment: Repayment) -> None:
        status, channel = await strategy.repay(repayment)
        finished[repayment.key] = Finished(arrival, loop.time(), status, channel)

    def start(arrival: float, repayment: Repayment) -> None:
        task = asyncio.create_task(caller(arrival, repayment))
        inflight[repayment.key] = task
        task.add_done_callback(lambda done: _forget(inflight, repayment.key, done))

    async def crash_at(moment: float) -> None:
        await asyncio.sleep(moment - loop.time())
        await strategy.crash()
        victims = list(inflight.items())
        for _, task in victims:
            task.cancel()
        await asyncio.gather(*(t for _, t in victims), return_exceptions=True)
        for key, _ in victims:  # the queue redelivers what the dead process was doing
            start(*arrived[key])

    crasher = (asyncio.create_task(crash_at(scenario.crash_at))
               if scenario.crash_at is not None else None)
    for arrival, repayment in arrivals:
        await asyncio.sleep(max(0.0, arrival - loop.time()))
        arrived[repayment.key] = (arrival, repayment)
        start(arrival, repayment)
    if crasher is not None:
        await crasher
    while inflight:
        await asyncio.gather(*list(inflight.values()), return_exceptions=True)
    pending_at_end = sum(f.status == "pending" for f in finished.values())

    if scenario.horizon_s is None:
        for sim, base in zip(sims, BASELINE, strict=False):
            sim.profile = base.healed()
    else:  # the same channels go on: late collections land, refunds may fail
        await strategy.horizon(scenario.duration_s + scenario.horizon_s)
    settled = await strategy.settle([r.key for _, r in arrivals])
    final = {key: settled.get(key, (f.status, f.channel)) for key, f in finished.items()}
    metrics = measure(scenario, names[0], final, finished, ledger, log, pending_at_end)
    metrics["breaker_transitions"] = len(strategy.breaker_log())
    run = StrategyRun(name, metrics, sorted(finished.values(), key=lambda f: f.arrival),
                      strategy.breaker_log(), final=final, ledger=ledger)
    if scenario.horizon_s is not None:
        journal = strategy if isinstance(strategy, Failover) else None
        late = measure_late(
            {r.key: r for _, r in arrivals}, finished, final, ledger,
            corrected_at=journal.corrected_at if journal else {},
            manual=journal.manual if journal else set(),
            reconciled_at=journal.reconciled_at if journal else None,
            sweeps=journal.sweeps if journal else 0)
        run.wronged, run.times_to_right = late.pop("_wronged"), late.pop("_times_to_right")
        metrics.update(late)
    return run


def _forget(inflight: dict[str, asyncio.Task[None]], key: str, task: asyncio.Task[None]) -> None:
    if inflight.get(key) is task:  # a redelivered repayment has a new task under the key
        del inflight[key]


def percentile(values: Sequence[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]


def measure(
    scenario: Scenario, primary: str, final: dict[str, tuple[str, str | None]],
    finished: dict[str, Finished], ledger: MemoryLedger, log: list[Call], pending_at_end: int,
) -> dict[str, Any]:
    """The figures for one strategy on one scenario; money figures come from the ledger."""
    collected = Counter(c.repayment_key for c in ledger.collections())
    statuses = Counter(status for status, _ in final.values())
    latencies = [f.done - f.arrival for f in finished.values()]
    channels_by_key: dict[str, list[str]] = {}
    for call in sorted(log, key=lambda c: c.at):
        channels_by_key.setdefault(call.key, []).append(call.channel)
    detect = back = None
    if scenario.trouble is not None:
        start, end = scenario.trouble
        skipped = [finished[k].arrival for k, chans in channels_by_key.items()
                   if k in finished and finished[k].arrival >= start and chans[0] != primary]
        detect = min(skipped) - start if skipped else None
        recovered = [c.at for c in log if c.channel == primary and c.at >= end
                     and c.outcome == "succeeded"]
        back = min(recovered) - end if recovered else None
    calls = Counter(c.channel for c in log)
    return {
        "repayments": len(final),
        "succeeded": statuses["succeeded"],
        "failed": statuses["failed"],
        "pending": statuses["pending"],
        "pending_at_end_of_traffic": pending_at_end,
        "duplicates": sum(1 for n in collected.values() if n > 1),
        "lost": sum(1 for k, (status, _) in final.items() if status != "succeeded"
                    and collected[k] > 0),
        "false_successes": sum(1 for k, (status, _) in final.items()
                               if status == "succeeded" and collected[k] == 0),
        "latency_p50_s": percentile(latencies, 0.50),
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_p99_s": percentile(latencies, 0.99),
        "latency_mean_s": statistics.fmean(latencies) if latencies else None,
        "failovers": sum(1 for chans in channels_by_key.values() if len(set(chans)) > 1),
        "calls": dict(calls),
        "primary_calls_in_trouble": (
            sum(1 for c in log if c.channel == primary
                and scenario.trouble[0] <= c.at < scenario.trouble[1])
            if scenario.trouble else None),
        "time_to_detect_s": detect,
        "time_back_on_primary_s": back,
    }


LATE_METRICS = (
    "late_collections", "charged_twice", "refunds", "corrections", "manual",
    "refunded_twice", "refunded_only", "made_right", "time_to_right_p50_s",
    "time_to_right_max_s", "sweeps",
)


def measure_late(
    repayments: dict[str, Repayment], finished: dict[str, Finished],
    final: dict[str, tuple[str, str | None]], ledger: TimedLedger, *,
    corrected_at: dict[str, list[tuple[float, str, str]]], manual: set[str],
    reconciled_at: float | None, sweeps: int = 0,
) -> dict[str, Any]:
    """Money after the horizon, net of refunds, from the ledger (``audit``): what is
    left wrong, and how long each borrower wronged by a late collection stayed wronged.

    Replaces ``duplicates`` and ``lost`` with their net values (keys on the manual-refund
    list apart, as ``audit`` counts them).  A borrower is wronged from the moment the
    repayment has ended and the ledger holds more than its status allows (two
    collections for ``SUCCEEDED``, any for ``FAILED``) until a refund or a correction
    makes it right."""
    results = {
        key: RepaymentResult(key, RepaymentStatus(status) if status != "missing"
                             else RepaymentStatus.PENDING, channel, None, (),
                             repayments[key].amount, repayments[key].currency)
        for key, (status, channel) in final.items()
    }
    checked = audit(results, [ledger], manual=manual)
    # Per key: money moves (+1 collected, -1 refunded) and status changes, in time.
    moves: dict[str, list[tuple[float, int, str | None]]] = {}
    for at, c in ledger.collected_at:
        moves.setdefault(c.repayment_key, []).append((at, 1, None))
    for at, r in ledger.refunded_at:
        moves.setdefault(r.repayment_key, []).append((at, -1, None))
    late_collections = charged_twice = 0
    wrong_changes: list[tuple[float, int]] = []
    times: list[float] = []
    for key, events in moves.items():
        done = finished.get(key)
        if done is None:
            continue
        first_status = done.status
        ended_at = done.done
        corrections = corrected_at.get(key, [])
        if first_status == "pending":  # ended after the traffic, when reconciled
            ended_at = reconciled_at if reconciled_at is not None else done.done
            first_status = corrections[0][1] if corrections else final[key][0]
        timeline = sorted([*events, (ended_at, 0, first_status),
                           *((at, 0, new) for at, _, new in corrections)],
                          key=lambda e: e[0])
        late_collections += sum(1 for at, n, _ in events if n > 0 and at > ended_at)
        net = gross = 0
        status: str | None = None
        wrong_since: float | None = None
        index = 0
        while index < len(timeline):
            at = timeline[index][0]
            while index < len(timeline) and timeline[index][0] == at:  # one moment at once
                _, n, new_status = timeline[index]
                net += n
                gross += max(n, 0)
                status = new_status if new_status is not None else status
                index += 1
            allowed = 0 if status == "failed" else 1
            wrong = status is not None and net > allowed
            if wrong and wrong_since is None:
                wrong_since = at
                wrong_changes.append((at, 1))
            elif not wrong and wrong_since is not None:
                times.append(at - wrong_since)
                wrong_changes.append((at, -1))
                wrong_since = None
        charged_twice += gross > 1
    wronged, count = [], 0
    for at, delta in sorted(wrong_changes):
        count += delta
        wronged.append((at, count))
    return {
        "duplicates": len(checked.duplicates),
        "lost": len(checked.lost),
        "late_collections": late_collections,
        "charged_twice": charged_twice,
        "refunds": checked.refunds,
        "corrections": sum(len(c) for c in corrected_at.values()),
        "manual": len(manual),
        "refunded_twice": len(checked.refunded_twice),
        "refunded_only": len(checked.refunded_only),
        "made_right": len(times),
        "time_to_right_p50_s": statistics.median(times) if times else None,
        "time_to_right_max_s": max(times) if times else None,
        "sweeps": sweeps,
        "_wronged": wronged,
        "_times_to_right": sorted(times),
    }


def run_scenario(
    scenario: Scenario, config: RouterConfig, repayments: int, seed: int,
    strategies: Sequence[str] = STRATEGIES,
    progress: Callable[[str], None] | None = None,
) -> list[StrategyRun]:
    """Every strategy on the same seeded traffic, each on a fresh simulated-time loop.

    ``repayments`` arrive per simulated hour; a scenario with strategies of its own
    runs those unless others than the default ``STRATEGIES`` are asked for."""
    count = round(repayments * scenario.duration_s / 3600.0)
    arrivals = traffic(count, scenario.duration_s, seed, scenario.burst)
    runs = []
    names = scenario.strategies if scenario.strategies and strategies == STRATEGIES \
        else strategies
    for name in names:
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            runs.append(runner.run(run_strategy(name, scenario, config, arrivals, seed)))
        if progress is not None:
            progress(name)
    return runs
