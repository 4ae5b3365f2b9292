"""What happens after each answer: plain functions over plain data, no I/O.

The router's async shell performs the calls and journal writes; these functions
decide.  Property tests and the table in DESIGN §1 drive them directly.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from failover._models import SETTLING_SUBMIT_OUTCOMES, Attempt, Outcome


class Verdict(enum.Enum):
    """What one answer means for this repayment on this channel."""

    COLLECTED = "collected"
    """Money was collected: the repayment succeeded."""
    STOP = "stop"
    """Rejected: the repayment must not be tried anywhere; it fails."""
    REFUSED = "refused"
    """Declined: nothing collected; this channel is not tried again this round."""
    FAILED = "failed"
    """Unavailable: nothing collected; the same channel may be retried."""
    NOT_COLLECTED = "not_collected"
    """An unknown outcome proven not collected by a query."""
    IN_DOUBT = "in_doubt"
    """It may have collected, and nothing proved otherwise yet."""
    NEEDS_QUERY = "needs_query"
    """Unknown: ask the channel before anything else."""


def after_submit(outcome: Outcome) -> Verdict:
    """The verdict on a submit's answer."""
    if outcome is Outcome.SUCCEEDED:
        return Verdict.COLLECTED
    if outcome is Outcome.REJECTED:
        return Verdict.STOP
    if outcome is Outcome.DECLINED:
        return Verdict.REFUSED
    if outcome is Outcome.UNAVAILABLE:
        return Verdict.FAILED
    # UNKNOWN, and NOT_FOUND (meaningless as a submit answer), may have collected.
    return Verdict.NEEDS_QUERY


def after_query(answer: Outcome) -> Verdict:
    """The verdict on a status query's answer about a submit in doubt."""
    if answer is Outcome.SUCCEEDED:
        return Verdict.COLLECTED
    if answer is Outcome.REJECTED:
        return Verdict.STOP
    if answer is Outcome.DECLINED:
        return Verdict.REFUSED
    if answer is Outcome.NOT_FOUND:
        return Verdict.NOT_COLLECTED
    # UNKNOWN, UNAVAILABLE or a failed query prove nothing.
    return Verdict.IN_DOUBT


def may_retry_same(verdict: Verdict, idempotent: bool) -> bool:
    """Whether the same channel may be called again (with the same reference).

    After an unknown outcome only a channel that deduplicates on the reference
    may be called again: a second call to any other could collect twice.
    """
    if verdict is Verdict.FAILED:
        return True
    if verdict in (Verdict.NOT_COLLECTED, Verdict.IN_DOUBT):
        return idempotent
    return False


def refuses_again(outcome: Outcome | None, resolution: Outcome | None) -> bool:
    """Whether an earlier attempt rules its channel out for the rest of the round."""
    return Outcome.DECLINED in (outcome, resolution) or Outcome.REJECTED in (outcome, resolution)


def may_resend(outcome: Outcome | None, idempotent: bool) -> bool:
    """Whether a channel may be sent an attempt's reference again later in the round.

    Not a channel that does not deduplicate once an attempt of it went unanswered (no
    answer, ``UNKNOWN``, ``NOT_FOUND``), even if a query said ``NOT_FOUND`` since: the
    first submit may still apply (a provider's queue), and a second collection under
    the same reference is one no query can tell apart from the first, so nothing could
    find it and give it back.  The round goes on with the other channels; a new round
    (``retry``) has new references."""
    return idempotent or outcome in SETTLING_SUBMIT_OUTCOMES


def decided_by(attempts: Iterable[Attempt]) -> tuple[Outcome, Attempt] | None:
    """An answer already journaled that decides the repayment, if any.

    A process can stop after journaling a channel's ``SUCCEEDED`` (or ``REJECTED``)
    but before journaling the repayment's end; whoever resumes it must finish it
    from that answer instead of trying another channel.
    """
    attempts = list(attempts)
    for wanted in (Outcome.SUCCEEDED, Outcome.REJECTED):
        for attempt in attempts:
            if wanted in (attempt.outcome, attempt.resolution):
                return wanted, attempt
    return None
