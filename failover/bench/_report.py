"""Bench output: the terminal table, the JSON file and the PNG plots."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from failover.bench._engine import StrategyRun
from failover.bench._scenarios import Scenario

SCHEMA = "failover-bench/1"
COLUMNS = (
    ("succeeded", "ok"), ("failed", "failed"), ("pending", "pending"),
    ("duplicates", "dup"), ("lost", "lost"), ("latency_p50_s", "p50 s"),
    ("latency_p95_s", "p95 s"), ("latency_p99_s", "p99 s"), ("failovers", "failovers"),
    ("breaker_transitions", "breaker"), ("time_to_detect_s", "detect s"),
    ("time_back_on_primary_s", "back s"),
)
LATE_COLUMNS = (
    ("late_collections", "late coll."), ("charged_twice", "charged 2x"),
    ("duplicates", "dup left"), ("lost", "paid, FAILED"), ("manual", "manual"),
    ("refunds", "refunds"), ("corrections", "corrected"),
    ("time_to_right_p50_s", "right p50 s"), ("time_to_right_max_s", "right max s"),
)
COLOURS = {"naive": "#d95f02", "retry-only": "#7570b3", "failover": "#1b9e77",
           "failover-no-sweep": "#e7298a"}


def document(results: dict[str, tuple[Scenario, list[StrategyRun]]], *, seed: int,
              repayments: int, config: str | None, elapsed_s: float) -> dict[str, Any]:
    """The JSON document (schema ``failover-bench/1``)."""
    return {
        "schema": SCHEMA,
        "seed": seed,
        "repayments": repayments,
        "config": config,
        "elapsed_s": round(elapsed_s, 3),
        "scenarios": {
            name: {
                "description": scenario.description,
                "duration_s": scenario.duration_s,
                "trouble": list(scenario.trouble) if scenario.trouble else None,
                "crash_at": scenario.crash_at,
                "burst": list(scenario.burst) if scenario.burst else None,
                "horizon_s": scenario.horizon_s,
                "strategies": {run.strategy: run.metrics for run in runs},
            }
            for name, (scenario, runs) in results.items()
        },
    }


def write_json(data: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "never"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table_rows(runs: Sequence[StrategyRun],
               columns: Sequence[tuple[str, str]] = COLUMNS) -> list[list[str]]:
    return [[run.strategy, *(_cell(run.metrics.get(key)) for key, _ in columns)]
            for run in runs]


def print_tables(results: dict[str, tuple[Scenario, list[StrategyRun]]], out: TextIO) -> None:
    """One table per scenario: rich's when it is installed, plain text otherwise."""
    headers = ["strategy", *(title for _, title in COLUMNS)]
    for name, (scenario, runs) in results.items():
        rows = table_rows(runs)
        if scenario.trouble is None:  # detect/back only mean something with trouble
            rows = [[*row[:-2], "-", "-"] for row in rows]
        title = f"{name}: {scenario.description}"
        try:
            _rich_table(title, headers, rows, out)
        except ImportError:
            _plain_table(title, headers, rows, out)
        if scenario.horizon_s is not None:
            late_headers = ["strategy", *(t for _, t in LATE_COLUMNS)]
            late_rows = table_rows(runs, LATE_COLUMNS)
            late_title = (f"{name}: money {scenario.horizon_s / 3600:g} h after the traffic,"
                          " net of refunds (manual-refund list apart); time from the wrong"
                          " to its refund or correction")
            try:
                _rich_table(late_title, late_headers, late_rows, out, money=(3, 4))
            except ImportError:
                _plain_table(late_title, late_headers, late_rows, out)


def _rich_table(title: str, headers: list[str], rows: list[list[str]], out: TextIO,
                money: tuple[int, int] = (4, 5)) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header, justify="left" if header == "strategy" else "right")
    for row in rows:
        money_wrong = row[money[0]] != "0" or row[money[1]] != "0"  # duplicates or lost
        table.add_row(*row, style="red" if money_wrong else None)
    Console(file=out, width=160).print(table)


def _plain_table(title: str, headers: list[str], rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(title, file=out)
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)), file=out)
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)), file=out)
    print(file=out)


def _per_minute(run: StrategyRun, duration_s: float) -> tuple[list[float], list[float],
                                                              list[float]]:
    """Latency p50 and p99 of the repayments arriving in each simulated minute."""
    buckets: dict[int, list[float]] = {}
    for done in run.timeline:
        buckets.setdefault(int(done.arrival // 60), []).append(max(done.done - done.arrival,
                                                                    0.01))
    minutes, p50, p99 = [], [], []
    for minute in sorted(buckets):
        values = sorted(buckets[minute])
        minutes.append(minute + 0.5)
        p50.append(values[len(values) // 2])
        p99.append(values[min(len(values) - 1, round(0.99 * (len(values) - 1)))])
    return minutes, p50, p99


def plot(results: dict[str, tuple[Scenario, list[StrategyRun]]], out: Path) -> list[Path]:
    """One latency/breaker figure per scenario and one figure of outcome bars.

    Needs matplotlib (``pip install 'failover[bench]'``); returns the files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (scenario, runs) in results.items():
        if scenario.horizon_s is not None:
            written.append(_plot_late(plt, name, scenario, runs, out))
            continue
        figure, (top, bottom) = plt.subplots(
            2, 1, figsize=(8, 4.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]},
            dpi=80,
        )
        for run in runs:
            minutes, p50, p99 = _per_minute(run, scenario.duration_s)
            colour = COLOURS.get(run.strategy)
            top.plot(minutes, p50, color=colour, lw=1.2, label=f"{run.strategy} p50")
            top.plot(minutes, p99, color=colour, lw=0.8, ls=":", label=f"{run.strategy} p99")
        top.set_yscale("log")
        top.set_ylabel("latency (s), per minute")
        top.set_title(textwrap.fill(f"{name}: {scenario.description}", 110), fontsize=8,
                      loc="left")
        top.legend(loc="upper left", fontsize=6, ncol=3)
        failover = next((r for r in runs if r.strategy == "failover"), None)
        states = {"closed": 0.0, "half-open": 0.5, "open": 1.0}
        if failover is not None:
            times = [0.0] + [t / 60 for t, _ in failover.breaker] + [scenario.duration_s / 60]
            levels = [0.0] + [states.get(s, 0.0) for _, s in failover.breaker]
            levels.append(levels[-1])
            bottom.step(times, levels, where="post", color=COLOURS["failover"])
        bottom.set_yticks([0, 0.5, 1], ["closed", "half", "open"], fontsize=7)
        bottom.set_ylabel("primary\nbreaker", fontsize=8)
        bottom.set_xlabel("simulated minutes")
        for axis in (top, bottom):
            if scenario.trouble is not None:
                axis.axvspan(scenario.trouble[0] / 60, scenario.trouble[1] / 60,
                             color="grey", alpha=0.15, lw=0)
            if scenario.crash_at is not None:
                axis.axvline(scenario.crash_at / 60, color="black", lw=0.8, ls="--")
        figure.tight_layout()
        path = out / f"{name}.png"
        figure.savefig(path)
        plt.close(figure)
        written.append(path)

    kinds = ("succeeded", "failed", "pending", "duplicates", "lost")  # late: net of refunds
    columns = 4
    rows = (len(results) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(10, 2.6 * rows), dpi=80, squeeze=False)
    for axis in axes.flat[len(results):]:
        axis.set_visible(False)
    for axis, (name, (_, runs)) in zip(axes.flat, results.items(), strict=False):
        width = 0.8 / max(len(runs), 1)
        for index, run in enumerate(runs):
            total = max(run.metrics["repayments"], 1)
            values = [100 * run.metrics[k] / total for k in kinds]
            positions = [k + index * width for k in range(len(kinds))]
            axis.bar(positions, values, width, label=run.strategy,
                     color=COLOURS.get(run.strategy))
        axis.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))],
                        ["ok", "failed", "pend", "dup", "lost"], fontsize=7)
        axis.set_yscale("symlog", linthresh=1)
        axis.set_title(name, fontsize=9)
        axis.tick_params(axis="y", labelsize=7)
    axes.flat[0].set_ylabel("% of repayments")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    path = out / "outcomes.png"
    figure.savefig(path)
    plt.close(figure)
    written.append(path)
    return written


def _plot_late(plt: Any, name: str, scenario: Scenario, runs: Sequence[StrategyRun],
               out: Path) -> Path:
    """Borrowers wronged over time (charged twice, or shown FAILED while their money was
    taken), per strategy; beneath, how long each wrong the sweep put right lasted."""
    assert scenario.horizon_s is not None
    end_h = (scenario.duration_s + scenario.horizon_s) / 3600
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 5.2), gridspec_kw={"height_ratios": [3, 2]}, dpi=80)
    for run in runs:
        times = [0.0] + [t / 3600 for t, _ in run.wronged] + [end_h]
        counts = [0] + [n for _, n in run.wronged]
        counts.append(counts[-1])
        manual = run.metrics.get("manual") or 0
        label = f"{run.strategy}: {counts[-1]} at the end" + (
            f" ({manual} on the manual-refund list)" if manual else "")
        top.step(times, counts, where="post", color=COLOURS.get(run.strategy), lw=1.2,
                 label=label)
    top.axvspan(scenario.duration_s / 3600, end_h, color="grey", alpha=0.12, lw=0)
    top.text(scenario.duration_s / 3600, 0, " after the traffic", fontsize=7, va="bottom")
    top.set_xlim(0, end_h)
    top.set_ylabel("borrowers wronged now")
    top.set_xlabel("simulated hours")
    top.set_title(textwrap.fill(f"{name}: {scenario.description}", 110), fontsize=8,
                  loc="left")
    top.legend(loc="upper left", fontsize=7)
    swept = [r for r in runs if r.times_to_right]
    if swept:
        longest = max(10.0, *(max(r.times_to_right) for r in swept))
        edges = math.ceil(math.log(longest / 10) / math.log(1.35)) + 2  # 10 s and up
        bins = [10 * 1.35 ** k for k in range(edges)]
        for run in swept:
            bottom.hist([max(t, 10.0) for t in run.times_to_right], bins=bins,
                        color=COLOURS.get(run.strategy), alpha=0.8,
                        label=f"{run.strategy}: {len(run.times_to_right)} made right")
        bottom.set_xscale("log")
        bottom.legend(loc="upper left", fontsize=7)
    bottom.set_xlabel("seconds from the late collection to its refund or correction"
                      " (under 10 s counted at 10 s)")
    bottom.set_ylabel("borrowers")
    figure.tight_layout()
    path = out / f"{name}.png"
    figure.savefig(path)
    plt.close(figure)
    return path
