"""The scenario engine: honest comparisons on simulated time, checked against ledgers."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from decimal import Decimal

import pytest

from failover import Repayment
from failover.bench import SCENARIOS, SCHEMA, VirtualTimeLoop, run_bench
from failover.bench._engine import (
    LATE_METRICS,
    Call,
    Finished,
    TimedLedger,
    measure,
    measure_late,
    percentile,
)
from failover.bench._scenarios import LATE_STRATEGIES, Scenario
from failover.cli import main
from failover.testing import Collection, MemoryLedger, Refund

METRICS = {
    "repayments", "succeeded", "failed", "pending", "pending_at_end_of_traffic", "duplicates",
    "lost", "false_successes", "latency_p50_s", "latency_p95_s", "latency_p99_s",
    "latency_mean_s", "failovers", "calls", "primary_calls_in_trouble", "time_to_detect_s",
    "time_back_on_primary_s", "breaker_transitions",
}


def test_virtual_time_jumps_over_sleeps_and_timeouts():
    """An hour of sleeping and a 5 s timeout take no real time and end on exact clock values."""

    async def scenario():
        loop = asyncio.get_running_loop()
        await asyncio.sleep(3600)
        try:
            async with asyncio.timeout(5):
                await asyncio.sleep(60)
        except TimeoutError:
            pass
        return loop.time()

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        assert 3605.0 == runner.run(scenario())


def test_naive_duplicates_on_ambiguous_timeouts_and_failover_does_not():
    """Same traffic and channels: naive collects twice after ambiguous timeouts; failover never."""
    results, _ = run_bench(["ambiguous"], repayments=300, seed=3)

    by_strategy = {run.strategy: run.metrics for run in results["ambiguous"][1]}
    assert by_strategy["naive"]["duplicates"] > 0
    assert 0 == by_strategy["failover"]["duplicates"]
    assert 0 == by_strategy["failover"]["lost"]
    assert 300 == by_strategy["failover"]["succeeded"] + by_strategy["failover"]["failed"]


def test_crash_redelivery_duplicates_only_without_a_journal():
    """After a crash the redelivered batch is collected twice by naive, once by failover."""
    results, _ = run_bench(["crash"], repayments=100, seed=5)

    by_strategy = {run.strategy: run.metrics for run in results["crash"][1]}
    assert by_strategy["naive"]["duplicates"] > 0
    assert (0, 0) == (by_strategy["failover"]["duplicates"], by_strategy["failover"]["lost"])


def test_outage_is_detected_and_the_primary_comes_back():
    """In a hard outage the failover breaker stops sending to the primary; naive never does."""
    results, _ = run_bench(["outage"], repayments=400, seed=1)

    by_strategy = {run.strategy: run.metrics for run in results["outage"][1]}
    assert by_strategy["naive"]["time_to_detect_s"] is None
    assert by_strategy["failover"]["time_to_detect_s"] is not None
    assert by_strategy["failover"]["time_back_on_primary_s"] is not None
    assert (by_strategy["failover"]["primary_calls_in_trouble"]
            < by_strategy["naive"]["primary_calls_in_trouble"])


def test_same_seed_same_figures():
    """Two runs with one seed give the same figures."""
    first = run_bench(["flapping"], repayments=200, seed=11)[1]
    second = run_bench(["flapping"], repayments=200, seed=11)[1]

    assert first["scenarios"] == second["scenarios"]


def test_metrics_from_a_hand_checked_trace():
    """measure() on a five-repayment trace worked out by hand."""
    scenario = Scenario("tiny", "hand trace", duration_s=100, trouble=(10.0, 20.0))
    finished = {
        "a": Finished(1.0, 2.0, "succeeded", "p"),    # latency 1
        "b": Finished(11.0, 14.0, "succeeded", "s"),  # 3: failed over from p
        "c": Finished(12.0, 12.5, "succeeded", "s"),  # 0.5: went straight to s (detected at 12)
        "d": Finished(13.0, 15.0, "failed", None),    # 2: yet collected on s: lost
        "e": Finished(25.0, 29.0, "succeeded", "p"),  # 4: collected twice on p: duplicate
    }
    final = {k: (f.status, f.channel) for k, f in finished.items()}
    ledger = MemoryLedger()
    for key, channel in [("a", "p"), ("b", "s"), ("c", "s"), ("d", "s"), ("e", "p"), ("e", "p")]:
        ledger.record(Collection(channel, f"{key}-ref", key, 1, f"{channel}-{key}"))
    log = [Call(1.0, "p", "a", "succeeded"), Call(11.0, "p", "b", "unavailable"),
           Call(11.5, "s", "b", "succeeded"), Call(12.0, "s", "c", "succeeded"),
           Call(13.0, "s", "d", "unknown"), Call(22.5, "p", "x", "succeeded"),
           Call(25.0, "p", "e", "succeeded")]

    m = measure(scenario, "p", final, finished, ledger, log, pending_at_end=0)

    assert (4, 1, 0) == (m["succeeded"], m["failed"], m["pending"])
    assert (1, 1, 0) == (m["duplicates"], m["lost"], m["false_successes"])
    assert (2.0, 4.0, 4.0) == (m["latency_p50_s"], m["latency_p95_s"], m["latency_p99_s"])
    assert 1 == m["failovers"]
    assert (2.0, 2.5) == (m["time_to_detect_s"], m["time_back_on_primary_s"])
    assert 1 == m["primary_calls_in_trouble"]


def test_percentile_nearest_rank():
    """percentile() picks the nearest rank; empty gives None."""
    assert (None, 1, 3, 5) == (percentile([], 0.5), percentile([1], 0.99),
                               percentile([5, 1, 3, 2, 4], 0.5), percentile(range(1, 6), 1.0))


def test_json_schema_is_stable(tmp_path, capsys):
    """failover bench writes bench.json with the documented keys for every scenario."""
    code = main(["bench", "steady", "declines", "--repayments", "50", "--out", str(tmp_path),
                 "--json"])

    data = json.loads((tmp_path / "bench.json").read_text())
    printed = json.loads(capsys.readouterr().out)
    assert 0 == code
    assert data["scenarios"] == printed["scenarios"]
    assert SCHEMA == data["schema"]
    assert {"schema", "seed", "repayments", "config", "elapsed_s", "scenarios"} == set(data)
    assert ["steady", "declines"] == list(data["scenarios"])
    for scenario in data["scenarios"].values():
        assert {"description", "duration_s", "trouble", "crash_at", "burst", "horizon_s",
                "strategies"} == set(scenario)
        assert ["naive", "retry-only", "failover"] == list(scenario["strategies"])
        for metrics in scenario["strategies"].values():
            assert METRICS == set(metrics)


def test_bench_writes_plots(tmp_path, capsys):
    """With matplotlib installed, one PNG per scenario and the outcome bars are written."""
    pytest.importorskip("matplotlib")

    main(["bench", "outage", "--repayments", "50", "--out", str(tmp_path)])

    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert ["outage.png", "outcomes.png"] == pngs
    assert all((tmp_path / p).read_bytes().startswith(b"\x89PNG") for p in pngs)


def test_bench_with_a_user_config(tmp_path, capsys):
    """--config runs the user's channels and policies; names come from the file."""
    config = tmp_path / "mine.toml"
    config.write_text('[channels.gateway]\npriority = 2\n[channels.debit]\npriority = 1\n'
                      '[channels.debit.breaker]\nfail_max = 2\n')

    code = main(["bench", "outage", "--repayments", "100", "--config", str(config),
                 "--out", str(tmp_path), "--json"])

    data = json.loads(capsys.readouterr().out)
    calls = data["scenarios"]["outage"]["strategies"]["failover"]["calls"]
    assert 0 == code
    assert {"debit", "gateway"} == set(calls)


def test_unknown_scenario_is_a_usage_error(tmp_path, capsys):
    """An unknown scenario name exits 2 and lists the known ones."""
    code = main(["bench", "meteor", "--out", str(tmp_path)])

    assert 2 == code
    assert "steady" in capsys.readouterr().err


def test_every_scenario_is_described():
    """Each scenario has a description for the table and the plots."""
    assert all(s.description for s in SCENARIOS.values())


# ---- late: money that arrives after the answer ---------------------------------------------

def net_by_ledger(run):
    """Collections minus refunds per key, counted from the run's ledger alone."""
    net = Counter(c.repayment_key for c in run.ledger.collections())
    net.subtract(Counter(r.repayment_key for r in run.ledger.refunds()))
    return net


def test_late_sweep_makes_every_late_collection_right_and_no_sweep_does_not():
    """Same traffic, same late-applying channels: after the horizon, failover with the sweep
    leaves nobody charged twice or shown unpaid who paid (bar the manual-refund list, which
    a channel without refunds fills); without the sweep, and for naive and retry-only,
    duplicates and paid-but-FAILED borrowers stay.  Every figure recounted from the ledgers."""
    results, _ = run_bench(["late"], repayments=150, seed=1)

    runs = {run.strategy: run for run in results["late"][1]}
    assert list(LATE_STRATEGIES) == list(runs)
    for run in runs.values():
        net = net_by_ledger(run)
        over = {k for k, (status, _) in run.final.items()
                if net[k] > (0 if status == "failed" else 1)}
        manual = run.metrics["manual"]
        charged_twice = {k for k, n in Counter(c.repayment_key
                                               for c in run.ledger.collections()).items()
                         if n > 1}
        # Every key over what its status allows is a duplicate left or a paid-but-FAILED
        # borrower (one charged twice and shown FAILED is both), or on the manual-refund
        # list: a SUCCEEDED repayment whose second collection is to be given back by hand.
        dup_left = {k for k in over if net[k] > 1}
        paid_failed = {k for k in over if run.final[k][0] == "failed"}
        assert (len(dup_left), len(paid_failed)) == (run.metrics["duplicates"] + manual,
                                                     run.metrics["lost"])
        assert len(charged_twice) == run.metrics["charged_twice"]
        assert len(run.ledger.refunds()) == run.metrics["refunds"]
        assert (0, 0) == (run.metrics["refunded_twice"], run.metrics["refunded_only"])
        assert all(n >= 0 for n in net.values())
        assert 450 == run.metrics["repayments"]  # 150 an hour for 3 hours

    swept, unswept = runs["failover"].metrics, runs["failover-no-sweep"].metrics
    assert (0, 0) == (swept["duplicates"], swept["lost"])
    net = net_by_ledger(runs["failover"])
    owed = [k for k, (status, _) in runs["failover"].final.items()
            if net[k] > (0 if status == "failed" else 1)]
    assert swept["manual"] == len(owed)
    assert all(runs["failover"].final[k][0] == "succeeded" and net[k] == 2 for k in owed)
    assert min(swept["refunds"], swept["corrections"], swept["manual"]) > 0
    assert swept["sweeps"] > 0
    # Each wrong the sweep found was made right by a refund or a correction, within the
    # late-check schedule (60 s, then 3600 s after the ending) plus a sweep's interval.
    assert swept["made_right"] == len(runs["failover"].times_to_right) > 0
    assert 0 < swept["time_to_right_p50_s"] <= swept["time_to_right_max_s"] < 3600 + 60
    assert min(unswept["duplicates"], unswept["lost"]) > 0
    assert (0, 0, 0) == (unswept["refunds"], unswept["corrections"], unswept["sweeps"])
    assert unswept["time_to_right_max_s"] is None
    for name in ("naive", "retry-only"):
        assert runs[name].metrics["duplicates"] > 0
        assert 0 == runs[name].metrics["refunds"]
    # The borrowers still wronged at the end: the manual list for the swept run.
    assert swept["manual"] == runs["failover"].wronged[-1][1]
    assert unswept["late_collections"] > 0


class StubClock:
    def __init__(self) -> None:
        self.at = 0.0

    def monotonic(self) -> float:
        return self.at


def test_late_metrics_from_a_hand_checked_trace():
    """measure_late() on six repayments worked out by hand."""
    clock = StubClock()
    ledger = TimedLedger(clock)

    def collect(at: float, key: str, channel: str) -> None:
        clock.at = at
        ledger.record(Collection(channel, f"{key}/{channel}", key, Decimal(1), f"{channel}-{key}"))

    collect(9, "a", "q")   # a: SUCCEEDED on q at 10; p collects late at 50, refunded at 100
    collect(50, "a", "p")
    clock.at = 100
    ledger.record_refund(Refund("p", "a/p-refund", "a/p", "a", Decimal(1)))
    collect(30, "b", "p")  # b: FAILED at 20; p collects late at 30; corrected at 90
    collect(4, "c", "q")   # c: SUCCEEDED at 5; p collects late at 40, never refunded
    collect(40, "c", "p")
    collect(25, "d", "p")  # d: FAILED at 6; p collects late at 25: paid, shown FAILED
    collect(6, "e", "q")   # e: SUCCEEDED at 7; p collects late at 45; on the manual list
    collect(45, "e", "p")
    collect(2.5, "f", "q")  # f: SUCCEEDED at 3, nothing late
    finished = {"a": Finished(0, 10, "succeeded", "q"), "b": Finished(0, 20, "failed", None),
                "c": Finished(0, 5, "succeeded", "q"), "d": Finished(0, 6, "failed", None),
                "e": Finished(0, 7, "succeeded", "q"), "f": Finished(0, 3, "succeeded", "q")}
    final = {k: (f.status, f.channel) for k, f in finished.items()}
    final["b"] = ("succeeded", "p")
    repayments = {k: Repayment(key=k, account="6222000011112222", amount=Decimal(1),
                               currency="CNY") for k in finished}

    m = measure_late(repayments, finished, final, ledger,
                     corrected_at={"b": [(90.0, "failed", "succeeded")]}, manual={"e"},
                     reconciled_at=None)

    assert (1, 1, 1) == (m["duplicates"], m["lost"], m["manual"])  # c, d, e
    assert (5, 3, 1, 1) == (m["late_collections"], m["charged_twice"], m["refunds"],
                            m["corrections"])
    assert (2, 55.0, 60.0) == (m["made_right"], m["time_to_right_p50_s"],
                               m["time_to_right_max_s"])
    assert [50.0, 60.0] == m["_times_to_right"]
    assert [(25, 1), (30, 2), (40, 3), (45, 4), (50, 5), (90, 4), (100, 3)] == m["_wronged"]


def test_late_same_seed_same_figures():
    """The late scenario is deterministic: one seed, one set of figures."""
    first = run_bench(["late"], repayments=40, seed=4)[1]
    second = run_bench(["late"], repayments=40, seed=4)[1]

    assert first["scenarios"] == second["scenarios"]


def test_bench_late_json_plot_and_exit_code(tmp_path, capsys):
    """failover bench late: four strategies with the late metrics, its own plot, and exit 0
    (the failover strategy, which sweeps, leaves no duplicate and no loss)."""
    pytest.importorskip("matplotlib")

    code = main(["bench", "late", "--repayments", "30", "--out", str(tmp_path), "--json"])

    data = json.loads(capsys.readouterr().out)
    late = data["scenarios"]["late"]
    assert 0 == code
    assert list(LATE_STRATEGIES) == list(late["strategies"])
    assert 7200 == late["horizon_s"]
    for metrics in late["strategies"].values():
        assert METRICS | set(LATE_METRICS) == set(metrics)
    assert ["late.png", "outcomes.png"] == sorted(p.name for p in tmp_path.glob("*.png"))
