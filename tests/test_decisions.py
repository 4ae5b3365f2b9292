"""The pure decision functions, row by row of DESIGN §1."""

from __future__ import annotations

import pytest

from failover import Outcome
from failover._decisions import (
    Verdict,
    after_query,
    after_submit,
    may_retry_same,
)


@pytest.mark.parametrize(
    ("outcome", "verdict", "same_if_idempotent", "same_otherwise"),
    [
        (Outcome.SUCCEEDED, Verdict.COLLECTED, False, False),
        (Outcome.DECLINED, Verdict.REFUSED, False, False),
        (Outcome.REJECTED, Verdict.STOP, False, False),
        (Outcome.UNAVAILABLE, Verdict.FAILED, True, True),
        (Outcome.UNKNOWN, Verdict.NEEDS_QUERY, False, False),
    ],
)
def test_submit_table(outcome, verdict, same_if_idempotent, same_otherwise):
    """What a submit answer means and whether the same channel may be called again."""
    assert verdict == after_submit(outcome)
    assert (same_if_idempotent, same_otherwise) == (may_retry_same(verdict, True),
                                                    may_retry_same(verdict, False))


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (Outcome.SUCCEEDED, Verdict.COLLECTED),
        (Outcome.NOT_FOUND, Verdict.NOT_COLLECTED),
        (Outcome.DECLINED, Verdict.REFUSED),
        (Outcome.REJECTED, Verdict.STOP),
        (Outcome.UNKNOWN, Verdict.IN_DOUBT),
        (Outcome.UNAVAILABLE, Verdict.IN_DOUBT),
    ],
)
def test_query_table(answer, verdict):
    """What a status query's answer proves."""
    assert verdict == after_query(answer)


def test_unresolved_doubt_retries_only_idempotent_channels():
    """After an unresolved UNKNOWN only a deduplicating channel may be called again."""
    assert (True, False) == (may_retry_same(Verdict.IN_DOUBT, True),
                             may_retry_same(Verdict.IN_DOUBT, False))
