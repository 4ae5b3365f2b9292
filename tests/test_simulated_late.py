"""The simulated channels model what happens after a repayment ends: late applications
past the settle time, provider callbacks (signed or not), refunds, and the audit of
all that against the ledgers (DESIGN §1 and §4, invariant 6)."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from failover import ChannelRequest, ChannelResult, Outcome, RepaymentResult
from failover import RepaymentStatus as S
from failover._channel import is_sync
from failover._models import Callback
from failover.testing import (
    Collected,
    Collection,
    FakeClock,
    FaultProfile,
    MemoryLedger,
    Refund,
    ScriptedChannel,
    SimulatedChannel,
    SQLiteLedger,
    SyncSimulatedChannel,
    assert_invariants,
    audit,
)

AMOUNT = Decimal("100.00")


def req(key: str = "k1", reference: str | None = None) -> ChannelRequest:
    return ChannelRequest(key, reference or f"{key}/a", "acct-000123", AMOUNT, "CNY")


def refund_req(key: str = "k1", reference: str = "rf-1") -> ChannelRequest:
    return ChannelRequest(key, reference, "acct-000123", AMOUNT, "CNY")


def result(key: str, status: S, channel: str | None = "a") -> RepaymentResult:
    """The router's answer as the audit reads it (it needs no attempts)."""
    return RepaymentResult(key, status, channel, None, (), AMOUNT, "CNY")


def collection(key: str, channel: str = "a", n: int = 1) -> Collection:
    return Collection(channel, f"{key}/{channel}{n}", key, AMOUNT, f"{channel}-{key}-{n}")


def refund(key: str, channel: str = "a", n: int = 1, ref: str = "rf-1",
           amount: Decimal = AMOUNT) -> Refund:
    return Refund(channel, ref, f"{key}/{channel}{n}", key, amount)


def keys(ledger: MemoryLedger | SQLiteLedger) -> list[tuple[str, str]]:
    return [(c.channel, c.reference) for c in ledger.collections()]


class Receiver:
    """Records the callbacks a channel hands over, in order, beside other events."""

    def __init__(self) -> None:
        self.events: list[object] = []

    def __call__(self, channel: str, reference: str, result: ChannelResult) -> None:
        self.events.append((channel, reference, result.outcome))


# -- late application after NOT_FOUND


async def test_late_apply_after_query_collects_past_the_settle_time():
    """A timeout, NOT_FOUND for minutes, then the money is taken when the queue moves."""
    clock = FakeClock()
    channel = SimulatedChannel("a", FaultProfile(late_apply_after_query=1.0,
                                                 late_apply_after_s=300.0), clock=clock)

    assert Outcome.UNKNOWN == (await channel.submit(req())).outcome
    clock.advance(60)  # well past any settle_s
    assert Outcome.NOT_FOUND == (await channel.query(req())).outcome
    assert [] == channel.ledger.collections()
    clock.advance(240)

    assert [("a", "k1/a")] == keys(channel.ledger)  # no call needed: the clock moved it
    assert Outcome.SUCCEEDED == (await channel.query(req())).outcome


async def test_late_apply_after_query_on_another_clock_applies_at_the_next_call():
    """Without a FakeClock the queue moves when the channel is next called."""

    class StepClock:
        """Moves when told, and runs nothing when it does."""

        def __init__(self) -> None:
            self.t = 0.0

        def monotonic(self) -> float:
            return self.t

        async def sleep(self, seconds: float) -> None:
            self.t += seconds

    clock = StepClock()
    channel = SimulatedChannel("a", FaultProfile(late_apply_after_query=1.0,
                                                 late_apply_after_s=30.0), clock=clock)
    await channel.submit(req())
    clock.t = 31

    assert [] == channel.ledger.collections()
    assert Outcome.SUCCEEDED == (await channel.query(req())).outcome
    assert 1 == len(channel.ledger.collections())


async def test_resubmit_after_a_queued_late_apply_collects_once_on_an_idempotent_channel():
    """The resubmit applies the queued request; the queue then applies nothing more."""
    clock = FakeClock()
    channel = SimulatedChannel("a", FaultProfile(late_apply_after_query=1.0,
                                                 late_apply_after_s=120.0), clock=clock)
    await channel.submit(req())
    clock.advance(30)
    assert Outcome.NOT_FOUND == (await channel.query(req())).outcome

    assert Outcome.SUCCEEDED == (await channel.submit(req())).outcome
    clock.advance(600)
    await channel.query(req())

    assert [("a", "k1/a")] == keys(channel.ledger)


def test_resubmit_after_a_queued_late_apply_collects_once_on_a_plain_def_channel():
    """The same on the threaded channel, whose queue the clock moves under its lock."""
    clock = FakeClock()
    channel = SyncSimulatedChannel("a", FaultProfile(late_apply_after_query=1.0,
                                                     late_apply_after_s=120.0), clock=clock)
    channel.submit(req())
    channel.submit(req())
    clock.advance(600)

    assert [("a", "k1/a")] == keys(channel.ledger)


async def test_a_non_idempotent_channel_collects_the_resubmit_and_the_late_apply():
    """Why only idempotent channels may be resubmitted: the queue applies the first too."""
    clock = FakeClock()
    channel = SimulatedChannel("a", FaultProfile(late_apply_after_query=0.5,
                                                 late_apply_after_s=120.0),
                               clock=clock, idempotent=False, seed=3)
    answers = [(await channel.submit(req())).outcome for _ in range(6)]
    clock.advance(600)

    queued = answers.count(Outcome.UNKNOWN)
    assert 0 < queued < 6
    assert 6 == len(channel.ledger.collections())


async def test_the_existing_late_apply_is_unchanged():
    """late_apply still applies at the next call once late_apply_s has passed."""
    clock = FakeClock()
    channel = SimulatedChannel("a", FaultProfile(late_apply=1.0, late_apply_s=4.0), clock=clock)
    await channel.submit(req())
    clock.advance(5)

    assert [] == channel.ledger.collections()  # only a call moves this queue
    assert Outcome.SUCCEEDED == (await channel.query(req())).outcome


# -- callbacks


async def test_callback_before_reaches_the_receiver_before_the_answer():
    """callback_before: the receiver hears of the answer before the caller does."""
    receiver = Receiver()
    channel = SimulatedChannel("a", FaultProfile(callback_before=1.0), callbacks=receiver)
    answer = await channel.submit(req())
    receiver.events.append("answer")

    assert [("a", "k1/a", Outcome.SUCCEEDED), "answer"] == receiver.events
    assert [("k1/a", answer)] == channel.callbacks_sent


async def test_callback_after_reaches_the_receiver_after_the_answer():
    """callback_after: handed over once the answer has reached the caller."""
    receiver = Receiver()
    channel = SimulatedChannel("a", FaultProfile(decline=1.0, callback_after=1.0),
                               callbacks=receiver)
    await channel.submit(req())
    receiver.events.append("answer")
    await channel.drain_callbacks()

    assert ["answer", ("a", "k1/a", Outcome.DECLINED)] == receiver.events


async def test_callback_instead_of_the_answer():
    """The submit times out, the callback says SUCCEEDED with the ledger's reference."""
    receiver = Receiver()
    channel = SimulatedChannel("a", FaultProfile(callback_instead=1.0), callbacks=receiver)

    assert Outcome.UNKNOWN == (await channel.submit(req())).outcome
    await channel.drain_callbacks()

    [collected] = channel.ledger.collections()
    assert [("k1/a", ChannelResult.succeeded(collected.channel_reference))] \
        == channel.callbacks_sent


async def test_callback_instead_is_sent_even_when_the_caller_stops_waiting():
    """A caller that times out during the latency still gets the provider's callback."""
    receiver = Receiver()
    channel = SimulatedChannel("a", FaultProfile(callback_instead=1.0, latency_s=10.0),
                               callbacks=receiver, sleep=lambda s: asyncio.sleep(3600))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(channel.submit(req()), 0.01)
    await channel.drain_callbacks()

    assert [("a", "k1/a", Outcome.SUCCEEDED)] == receiver.events


async def test_callback_for_a_late_application_when_it_applies():
    """callback_late: the receiver hears of the late collection as the clock reaches it."""
    clock, receiver = FakeClock(), Receiver()
    channel = SimulatedChannel("a", FaultProfile(late_apply_after_query=1.0,
                                                 late_apply_after_s=90.0, callback_late=1.0),
                               clock=clock, callbacks=receiver)
    await channel.submit(req())
    clock.advance(89)
    assert [] == receiver.events
    clock.advance(1)

    assert [("a", "k1/a", Outcome.SUCCEEDED)] == receiver.events


async def test_an_async_receiver_runs_on_its_own_task_and_its_errors_are_kept():
    """An awaitable callback does not hold the submit; what it raises is recorded."""
    heard: list[str] = []

    async def receiver(channel: str, reference: str, result: ChannelResult) -> None:
        await asyncio.sleep(0)
        heard.append(reference)
        raise RuntimeError("receiver down")

    channel = SimulatedChannel("a", FaultProfile(callback_before=1.0), callbacks=receiver)
    await channel.submit(req())
    await channel.drain_callbacks()

    assert ["k1/a"] == heard
    assert ["receiver down"] == [str(e) for e in channel.callback_errors]


async def test_a_plain_def_channel_hands_async_callbacks_to_the_event_loop():
    """Threads hand an awaitable callback to the loop the channel was made in."""
    heard: list[str] = []

    async def receiver(channel: str, reference: str, result: ChannelResult) -> None:
        heard.append(reference)

    channel = SyncSimulatedChannel("a", FaultProfile(callback_after=1.0), callbacks=receiver)
    await asyncio.to_thread(channel.submit, req())
    for _ in range(100):
        await channel.drain_callbacks()
        if heard:
            break
        await asyncio.sleep(0.01)

    assert ["k1/a"] == heard


def test_signed_callback_round_trips():
    """parse_callback reads back what signed_callback made (headers in any case)."""
    channel = SimulatedChannel("a", callback_secret="s3cret")
    sent = ChannelResult.succeeded("a-77")
    headers, body = channel.signed_callback("k1/a", sent)

    assert Callback("k1/a", sent) == channel.parse_callback(headers, body)
    assert Callback("k1/a", sent) == channel.parse_callback(
        {k.lower(): v for k, v in headers.items()}, body)


@pytest.mark.parametrize("forge", ["body", "secret", "no_header"])
def test_parse_callback_rejects_a_bad_signature(forge):
    """A tampered body, another secret or no signature: ValueError("bad signature")."""
    channel = SimulatedChannel("a", callback_secret=b"s3cret")
    signer = SimulatedChannel("a", callback_secret="other") if forge == "secret" else channel
    headers, body = signer.signed_callback("k1/a", ChannelResult.declined("insufficient"))
    if forge == "body":
        body = body.replace(b"declined", b"succeeded")
    if forge == "no_header":
        headers = {"Content-Type": "application/json"}

    with pytest.raises(ValueError, match="bad signature"):
        channel.parse_callback(headers, body)


def test_parse_callback_rejects_a_callback_for_another_channel():
    """Signed with the same secret but about another channel: refused."""
    mine = SimulatedChannel("a", callback_secret="shared")
    theirs = SimulatedChannel("b", callback_secret="shared")
    headers, body = theirs.signed_callback("k1/b", ChannelResult.succeeded("b-1"))

    with pytest.raises(ValueError, match=r"not 'a'"):
        mine.parse_callback(headers, body)


# -- refunds


async def test_refund_gives_the_money_back_once_per_refund_reference():
    """A second call with the same refund reference answers the same and moves nothing."""
    channel = SimulatedChannel("a")
    taken = await channel.submit(req())
    first = await channel.refund(refund_req(), taken.channel_reference, AMOUNT)
    again = await channel.refund(refund_req(), taken.channel_reference, AMOUNT)

    assert Outcome.SUCCEEDED == first.outcome
    assert first == again
    assert [Refund("a", "rf-1", "k1/a", "k1", AMOUNT, first.channel_reference)] \
        == channel.ledger.refunds()


async def test_query_refund_finds_an_applied_refund_only():
    """SUCCEEDED once applied under that reference, NOT_FOUND otherwise."""
    channel = SimulatedChannel("a")
    await channel.submit(req())
    assert Outcome.NOT_FOUND == (await channel.query_refund(refund_req())).outcome
    done = await channel.refund(refund_req(), None, AMOUNT)

    assert done == await channel.query_refund(refund_req())
    assert Outcome.NOT_FOUND == (await channel.query_refund(refund_req(reference="rf-2"))).outcome


@pytest.mark.parametrize(("fault", "outcome", "given_back", "queried"), [
    ("refund_fail", Outcome.DECLINED, False, Outcome.NOT_FOUND),
    ("refund_unknown_applied", Outcome.UNKNOWN, True, Outcome.SUCCEEDED),
    ("refund_unknown_not_applied", Outcome.UNKNOWN, False, Outcome.NOT_FOUND),
    ("refund_unavailable", Outcome.UNAVAILABLE, False, Outcome.NOT_FOUND),
])
async def test_refund_faults(fault, outcome, given_back, queried):
    """Each refund fault answers as named and moves money only if it says so."""
    channel = SimulatedChannel("a", FaultProfile(**{fault: 1.0}))
    await channel.submit(req())

    assert outcome == (await channel.refund(refund_req(), None, AMOUNT)).outcome
    assert given_back == bool(channel.ledger.refunds())
    assert queried == (await channel.query_refund(refund_req())).outcome


async def test_a_refund_retried_after_an_unknown_applied_answer_moves_no_more_money():
    """Idempotent on its own reference: the retry finds the refund already applied."""
    channel = SimulatedChannel("a", FaultProfile(refund_unknown_applied=1.0))
    await channel.submit(req())
    await channel.refund(refund_req(), None, AMOUNT)

    assert Outcome.SUCCEEDED == (await channel.refund(refund_req(), None, AMOUNT)).outcome
    assert 1 == len(channel.ledger.refunds())


async def test_a_declined_refund_stays_declined_under_its_reference():
    """The channel keeps its decisive answer: no money moves on the retry either."""
    channel = SimulatedChannel("a", FaultProfile(refund_fail=1.0))
    await channel.submit(req())
    first = await channel.refund(refund_req(), None, AMOUNT)
    channel.profile = FaultProfile()

    assert first == await channel.refund(refund_req(), None, AMOUNT)
    assert [] == channel.ledger.refunds()


async def test_a_refund_of_nothing_or_too_much_is_declined():
    """No collection of the repayment on the channel, or more than it took: declined."""
    channel = SimulatedChannel("a")
    assert "no_such_payment" == (await channel.refund(refund_req(), None, AMOUNT)).code
    await channel.submit(req())

    too_much = await channel.refund(refund_req(reference="rf-2"), None, AMOUNT * 2)
    assert "invalid_amount" == too_much.code
    assert [] == channel.ledger.refunds()


async def test_refund_picks_the_collection_not_given_back_yet():
    """Two collections of one key (a non-idempotent resubmit): each refund takes one."""
    channel = SimulatedChannel("a", idempotent=False)
    await channel.submit(req())
    await channel.submit(req())
    await channel.refund(refund_req(reference="rf-1"), None, AMOUNT)
    await channel.refund(refund_req(reference="rf-2"), None, AMOUNT)
    outcome = audit({"k1": result("k1", S.FAILED)}, [channel])

    assert 2 == len(channel.ledger.refunds())
    assert outcome.ok


@pytest.mark.parametrize("kind", [SimulatedChannel, SyncSimulatedChannel])
def test_a_channel_built_without_refunds_has_no_refund_attribute(kind):
    """refunds=False: no refund, no query_refund, so the router lists the case for hand."""
    without, with_ = kind("a", refunds=False), kind("a")

    assert not hasattr(without, "refund")
    assert not hasattr(without, "query_refund")
    assert hasattr(with_, "refund")
    assert hasattr(with_, "query_refund")


def test_a_plain_def_channel_refunds_on_plain_def_methods():
    """The threaded channel's refund and query_refund are plain def, and work."""
    channel = SyncSimulatedChannel("a")
    taken = channel.submit(req())

    assert is_sync(channel.refund)
    assert is_sync(channel.query_refund)
    assert Outcome.SUCCEEDED == channel.refund(refund_req(), taken.channel_reference,
                                               AMOUNT).outcome
    assert Outcome.SUCCEEDED == channel.query_refund(refund_req()).outcome
    assert not is_sync(SimulatedChannel("b").refund)


def test_sqlite_ledger_keeps_refunds_in_their_own_table(tmp_path):
    """Refunds survive reopening the file, beside the collections."""
    path = tmp_path / "ledger.db"
    ledger = SQLiteLedger(path)
    ledger.record(collection("k1"))
    ledger.record_refund(refund("k1"))
    ledger.close()
    reopened = SQLiteLedger(path)

    assert [refund("k1")] == reopened.refunds()
    assert refund("k1") == reopened.find_refund("a", "rf-1")
    assert None is reopened.find_refund("a", "rf-2")
    assert [collection("k1")] == reopened.collections()
    reopened.close()


async def test_scripted_channel_refunds_from_its_script_then_succeeds():
    """Scripted refunds: steps first (a Collected step gives back, then answers), then
    success; a refund reference already given back answers SUCCEEDED again."""
    channel = ScriptedChannel("a", refunds=[ChannelResult.declined("refused"),
                                            Collected(ChannelResult.unknown("timeout"))])
    await channel.submit(req())

    assert Outcome.DECLINED == (await channel.refund(refund_req("k1", "rf-1"), None,
                                                     AMOUNT)).outcome
    assert Outcome.UNKNOWN == (await channel.refund(refund_req("k1", "rf-2"), None,
                                                    AMOUNT)).outcome
    assert Outcome.SUCCEEDED == (await channel.refund(refund_req("k1", "rf-2"), None,
                                                      AMOUNT)).outcome
    assert Outcome.SUCCEEDED == (await channel.query_refund(refund_req("k1", "rf-2"))).outcome
    assert ["rf-2"] == [r.refund_reference for r in channel.ledger.refunds()]
    assert not hasattr(ScriptedChannel("b", refunds=False), "refund")


# -- replay


async def _run(seed: int, kind: type[SimulatedChannel]) -> tuple[object, ...]:
    clock, receiver = FakeClock(), Receiver()
    profile = FaultProfile(decline=0.1, unknown_collected=0.1, late_apply_after_query=0.2,
                           late_apply_after_s=45.0, callback_instead=0.1, callback_before=0.3,
                           callback_after=0.3, callback_late=0.5, query_failure=0.2,
                           refund_fail=0.2, refund_unknown_applied=0.2,
                           refund_unknown_not_applied=0.1, refund_unavailable=0.1)
    channel = kind("a", profile, seed=seed, clock=clock, callbacks=receiver)

    async def call(method: str, *args: object) -> ChannelResult:
        answer = getattr(channel, method)(*args)
        return await answer if asyncio.iscoroutine(answer) else answer

    answers = []
    for i in range(40):
        answers.append(await call("submit", req(f"k{i}")))
        clock.advance(3)
        answers.append(await call("query", req(f"k{i}")))
    clock.advance(60)
    for i in range(40):
        for attempt in range(2):
            answers.append(await call("refund", refund_req(f"k{i}", f"rf-{i}"), None, AMOUNT))
            answers.append(await call("query_refund", refund_req(f"k{i}", f"rf-{i}")))
            del attempt
    await channel.drain_callbacks()
    return (tuple(answers), tuple(channel.ledger.collections()),
            tuple(channel.ledger.refunds()), tuple(channel.callbacks_sent),
            tuple(receiver.events))


@pytest.mark.parametrize("kind", [SimulatedChannel, SyncSimulatedChannel])
async def test_every_new_fault_path_replays_from_its_seed(kind):
    """The same seed gives the same answers, ledger, refunds and callbacks."""
    first, again, other = await _run(7, kind), await _run(7, kind), await _run(8, kind)

    assert first == again
    assert first != other
    outcomes = {a.outcome for a in first[0]}  # type: ignore[attr-defined]
    assert {Outcome.SUCCEEDED, Outcome.DECLINED, Outcome.UNKNOWN, Outcome.NOT_FOUND,
            Outcome.UNAVAILABLE} <= outcomes
    assert first[2]  # some refunds were applied
    assert first[3]  # and callbacks sent


async def test_new_faults_at_zero_leave_old_seeds_as_they_were():
    """Refunds and callbacks draw apart: they do not change which submits fail."""
    plain = SimulatedChannel("a", FaultProfile(decline=0.3, unknown_collected=0.3), seed=5)
    busy = SimulatedChannel("a", FaultProfile(decline=0.3, unknown_collected=0.3,
                                              callback_before=0.5, refund_fail=0.5),
                            seed=5, callbacks=Receiver())
    for i in range(30):
        a, b = await plain.submit(req(f"k{i}")), await busy.submit(req(f"k{i}"))
        assert a == b
        await busy.refund(refund_req(f"k{i}", f"rf-{i}"), None, AMOUNT)


def test_fault_profile_checks_its_new_shares():
    """Refund and callback shares are probabilities, summed in their own groups."""
    FaultProfile(refund_fail=0.6, refund_unavailable=0.4, callback_before=0.5,
                 callback_after=0.5, decline=1.0)
    with pytest.raises(ValueError, match="refund"):
        FaultProfile(refund_fail=0.6, refund_unavailable=0.6)
    with pytest.raises(ValueError, match="callback"):
        FaultProfile(callback_before=0.6, callback_after=0.6)
    with pytest.raises(ValueError, match="late_apply_after_s"):
        FaultProfile(late_apply_after_s=-1.0)


# -- audit after the sweep horizon


def test_audit_catches_a_double_refund():
    """One collection given back under two refund references."""
    ledger = MemoryLedger()
    for c in (collection("k1", "a"), collection("k1", "b")):
        ledger.record(c)
    ledger.record_refund(refund("k1", "b", ref="rf-1"))
    ledger.record_refund(refund("k1", "b", ref="rf-2"))
    outcome = audit({"k1": result("k1", S.SUCCEEDED)}, [ledger])

    assert ("k1",) == outcome.refunded_twice
    assert ("k1",) == outcome.refunded_only  # and it left the borrower with nothing paid
    with pytest.raises(AssertionError, match="refunded_twice: k1"):
        assert_invariants(outcome)


def test_audit_catches_a_refund_of_the_only_collection():
    """SUCCEEDED, collected once, and that one given back: nothing is paid."""
    ledger = MemoryLedger()
    ledger.record(collection("k1"))
    ledger.record_refund(refund("k1"))
    outcome = audit({"k1": result("k1", S.SUCCEEDED)}, [ledger])

    assert ("k1",) == outcome.refunded_only
    assert () == outcome.false_successes
    assert not outcome.ok


def test_audit_catches_an_unreversed_duplicate_and_accepts_a_reversed_one():
    """Two collections net one only once the second is given back."""
    ledger = MemoryLedger()
    ledger.record(collection("k1", "a"))
    ledger.record(collection("k1", "b"))
    results = {"k1": result("k1", S.SUCCEEDED)}
    assert ("k1",) == audit(results, [ledger]).duplicates

    ledger.record_refund(refund("k1", "b"))
    outcome = audit(results, [ledger])

    assert outcome.ok
    assert 1 == outcome.refunds
    assert_invariants(outcome, allow_pending=False)


def test_audit_catches_a_borrower_shown_failed_who_paid():
    """A late collection on a FAILED repayment, neither corrected nor given back."""
    ledger = MemoryLedger()
    ledger.record(collection("k1"))
    outcome = audit({"k1": result("k1", S.FAILED)}, [ledger])

    assert ("k1",) == outcome.lost
    ledger.record_refund(refund("k1"))
    assert audit({"k1": result("k1", S.FAILED)}, [ledger]).ok


def test_audit_excuses_keys_on_the_manual_refund_list_and_names_them():
    """A key on the manual list may net more; the audit lists it as money still owed."""
    ledger = MemoryLedger()
    for c in (collection("k1", "a"), collection("k1", "b"), collection("k2", "a")):
        ledger.record(c)
    results = {"k1": result("k1", S.SUCCEEDED), "k2": result("k2", S.FAILED),
               "k3": result("k3", S.SUCCEEDED, channel=None)}
    ledger.record(collection("k3"))
    outcome = audit(results, [ledger], manual=["k1", "k2", "k3"])

    assert outcome.ok
    assert ("k1", "k2") == outcome.manual
    assert ((), ()) == (outcome.duplicates, outcome.lost)


def test_audit_counts_a_partial_refund_by_its_share():
    """Half given back of a second collection still leaves a duplicate half."""
    ledger = MemoryLedger()
    ledger.record(collection("k1", "a"))
    ledger.record(collection("k1", "b"))
    ledger.record_refund(refund("k1", "b", amount=AMOUNT / 2))

    assert ("k1",) == audit({"k1": result("k1", S.SUCCEEDED)}, [ledger]).duplicates


def test_audit_without_refunds_reads_as_before():
    """No refunds: the same verdicts and the same summary as ever."""
    ledger = MemoryLedger()
    ledger.record(collection("k1"))
    outcome = audit({"k1": result("k1", S.SUCCEEDED), "k2": result("k2", S.FAILED)}, [ledger])

    assert outcome.ok
    assert (0, (), (), ()) == (outcome.refunds, outcome.refunded_twice,
                               outcome.refunded_only, outcome.manual)
    assert "refund" not in outcome.summary()


async def test_audit_over_channels_finds_the_late_collection_and_its_reversal():
    """End to end on channels: a late collection after NOT_FOUND is a duplicate for the
    ledger until the channel gives it back."""
    clock, ledger = FakeClock(), MemoryLedger()
    late = SimulatedChannel("a", FaultProfile(late_apply_after_query=1.0,
                                              late_apply_after_s=120.0),
                            clock=clock, ledger=ledger)
    backup = SimulatedChannel("b", clock=clock, ledger=ledger)
    await late.submit(req())
    clock.advance(10)
    assert Outcome.NOT_FOUND == (await late.query(req())).outcome
    await backup.submit(req("k1", "k1/b"))  # the router moved on: the borrower paid on b
    results = {"k1": result("k1", S.SUCCEEDED, channel="b")}
    assert audit(results, [late, backup]).ok  # before the horizon nothing is wrong yet

    clock.advance(120)
    assert ("k1",) == audit(results, [late, backup]).duplicates
    found = await late.query(req())
    await late.refund(refund_req("k1", "k1/a/refund"), found.channel_reference, AMOUNT)

    assert_invariants(audit(results, [late, backup]), allow_pending=False)
