"""The pure repayment flow, driven without an event loop: any answers, in any order.

A small model follows the flow's actions and the answers fed to it, and checks the
rules of DESIGN §1 on every step: no failover while an attempt is in doubt, no second
submit to a channel that does not deduplicate while in doubt, nothing started after
the deadline, ``FAILED`` only when nothing can have been collected, ``SUCCEEDED`` only
on a channel's word.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failover import ChannelResult, Outcome, RepaymentStatus
from failover import _decisions as decisions
from failover._decisions import Verdict
from failover._flow import (
    Admit,
    Answer,
    Begin,
    Call,
    Doubt,
    Emit,
    Finish,
    LanePlan,
    Pending,
    Plan,
    Query,
    Record,
    Resolve,
    Wait,
    make_reference,
    repayment_flow,
)

LANES = {
    "debit": LanePlan("debit", idempotent=False, max_attempts=3, settle_s=5.0),
    "card": LanePlan("card", idempotent=True, max_attempts=3, settle_s=5.0),
    "wallet": LanePlan("wallet", idempotent=False, max_attempts=2, settle_s=0.0),
}
ORDER = ("debit", "card", "wallet")
SETTLING = {Outcome.SUCCEEDED, Outcome.DECLINED, Outcome.REJECTED}


def result(outcome: Outcome) -> ChannelResult:
    return ChannelResult(outcome, channel_reference="ch-1" if outcome is Outcome.SUCCEEDED
                         else None, code=outcome.value)


def plan(**changes) -> Plan:
    fields = {"key": "k", "round": 1, "order": ORDER, "lanes": LANES, "started": 0.0,
              "deadline_s": 30.0}
    fields.update(changes)
    return Plan(**fields)


def run_script(flow_plan: Plan, answers: list[Answer]) -> list[object]:
    """Feed ``answers`` in order, for the actions that take one; return the actions."""
    flow = repayment_flow(flow_plan)
    actions = [next(flow)]
    replies = iter(answers)
    try:
        while True:
            action = actions[-1]
            needs = isinstance(action, Call | Query | Admit | Begin)
            actions.append(flow.send(next(replies) if needs else Answer(0.0)))
    except StopIteration:
        return actions


# ---- examples ------------------------------------------------------------------------------


def test_a_first_time_success_is_one_call_and_one_finish():
    """A new repayment's opening call succeeds: Call, then Finish (one journal write)."""
    actions = run_script(plan(opening=("debit", 1)),
                         [Answer(0.1, result=result(Outcome.SUCCEEDED))])

    assert [Call, Finish] == [type(a) for a in actions]
    assert (RepaymentStatus.SUCCEEDED, "debit") == (actions[-1].status, actions[-1].channel)


def test_an_unknown_answer_is_queried_before_anything_else():
    """UNKNOWN: the same channel is asked by its reference before any failover."""
    actions = run_script(plan(opening=("debit", 1)), [
        Answer(0.1, result=result(Outcome.UNKNOWN)),
        Answer(0.2, result=result(Outcome.SUCCEEDED), asked_at=0.1),
    ])

    assert [Call, Record, Query, Finish] == [type(a) for a in actions]
    assert make_reference("k", 1, "debit") == actions[2].reference


def test_not_found_too_soon_is_asked_again_after_settle_s():
    """NOT_FOUND asked within settle_s of the submit: wait, then ask again."""
    actions = run_script(plan(opening=("debit", 1)), [
        Answer(0.1, result=result(Outcome.UNKNOWN)),
        Answer(0.2, result=ChannelResult.not_found(), asked_at=0.1),
        Answer(5.2, result=ChannelResult.not_found(), asked_at=5.1),
        Answer(5.3, refusal=None),
        Answer(5.3, number=2),
        Answer(5.4, result=result(Outcome.SUCCEEDED)),
    ])

    kinds = [type(a) for a in actions]
    assert [Call, Record, Query, Wait, Query, Resolve] == kinds[:6]
    assert pytest.approx(4.9) == actions[3].seconds
    assert ("card", RepaymentStatus.SUCCEEDED) == (actions[-1].channel, actions[-1].status)


def test_not_found_while_the_thread_runs_leaves_it_pending():
    """A plain-def submit still running: no NOT_FOUND proves anything; PENDING."""
    actions = run_script(plan(opening=("debit", 1)), [
        Answer(0.1, result=result(Outcome.UNKNOWN), running=True),
        Answer(10.0, result=ChannelResult.not_found(), asked_at=9.0, running=True),
    ])

    assert Pending("debit", "in_the_air") == actions[-1]


def test_a_crash_left_attempt_is_settled_first():
    """An attempt journaled in doubt is asked about before any channel is tried."""
    actions = run_script(plan(doubts=(Doubt("card", make_reference("k", 1, "card"), 0.0),)), [
        Answer(6.0, result=result(Outcome.SUCCEEDED), asked_at=6.0),
    ])

    assert [Query, Finish] == [type(a) for a in actions]
    assert ("card", RepaymentStatus.SUCCEEDED) == (actions[-1].channel, actions[-1].status)


def test_doubt_wins_over_moving_on():
    """A resubmit answering UNAVAILABLE settles nothing: with the retries used up, the
    repayment waits PENDING on that channel instead of failing over."""
    unknown, down = result(Outcome.UNKNOWN), result(Outcome.UNAVAILABLE)
    actions = run_script(plan(order=("card", "debit"), opening=("card", 1)), [
        Answer(0.1, result=unknown),
        *[Answer(0.2 + i, result=unknown, asked_at=0.2 + i) for i in range(3)],
        Answer(4.0), Answer(4.0, number=2), Answer(4.1, result=down),
        Answer(5.0), Answer(5.0, number=3), Answer(5.1, result=down),
    ])

    assert Pending("card", "unavailable") == actions[-1]
    assert [] == [a for a in actions if getattr(a, "channel", "card") != "card"]


def test_the_flow_imports_nothing_that_does_io():
    """The flow module imports only pure modules: no asyncio, threads, files or sockets."""
    source = Path(decisions.__file__).with_name("_flow.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")

    allowed = {"__future__", "functools", "hashlib", "math", "collections.abc", "dataclasses",
               "tenacity", "failover", "failover._decisions", "failover._models",
               "failover.events"}
    assert set() == imported - allowed


# ---- the model --------------------------------------------------------------------------------


@dataclass
class Model:
    """What may have been collected, as the flow's actions and answers show it."""

    plan: Plan
    now: float = 0.0
    doubt: dict[str, float] = field(default_factory=dict)
    """Reference -> since when its request can no longer be on its way (inf: running)."""
    collected_said: bool = False
    stopped_said: bool = False

    @property
    def deadline(self) -> float:
        return self.plan.started + self.plan.deadline_s

    def channel_of(self, reference: str) -> str:
        return next(name for name in ORDER if make_reference("k", 1, name) == reference)

    def check(self, action: object) -> None:
        doubted = {self.channel_of(ref) for ref in self.doubt}
        if isinstance(action, Admit | Begin | Call):
            others = doubted - {action.channel}
            assert not others, f"{action} while {others} in doubt"
        if isinstance(action, Call):
            assert self.now < self.deadline or action.number == 1, f"{action} after deadline"
            reference = make_reference("k", 1, action.channel)
            if reference in self.doubt:
                assert LANES[action.channel].idempotent, f"resubmit in doubt: {action}"
        if isinstance(action, Query):
            assert self.now < self.deadline, f"{action} after the deadline"
        if isinstance(action, Finish):
            if action.status is RepaymentStatus.FAILED:
                assert not self.doubt or self.stopped_said, f"FAILED while in doubt {self.doubt}"
            else:
                assert self.collected_said, "SUCCEEDED with no channel saying so"

    def answered(self, action: object, answer: Answer) -> None:
        self.now = answer.at
        if isinstance(action, Call):
            reference = make_reference("k", 1, action.channel)
            outcome = answer.result.outcome
            self.collected_said |= outcome is Outcome.SUCCEEDED
            if outcome in SETTLING and not answer.running:
                self.doubt.pop(reference, None)
                self.stopped_said |= outcome is Outcome.REJECTED
            elif outcome is not Outcome.UNAVAILABLE or reference in self.doubt:
                since = math.inf if answer.running else answer.at
                self.doubt[reference] = max(self.doubt.get(reference, since), since)
        if isinstance(action, Query):
            outcome = answer.result.outcome
            self.collected_said |= outcome is Outcome.SUCCEEDED
            since = self.doubt.get(action.reference)
            if since is not None and math.isinf(since) and not answer.running:
                since = self.doubt[action.reference] = answer.asked_at  # ended before the ask
            settle_s = LANES[self.channel_of(action.reference)].settle_s
            if outcome in SETTLING:
                self.doubt.pop(action.reference, None)
                self.stopped_said |= outcome is Outcome.REJECTED
            elif outcome is Outcome.NOT_FOUND and since is not None and not answer.running \
                    and answer.asked_at >= since + settle_s:
                self.doubt.pop(action.reference, None)


OUTCOMES = st.sampled_from(list(Outcome))


def explore(data: st.DataObject, flow_plan: Plan) -> list[object]:
    model = Model(flow_plan, now=flow_plan.started)
    for doubt in flow_plan.doubts:
        model.doubt[doubt.reference] = doubt.since
    flow = repayment_flow(flow_plan)
    action = next(flow)
    trace = []
    for _ in range(200):
        trace.append(action)
        model.check(action)
        if isinstance(action, Finish | Pending):
            with pytest.raises(StopIteration):
                flow.send(Answer(model.now))
            return trace
        took = data.draw(st.sampled_from([0.0, 0.05, 1.0, 4.0, 12.0]), label="took")
        at = model.now + took
        if isinstance(action, Wait):
            answer = Answer(model.now + action.seconds)
        elif isinstance(action, Admit):
            answer = Answer(model.now, refusal=data.draw(st.sampled_from([None, None, "x"]),
                                                         label="refusal"))
        elif isinstance(action, Begin):
            answer = Answer(model.now, number=len(trace) + 2)
        elif isinstance(action, Call | Query):
            outcome = data.draw(OUTCOMES, label="outcome")
            running = isinstance(action, Call) and not LANES[action.channel].idempotent \
                and data.draw(st.booleans(), label="running")
            if isinstance(action, Query):
                running = data.draw(st.booleans(), label="still running") \
                    and math.isinf(model.doubt.get(action.reference, 0.0))
            answer = Answer(at, result=result(outcome), asked_at=model.now, running=running)
        else:
            assert isinstance(action, Record | Resolve | Emit)
            answer = Answer(model.now)
        model.answered(action, answer)
        action = flow.send(answer)
    raise AssertionError(f"the flow did not end in 200 actions: {trace[-5:]}")


DOUBTS = st.lists(
    st.builds(lambda name, since: Doubt(name, make_reference("k", 1, name), since),
              st.sampled_from(ORDER), st.sampled_from([-10.0, 0.0, 3.0])),
    max_size=2, unique_by=lambda d: d.channel)


EXPLORE = {"data": st.data(), "opening": st.booleans(), "doubts": DOUBTS,
           "deadline_s": st.sampled_from([1.0, 10.0, 30.0])}
SIZES = {"max_examples": 400, "deadline": None, "derandomize": True, "database": None}


def keeps_the_rules(data, opening, doubts, deadline_s):
    flow_plan = plan(opening=("debit", 1) if opening else None,
                     doubts=() if opening else tuple(doubts), deadline_s=deadline_s)
    explore(data, flow_plan)


@settings(print_blob=True, **SIZES)
@given(**EXPLORE)
def test_no_answers_make_the_flow_break_the_rules(data, opening, doubts, deadline_s):
    """Whatever the channels answer and whenever, the flow keeps DESIGN §1's rules."""
    keeps_the_rules(data, opening, doubts, deadline_s)


def test_the_model_catches_a_flow_that_fails_over_on_unknown(monkeypatch):
    """The model has teeth: a flow that takes UNKNOWN as 'not collected' is caught."""
    after_submit = decisions.after_submit

    def wrong(outcome: Outcome) -> Verdict:
        return Verdict.NOT_COLLECTED if outcome is Outcome.UNKNOWN else after_submit(outcome)

    monkeypatch.setattr(decisions, "after_submit", wrong)
    hunt = settings(report_multiple_bugs=False, **SIZES)(given(**EXPLORE)(keeps_the_rules))
    with pytest.raises(AssertionError, match="in doubt"):
        hunt()
