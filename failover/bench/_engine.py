"""Run a scenario's traffic through each strategy on simulated time and measure it
against the simulated channels' ledgers."""

from __future__ import annotations

import asyncio
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from random import Random
from typing import Any

from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt, wait_exponential

from failover._eligibility import priority_order
from failover._models import ChannelRequest, ChannelResult, Outcome, Repayment
from failover._policy import invoke
from failover._router import Router
from failover.bench._loop import START, LoopClock, VirtualTimeLoop
from failover.bench._scenarios import BASELINE, IDEMPOTENT, Scenario
from failover.config import ChannelConfig, RouterConfig
from failover.events import BreakerOpened, Event
from failover.journal import MemoryJournal
from failover.testing import FaultProfile, MemoryLedger, SimulatedChannel, crash

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


class Recorded:
    """A channel wrapper that logs every submit, for detect/recover times and failovers."""

    def __init__(self, inner: SimulatedChannel, log: list[Call], clock: LoopClock) -> None:
        self.inner = inner
        self.name = inner.name
        self.idempotent = inner.idempotent
        self._log = log
        self._clock = clock

    async def submit(self, request: ChannelRequest) -> ChannelResult:
        started = self._clock.monotonic()
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

    async def settle(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """After the traffic, with channels healthy: the final state of every key."""
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
    """This library: Router with the given config on a journal that survives the crash."""

    name = "failover"

    def __init__(self, channels: Sequence[Recorded], config: RouterConfig,
                 clock: LoopClock) -> None:
        super().__init__(channels, config, clock)
        self.journal = MemoryJournal()
        self.failovers = 0
        self.breaker_opens = 0
        self._breaker_history: list[tuple[float, str]] = []
        self.router = self._router()

    def _router(self) -> Router:
        return Router(self.channels, self.journal, self.config, clock=self.clock,
                      hooks=[self._event])

    def _event(self, event: Event) -> None:
        if isinstance(event, BreakerOpened):
            self.breaker_opens += 1

    async def open(self) -> None:
        await self.router.open()

    async def repay(self, repayment: Repayment) -> tuple[str, str | None]:
        result = await self.router.repay(repayment)
        return result.status.value, result.channel

    async def crash(self) -> None:
        self._breaker_history += self.breaker_log()
        crash(self.router)
        await asyncio.sleep(0)
        self.router = self._router()  # breakers start closed again, as in a new process
        await self.router.open()

    async def settle(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        await self.router.wait_recovered()
        await self.router.reconcile()
        final = {}
        for key in keys:
            result = await self.router.get(key)
            final[key] = (result.status.value, result.channel) if result else ("missing", None)
        await self.router.close()
        return final

    def breaker_log(self) -> list[tuple[float, str]]:
        primary = self.channels[0].name
        return self._breaker_history + list(self.router.breaker(primary).transitions)


FACTORIES: dict[str, Callable[[Sequence[Recorded], RouterConfig, LoopClock], Strategy]] = {
    "naive": Naive, "retry-only": RetryOnly, "failover": Failover,
}


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
    ledger, log = MemoryLedger(), list[Call]()
    names = channel_names(config)
    sims = []
    for index, channel_name in enumerate(names):
        base = BASELINE[min(index, len(BASELINE) - 1)]
        if index == 0 and scenario.primary is not None:
            base = scenario.primary
        idempotent = config.channel(channel_name).options.get(
            "idempotent", IDEMPOTENT[min(index, len(IDEMPOTENT) - 1)])
        sims.append(SimulatedChannel(channel_name, base, seed=seed + index,
                                     idempotent=bool(idempotent), clock=clock,
                                     sleep=asyncio.sleep, ledger=ledger))
    channels = [Recorded(sim, log, clock) for sim in sims]
    strategy = FACTORIES[name](channels, scenario_config(config, scenario), clock)
    await strategy.open()

    def change(channel: int, profile: FaultProfile) -> None:
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

    for sim, base in zip(sims, BASELINE, strict=False):
        sim.profile = base.healed()
    settled = await strategy.settle([r.key for _, r in arrivals])
    final = {key: settled.get(key, (f.status, f.channel)) for key, f in finished.items()}
    metrics = measure(scenario, names[0], final, finished, ledger, log, pending_at_end)
    metrics["breaker_transitions"] = len(strategy.breaker_log())
    return StrategyRun(name, metrics, sorted(finished.values(), key=lambda f: f.arrival),
                       strategy.breaker_log())


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


def run_scenario(
    scenario: Scenario, config: RouterConfig, repayments: int, seed: int,
    strategies: Sequence[str] = STRATEGIES,
    progress: Callable[[str], None] | None = None,
) -> list[StrategyRun]:
    """Every strategy on the same seeded traffic, each on a fresh simulated-time loop."""
    arrivals = traffic(repayments, scenario.duration_s, seed, scenario.burst)
    runs = []
    for name in strategies:
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            runs.append(runner.run(run_strategy(name, scenario, config, arrivals, seed)))
        if progress is not None:
            progress(name)
    return runs
