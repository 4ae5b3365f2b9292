"""Failover benchmarks: the same seeded traffic through ``naive``, ``retry-only`` and
``failover`` strategies over simulated channels, on simulated time.

``failover bench`` is the command; ``run_bench`` is the same from Python, so users
can benchmark their own configuration.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from failover.bench._engine import (
    DEFAULT_CONFIG,
    STRATEGIES,
    StrategyRun,
    channel_names,
    run_scenario,
)
from failover.bench._loop import LoopClock, VirtualTimeLoop
from failover.bench._report import SCHEMA, document, plot, print_tables, write_json
from failover.bench._scenarios import SCENARIOS, Scenario
from failover.config import RouterConfig

__all__ = [
    "DEFAULT_CONFIG",
    "SCENARIOS",
    "SCHEMA",
    "STRATEGIES",
    "LoopClock",
    "Scenario",
    "StrategyRun",
    "VirtualTimeLoop",
    "plot",
    "print_tables",
    "run_bench",
    "write_json",
]


def run_bench(
    scenarios: Sequence[str] | None = None,
    *,
    config: RouterConfig | None = None,
    config_name: str | None = None,
    seed: int = 7,
    repayments: int = 2000,
    strategies: Sequence[str] = STRATEGIES,
    progress: Callable[[str, str], None] | None = None,
) -> tuple[dict[str, tuple[Scenario, list[StrategyRun]]], dict[str, Any]]:
    """Run scenarios (all by default); returns the runs and the JSON document."""
    names = list(scenarios or SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(unknown)}"
                         f" (known: {', '.join(SCENARIOS)})")
    config = config or DEFAULT_CONFIG
    channel_names(config)  # at least two channels
    started = time.perf_counter()
    results: dict[str, tuple[Scenario, list[StrategyRun]]] = {}
    for name in names:
        scenario = SCENARIOS[name]
        tick = (lambda strategy, n=name: progress(n, strategy)) if progress else None
        results[name] = (scenario, run_scenario(scenario, config, repayments, seed, strategies,
                                                tick))
    data = document(results, seed=seed, repayments=repayments, config=config_name,
                    elapsed_s=time.perf_counter() - started)
    return results, data


def write_outputs(results: dict[str, tuple[Scenario, list[StrategyRun]]],
                  data: dict[str, Any], out: Path) -> list[Path]:
    """bench.json, and the plots when matplotlib is installed."""
    written = [write_json(data, out)]
    with contextlib.suppress(ImportError):  # plots need the 'bench' extra
        written += plot(results, out)
    return written
