"""The public surface: one sorted __all__, every name from DESIGN §2 exported."""

from __future__ import annotations

import failover
import failover.events
import failover.testing

DESIGN_NAMES = {
    "Repayment", "RepaymentResult", "RepaymentStatus", "Attempt", "Outcome", "Channel",
    "ChannelRequest", "ChannelResult", "ChannelUnavailable", "Router", "BlockingRouter",
    "RouterConfig", "ChannelConfig", "RetryConfig", "BreakerConfig", "MemoryJournal",
    "SQLiteJournal", "FailoverError", "IdempotencyConflict", "ConfigError", "JournalError",
}


def test_all_is_sorted_and_exactly_the_public_names():
    """__all__ is sorted and lists every public attribute of the package, no more."""
    public = {n for n in dir(failover) if not n.startswith("_")} - {
        "bench", "config", "events", "journal", "testing", "cli", "report", "codec",
        "metrics", "http", "gateway_sim",
    }

    assert sorted(failover.__all__) == failover.__all__
    assert public == set(failover.__all__)


def test_design_names_are_exported():
    """Every name the contract makes public is importable from failover."""
    assert set() == DESIGN_NAMES - set(failover.__all__)


def test_errors_form_one_tree():
    """Every exception failover raises derives from FailoverError."""
    errors = [getattr(failover, n) for n in failover.__all__
              if isinstance(getattr(failover, n), type)
              and issubclass(getattr(failover, n), BaseException)]

    assert [] == [e for e in errors if not issubclass(e, failover.FailoverError)]


def test_submodule_all_lists_exist():
    """failover.events and failover.testing export what they list."""
    for module in (failover.events, failover.testing):
        assert [] == [n for n in module.__all__ if not hasattr(module, n)]
