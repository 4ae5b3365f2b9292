"""Four service instances on one PostgreSQL journal, under chaos: nothing lost, nothing
collected twice, nothing left pending.

The parts are in ``tests/chaos/`` (its README says how to run this alone, larger).
The test starts its own PostgreSQL cluster (so that it can restart it) and four
worker processes, each a ``failover.Router`` on a ``PostgresJournal`` with a 2 s
lease.  A client sends the repayments to random instances, some keys to two at once,
and re-sends a request whose instance died.  Meanwhile instances are killed
(SIGKILL, then restarted), paused longer than their lease (SIGSTOP/SIGCONT), lose
their journal connections (``pg_terminate_backend``), and the cluster restarts.  The
channels' ledger, a table outside the journal, is the ground truth of the audit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos import cluster

REQUIRE = os.environ.get("FAILOVER_REQUIRE_POSTGRES") == "1"


def unavailable() -> str | None:
    try:
        import asyncpg  # noqa: F401

        from failover.journal import PostgresJournal  # noqa: F401
    except ImportError as exc:
        return f"the PostgreSQL journal cannot be imported ({exc})"
    return cluster.unavailable_reason()


@pytest.mark.slow
def test_four_instances_under_chaos_lose_nothing_and_collect_nothing_twice(
    tmp_path: Path,
) -> None:
    """Kills, pauses, dropped connections and cluster restarts mid-load: ledger clean."""
    problem = unavailable()
    if problem is not None:
        message = (f"the chaos test starts a PostgreSQL cluster of its own and cannot here:"
                   f" {problem}.  The other PostgreSQL tests use the server at"
                   " FAILOVER_TEST_POSTGRES_DSN; this one needs initdb and pg_ctl"
                   f" (${cluster.BIN_ENV}) and root or the postgres user")
        if REQUIRE:
            pytest.fail(message)
        pytest.skip(message)
    from tests.chaos.driver import Params, run

    params = Params.from_env()
    print(f"chaos seed: {params.seed} (set FAILOVER_CHAOS_SEED to replay)", flush=True)
    report = run(params, tmp_path)
    print(report.figures())
    seed = f"(seed {params.seed}; figures above)"

    assert report.audit is not None
    assert [] == report.hangs, f"live instances left requests unanswered {seed}"
    assert {} == report.problems, f"ledger and journal disagree {seed}"
    assert 0 == len(report.audit.duplicates), seed
    assert 0 == len(report.audit.lost), seed
    assert 0 == report.audit.pending, seed
    assert 0 == report.journal_pending, seed
    assert params.repayments == report.audit.succeeded, seed
    assert params.repayments == report.ledger_rows, seed
    # The load and the faults were what the issue asks for, or the test proves little.
    assert params.faults == len(report.faults), seed
    if params.faults >= 4:
        assert {"sigkill", "sigstop", "terminate", "pg_restart"} == {
            f.kind for f in report.faults}, seed
    assert report.sent_twice >= params.repayments // 10, seed
    assert report.faults_mid_work > len(report.faults) / 2, (
        f"only {report.faults_mid_work} of {len(report.faults)} faults caught requests"
        f" in the air {seed}")
    terminated = [f for f in report.faults if f.kind == "terminate"]
    assert not terminated or any(not f.detail.startswith("0 ") for f in terminated), (
        "pg_terminate_backend found no connection named failover:<instance>: the"
        f" journal's application_name changed? {seed}")
