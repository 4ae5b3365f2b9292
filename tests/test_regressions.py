"""One test per defect class found under attack (issue "The promise holds on every path").

Each drives the router through the path that took money twice or broke the contract,
and checks the channels' ledgers, not the router's own bookkeeping.  They use only
``Router(channels, journal, config, clock=...)``, so they run against older code too.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path

import pytest

import failover
from failover import ChannelResult, JournalError, Outcome, RepaymentStatus
from failover.testing import (
    Collected,
    Collection,
    FakeClock,
    MemoryLedger,
    ScriptedChannel,
)

from .conftest import fast, repayment


def collections(*channels: ScriptedChannel) -> list[str]:
    """Every collection in the channels' ledgers, as 'channel:key'."""
    ledgers = {id(c.ledger): c.ledger for c in channels}.values()
    return sorted(f"{c.channel}:{c.repayment_key}" for ledger in ledgers
                  for c in ledger.collections())


async def eventually(condition, limit_s: float = 5.0) -> None:
    """Wait (bounded) for work that carries on in the background."""
    for _ in range(int(limit_s / 0.01)):
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def ended(router: failover.Router) -> bool:
    """Whether the repayment under test is no longer PENDING."""
    result = await router.get(repayment().key)
    return result is not None and result.status is not RepaymentStatus.PENDING


# ---- 1. a submit answering NOT_FOUND stays in doubt -----------------------------------


async def test_a_submit_answering_not_found_is_never_failed_over_from(make_router):
    """A submit that answers NOT_FOUND (after collecting) stays in doubt: while the
    queries prove nothing, reconcile does not move the repayment to another channel."""
    primary = ScriptedChannel("primary", [Collected(ChannelResult.not_found())],
                              queries=[ChannelResult.unknown("query_timeout")] * 6)
    backup = ScriptedChannel("backup", ledger=primary.ledger)
    router = await make_router([primary, backup])

    first = await router.repay(repayment())
    [after] = await router.reconcile()

    assert RepaymentStatus.PENDING == first.status
    assert RepaymentStatus.PENDING == after.status
    assert ["primary:loan-42/instalment-7"] == collections(primary, backup)


# ---- 2. a plain-def adapter outliving its timeout ------------------------------------


class SlowBank:
    """A blocking SDK's adapter: its submit outlives the router's timeout, then collects."""

    name = "slow_bank"
    idempotent = False

    def __init__(self, ledger: MemoryLedger) -> None:
        self.ledger = ledger
        self.release = threading.Event()
        self.entered = threading.Event()

    def submit(self, request: failover.ChannelRequest) -> ChannelResult:
        self.entered.set()
        self.release.wait(10)
        self.ledger.record(Collection(self.name, request.reference, request.repayment_key,
                                      request.amount, "slow-1"))
        return ChannelResult.succeeded("slow-1")

    def query(self, request: failover.ChannelRequest) -> ChannelResult:
        found = self.ledger.find(self.name, request.reference)
        return ChannelResult.succeeded(found.channel_reference) if found \
            else ChannelResult.not_found()


async def test_a_sync_adapter_past_its_timeout_keeps_the_attempt_in_doubt(journal):
    """The thread of a plain-def submit cannot be stopped: while it runs, a NOT_FOUND
    proves nothing; its answer, when it comes, settles the repayment."""
    clock = FakeClock()
    slow = SlowBank(MemoryLedger())
    backup = ScriptedChannel("backup", ledger=slow.ledger)
    config = fast(slow_bank={"timeout_s": 0.05, "settle_s": 0})
    async with failover.Router([slow, backup], journal, config, clock=clock) as router:
        first = await router.repay(repayment())
        slow.release.set()
        await eventually(lambda: ended(router))
        final = await router.get(repayment().key)

    assert RepaymentStatus.PENDING == first.status
    assert (RepaymentStatus.SUCCEEDED, "slow_bank") == (final.status, final.channel)
    assert ["slow_bank:loan-42/instalment-7"] == collections(backup)


async def test_a_hung_sync_channel_does_not_starve_another(make_router):
    """Each plain-def channel has its own threads: one whose calls hang answers
    'busy' (nothing sent) once they are used up, and the others keep working."""
    slow = SlowBank(MemoryLedger())
    backup = ScriptedChannel("backup", ledger=slow.ledger)
    router = await make_router([slow, backup],
                               fast(slow_bank={"timeout_s": 0.05, "sync_workers": 1}))
    try:
        first = await router.repay(repayment(key="a"))
        second = await router.repay(repayment(key="b"))
    finally:
        slow.release.set()

    assert RepaymentStatus.PENDING == first.status
    assert (RepaymentStatus.SUCCEEDED, "backup") == (second.status, second.channel)
    assert "sync_workers_busy" == second.attempts[0].code


# ---- 3. NOT_FOUND soon after a timeout is weak proof ---------------------------------


class QueuedGateway:
    """Times out, but the request sits in the provider's queue and is applied later."""

    name = "gateway"
    idempotent = False

    def __init__(self, clock: FakeClock, ledger: MemoryLedger, delay_s: float) -> None:
        self.clock, self.ledger, self.delay_s = clock, ledger, delay_s
        self.queue: list[tuple[float, failover.ChannelRequest]] = []

    def _apply_due(self) -> None:
        for due, request in [item for item in self.queue if item[0] <= self.clock.monotonic()]:
            self.queue.remove((due, request))
            self.ledger.record(Collection(self.name, request.reference,
                                          request.repayment_key, request.amount, "gw-1"))

    async def submit(self, request: failover.ChannelRequest) -> ChannelResult:
        self.queue.append((self.clock.monotonic() + self.delay_s, request))
        return ChannelResult.unknown("timeout", "read timeout")

    async def query(self, request: failover.ChannelRequest) -> ChannelResult:
        self._apply_due()
        found = self.ledger.find(self.name, request.reference)
        return ChannelResult.succeeded("gw-1") if found else ChannelResult.not_found()


async def test_not_found_right_after_a_timeout_does_not_fail_over(make_router, clock):
    """A NOT_FOUND asked before settle_s has passed is not proof: the router asks again
    after it, and finds the collection the queue applied meanwhile."""
    gateway = QueuedGateway(clock, MemoryLedger(), delay_s=3.0)
    backup = ScriptedChannel("backup", ledger=gateway.ledger)
    router = await make_router([gateway, backup], fast(gateway={"settle_s": 5}))

    result = await router.repay(repayment())
    gateway._apply_due()

    assert (RepaymentStatus.SUCCEEDED, "gateway") == (result.status, result.channel)
    assert ["gateway:loan-42/instalment-7"] == collections(backup)


async def test_settle_s_defaults_to_five_seconds():
    """The documented default."""
    assert 5.0 == failover.ChannelConfig().settle_s


# ---- 4. close() racing repay() -----------------------------------------------------------


async def test_no_call_starts_once_close_has_begun(tmp_path: Path):
    """A repay() still starting when close() begins never calls a channel; its caller
    is told, and the next router (a rolling deploy) collects it exactly once."""
    primary = ScriptedChannel("primary")
    path = tmp_path / "journal.db"
    clock = FakeClock()
    router = failover.Router([primary], failover.SQLiteJournal(path), clock=clock)
    await router.open()
    caller = asyncio.ensure_future(router.repay(repayment()))
    await asyncio.sleep(0)  # the intent is being written
    await router.close()
    [refused] = await asyncio.gather(caller, return_exceptions=True)
    calls_after_close = primary.submits

    async with failover.Router([primary], failover.SQLiteJournal(path), clock=clock) as again:
        await again.wait_recovered()
        final = await again.repay(repayment())  # the client tries again, as told

    assert isinstance(refused, failover.RouterClosedError)
    assert 0 == calls_after_close
    assert RepaymentStatus.SUCCEEDED == final.status
    assert ["primary:loan-42/instalment-7"] == collections(primary)


# ---- 5. two routers on one journal ---------------------------------------------------------


async def test_a_second_router_on_an_open_journal_is_refused(journal, clock):
    """One journal serves one open router: a second one is refused, so a key is never
    driven by two."""
    primary = ScriptedChannel("primary")
    async with failover.Router([primary], journal, clock=clock) as first:
        second = failover.Router([primary], journal, clock=clock)
        with pytest.raises(JournalError, match="already open"):
            await second.open()
        await first.repay(repayment())

    assert ["primary:loan-42/instalment-7"] == collections(primary)


async def test_two_journal_objects_on_one_file_are_refused(tmp_path: Path, clock):
    """Two SQLiteJournal objects on one file: the second router cannot open it."""
    path = tmp_path / "journal.db"
    primary = ScriptedChannel("primary")
    async with failover.Router([primary], failover.SQLiteJournal(path), clock=clock):
        other = failover.Router([primary], failover.SQLiteJournal(path), clock=clock)
        with pytest.raises(JournalError):
            await other.open()


async def test_a_journal_is_free_again_after_its_router_closed(journal, clock):
    """Closing the router lets another open the same journal object."""
    primary = ScriptedChannel("primary")
    async with failover.Router([primary], journal, clock=clock) as first:
        await first.repay(repayment())
    async with failover.Router([primary], journal, clock=clock) as second:
        result = await second.get(repayment().key)

    assert RepaymentStatus.SUCCEEDED == result.status


# ---- 6. a reload racing intent writes ------------------------------------------------------


async def test_a_reload_while_the_intent_is_written_keeps_the_channels(tmp_path: Path, clock):
    """reconfigure() between a repay()'s intent and its first call neither fails it
    with no_eligible_channel nor leaves an attempt 'sent' that was never sent."""
    primary = ScriptedChannel("primary")
    async with failover.Router([primary], failover.SQLiteJournal(tmp_path / "j.db"),
                               fast(primary={"priority": 1}), clock=clock) as router:
        caller = asyncio.ensure_future(router.repay(repayment()))
        await asyncio.sleep(0)  # the intent is being written
        router.reconfigure(fast(primary={"priority": 2}))
        result = await caller

    assert (RepaymentStatus.SUCCEEDED, 1) == (result.status, len(result.attempts))
    assert ["primary:loan-42/instalment-7"] == collections(primary)


# ---- 7. a caller cancelled while its intent is written -------------------------------------


async def test_a_caller_cancelled_mid_intent_leaves_the_repayment_driven(make_router):
    """Cancelling repay() while its intent is written stops the caller's wait only."""
    primary = ScriptedChannel("primary")
    router = await make_router([primary])
    caller = asyncio.ensure_future(router.repay(repayment()))
    await asyncio.sleep(0)
    caller.cancel()

    async def collected() -> bool:
        result = await router.get(repayment().key)
        return result is not None and result.status is RepaymentStatus.SUCCEEDED

    await eventually(collected)
    assert ["primary:loan-42/instalment-7"] == collections(primary)


# ---- 8. an adapter raising CancelledError ---------------------------------------------------


async def test_an_adapter_raising_cancelled_error_is_an_unknown_answer(make_router):
    """CancelledError raised by an adapter (not the router's own cancellation) is an
    UNKNOWN answer: the router asks the channel, and the caller gets the result."""
    primary = ScriptedChannel("primary", [Collected(asyncio.CancelledError())])
    backup = ScriptedChannel("backup", ledger=primary.ledger)
    router = await make_router([primary, backup])

    result = await router.repay(repayment())

    assert (RepaymentStatus.SUCCEEDED, "primary") == (result.status, result.channel)
    assert (Outcome.UNKNOWN, "adapter_cancelled") == (result.attempts[0].outcome,
                                                      result.attempts[0].code)
    assert ["primary:loan-42/instalment-7"] == collections(primary, backup)


async def test_a_query_raising_cancelled_error_does_not_stop_reconcile(make_router):
    """reconcile goes on to the next repayment when a channel's query raises CancelledError."""
    primary = ScriptedChannel(
        "primary", [Collected(ChannelResult.unknown()), Collected(ChannelResult.unknown())],
        queries=[ChannelResult.unknown()] * 6 + [asyncio.CancelledError()])
    router = await make_router([primary])
    await router.repay(repayment(key="a"))
    await router.repay(repayment(key="b"))

    results = await router.reconcile()

    assert {("a", RepaymentStatus.SUCCEEDED), ("b", RepaymentStatus.SUCCEEDED)} \
        == {(r.key, r.status) for r in results}
    assert ["primary:a", "primary:b"] == collections(primary)


# ---- 9. recovery resolves every attempt in doubt -------------------------------------------


async def test_open_resolves_repayments_waiting_for_a_channel(journal, clock):
    """A repayment left PENDING on a channel's answer is resolved when a router opens,
    without a reconcile()."""
    primary = ScriptedChannel("primary", [Collected(ChannelResult.unknown())],
                              queries=[ChannelResult.unknown()] * 3)
    backup = ScriptedChannel("backup", ledger=primary.ledger)
    async with failover.Router([primary, backup], journal, clock=clock) as first:
        pending = await first.repay(repayment())
    async with failover.Router([primary, backup], journal, clock=clock) as second:
        await second.wait_recovered()
        final = await second.get(repayment().key)

    assert RepaymentStatus.PENDING == pending.status
    assert (RepaymentStatus.SUCCEEDED, "primary") == (final.status, final.channel)
    assert ["primary:loan-42/instalment-7"] == collections(primary, backup)


# ---- 11. concurrent retry -----------------------------------------------------------------


async def test_concurrent_retries_join_one_new_round(make_router):
    """Two retry(key) at once both get the one new round's result."""
    card = ScriptedChannel("card", [ChannelResult.declined("insufficient_funds")])
    router = await make_router([card])
    await router.repay(repayment())

    first, second = await asyncio.gather(router.retry(repayment().key),
                                         router.retry(repayment().key))

    assert first == second
    assert (RepaymentStatus.SUCCEEDED, 2) == (first.status, first.round)
    assert ["card:loan-42/instalment-7"] == collections(card)


# ---- 12. no call after the deadline --------------------------------------------------------


class Timed(ScriptedChannel):
    """Records the clock's time of every submit and query."""

    def __init__(self, name: str, clock: FakeClock, *args, **kwargs) -> None:
        super().__init__(name, *args, **kwargs)
        self.clock = clock
        self.times: list[float] = []

    async def submit(self, request):
        self.times.append(self.clock.monotonic())
        return await super().submit(request)

    async def query(self, request):
        self.times.append(self.clock.monotonic())
        return await super().query(request)


async def test_no_retry_starts_after_the_deadline(make_router, clock):
    """A backoff that would end past deadline_s is not waited out: no call starts late."""
    down = ChannelResult.unavailable("service_unavailable")
    primary = Timed("primary", clock, [down] * 5)
    config = failover.RouterConfig.model_validate({
        "deadline_s": 1.0,
        "channels": {"primary": {"retry": {"max_attempts": 5, "initial_backoff_s": 0.6,
                                           "max_backoff_s": 2}}},
    })
    router = await make_router([primary], config)

    result = await router.repay(repayment())

    assert RepaymentStatus.FAILED == result.status
    assert [] == [t for t in primary.times if t >= 1.0]
    assert [] == collections(primary)


async def test_no_query_starts_after_the_deadline(make_router, clock):
    """Queries are calls too: none starts after the deadline; the repayment waits PENDING."""
    primary = Timed("primary", clock, [Collected(ChannelResult.unknown())],
                    queries=[ChannelResult.unknown()] * 10)
    config = failover.RouterConfig.model_validate({"deadline_s": 0.1})
    router = await make_router([primary], config, query_backoff_s=0.06)

    result = await router.repay(repayment())

    assert RepaymentStatus.PENDING == result.status
    assert [] == [t for t in primary.times if t >= 0.1]


# ---- 13. a half-open trial permit is not leaked by close() ----------------------------------


async def test_close_does_not_leak_a_half_open_trial(journal, clock):
    """A repayment stopped by close() before its first step gives its breaker trial back:
    after re-opening, the channel is tried again."""
    primary = ScriptedChannel("primary", [ChannelResult.unavailable()])
    backup = ScriptedChannel("backup", ledger=primary.ledger)
    config = fast(primary={"retry": {"max_attempts": 1},
                           "breaker": {"fail_max": 1, "reset_timeout_s": 5}})
    router = failover.Router([primary, backup], journal, config, clock=clock)
    await router.open()
    await router.repay(repayment(key="trips"))
    clock.advance(10)  # half-open: one trial call is allowed
    caller = asyncio.ensure_future(router.repay(repayment(key="cut")))
    await asyncio.sleep(0)
    await router.close()
    [cut] = await asyncio.gather(caller, return_exceptions=True)

    await router.open()
    try:
        await router.wait_recovered()
        later = await router.repay(repayment(key="later"))
    finally:
        await router.close()

    assert isinstance(cut, failover.RouterClosedError)
    assert "primary" == later.channel
    assert ["backup:trips", "primary:later"] == collections(primary, backup)


# ---- 15. smaller defects ----------------------------------------------------------------------


class Malformed(ScriptedChannel):
    """Collects, then answers a ChannelResult a journal cannot store."""

    async def submit(self, request):
        self.requests.append(request)
        self._record(request)
        return ChannelResult(Outcome.SUCCEEDED, detail=object())  # type: ignore[arg-type]


async def test_a_malformed_answer_is_unknown_bad_result(make_router):
    """An answer with fields of the wrong type is UNKNOWN bad_result on every journal;
    the query then finds the collection."""
    primary = Malformed("primary")
    router = await make_router([primary])

    result = await router.repay(repayment())

    assert (Outcome.UNKNOWN, "bad_result") == (result.attempts[0].outcome,
                                               result.attempts[0].code)
    assert RepaymentStatus.SUCCEEDED == result.status
    assert ["primary:loan-42/instalment-7"] == collections(primary)


class FailingOpen(failover.MemoryJournal):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    async def pending_keys(self, reason=None):
        if self.fail:
            raise failover.JournalError("disk on fire")
        return await super().pending_keys(reason)


async def test_a_failed_open_leaves_the_router_closed_and_the_journal_free(clock):
    """open() that fails leaves nothing open: repay() is refused, the journal can be
    opened again."""
    journal = FailingOpen()
    primary = ScriptedChannel("primary")
    router = failover.Router([primary], journal, clock=clock)
    with pytest.raises(JournalError, match="disk on fire"):
        await router.open()
    with pytest.raises(failover.RouterClosedError):
        await router.repay(repayment())
    journal.fail = False
    async with failover.Router([primary], journal, clock=clock) as again:
        result = await again.repay(repayment())

    assert RepaymentStatus.SUCCEEDED == result.status
    assert ["primary:loan-42/instalment-7"] == collections(primary)


@pytest.mark.parametrize("name", ["recovery_concurrency", "query_attempts"])
def test_zero_concurrency_or_query_attempts_is_refused(name):
    """recovery_concurrency=0 would recover nothing; it is refused, naming the argument."""
    with pytest.raises(ValueError, match=name):
        failover.Router([ScriptedChannel("primary")], failover.MemoryJournal(), **{name: 0})


# ---- found by a review of the rebuilt router ------------------------------------------------


class RacingQueryBank(SlowBank):
    """Its status query answers NOT_FOUND while the submit's thread still runs, and the
    thread lands and ends before that answer reaches the router."""

    name = "slow_bank"

    async def query(self, request: failover.ChannelRequest) -> ChannelResult:
        found = self.ledger.find(self.name, request.reference)
        answer = ChannelResult.succeeded("slow-1") if found else ChannelResult.not_found()
        self.release.set()
        for _ in range(500):  # the round trip home: the thread ends meanwhile
            if self.ledger.find(self.name, request.reference) is not None:
                break
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.01)
        return answer


async def test_a_not_found_asked_while_the_thread_ran_is_no_proof(journal):
    """The thread's state is read when the query is asked, not when it answers."""
    slow = RacingQueryBank(MemoryLedger())
    backup = ScriptedChannel("backup", ledger=slow.ledger)
    config = fast(slow_bank={"timeout_s": 0.05, "settle_s": 0})
    async with failover.Router([slow, backup], journal, config, clock=FakeClock()) as router:
        await router.repay(repayment())
        await eventually(lambda: ended(router))

    assert ["slow_bank:loan-42/instalment-7"] == collections(backup)


class DedupBank(SlowBank):
    """Deduplicates by reference, but answers a resubmit that arrives while the first
    submit is still being processed with a decline; its query cannot tell meanwhile."""

    name = "dedup_bank"
    idempotent = True

    def __init__(self, ledger: MemoryLedger) -> None:
        super().__init__(ledger)
        self.calls = 0

    def submit(self, request: failover.ChannelRequest) -> ChannelResult:
        self.calls += 1
        if self.calls > 1:
            return ChannelResult.declined("duplicate_in_progress")
        return super().submit(request)

    def query(self, request: failover.ChannelRequest) -> ChannelResult:
        found = self.ledger.find(self.name, request.reference)
        return ChannelResult.succeeded("slow-1") if found else ChannelResult.unknown("busy")


async def test_no_resubmit_while_our_own_submit_still_runs(journal):
    """An idempotent channel is not asked again while the first submit's thread runs:
    an answer to the resubmit says nothing about that thread."""
    bank = DedupBank(MemoryLedger())
    backup = ScriptedChannel("backup", ledger=bank.ledger)
    config = fast(dedup_bank={"timeout_s": 0.05})
    async with failover.Router([bank, backup], journal, config, clock=FakeClock()) as router:
        first = await router.repay(repayment())
        bank.release.set()
        await eventually(lambda: ended(router))

    assert (RepaymentStatus.PENDING, 1) == (first.status, bank.calls)
    assert ["dedup_bank:loan-42/instalment-7"] == collections(backup)


async def test_a_new_router_sees_threads_a_closed_one_left_running():
    """close() while a plain-def submit still blocks; a new router on the same journal,
    with adapters built afresh, does not fail over while that thread can still send."""
    ledger, journal, clock = MemoryLedger(), failover.MemoryJournal(), FakeClock()
    first_bank = SlowBank(ledger)
    config = fast(slow_bank={"timeout_s": 0.05})
    async with failover.Router([first_bank, ScriptedChannel("backup", ledger=ledger)],
                               journal, config, clock=clock) as first:
        await first.repay(repayment())
        await first.close(grace_s=0)
    async with failover.Router([SlowBank(ledger), ScriptedChannel("backup", ledger=ledger)],
                               journal, config, clock=clock) as second:
        await second.wait_recovered()
        while_running = await second.get(repayment().key)
        first_bank.release.set()
        await eventually(lambda: asyncio.sleep(0, not first_bank.entered.is_set()
                                               or bool(ledger.collections())))
        clock.advance(10)
        [final] = await second.reconcile()

    assert RepaymentStatus.PENDING == while_running.status
    assert (RepaymentStatus.SUCCEEDED, "slow_bank") == (final.status, final.channel)
    assert ["slow_bank:loan-42/instalment-7"] == sorted(
        f"{c.channel}:{c.repayment_key}" for c in ledger.collections())


async def test_a_conflicting_repay_before_the_intent_is_written_is_refused(tmp_path: Path):
    """Same key, other amount, while the first repay() is still writing its intent:
    IdempotencyConflict, and only the first amount is collected."""
    primary = ScriptedChannel("primary")
    async with failover.Router([primary], failover.SQLiteJournal(tmp_path / "j.db"),
                               clock=FakeClock()) as router:
        first = asyncio.ensure_future(router.repay(repayment(amount="100.00")))
        await asyncio.sleep(0)
        with pytest.raises(failover.IdempotencyConflict):
            await router.repay(repayment(amount="999.00"))
        await first

    assert ["100.00"] == [str(c.amount) for c in primary.ledger.collections()]


async def test_a_cancelled_close_still_closes(tmp_path: Path):
    """close() cancelled during its grace period (a shutdown timeout) still leaves the
    router closed and the journal free for the next router."""
    slow = SlowBank(MemoryLedger())
    path = tmp_path / "j.db"
    config = fast(slow_bank={"timeout_s": 0.05})
    router = failover.Router([slow], failover.SQLiteJournal(path), config, clock=FakeClock())
    await router.open()
    await router.repay(repayment())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(router.close(grace_s=30), 0.05)
    slow.release.set()
    await router.close()  # waits for the first close, which goes on
    async with failover.Router([slow], failover.SQLiteJournal(path), config,
                               clock=FakeClock()) as again:
        assert again.is_open
    assert not router.is_open


async def test_retry_corrects_a_failed_repayment_a_channel_reports_collected(make_router):
    """A late SUCCEEDED journaled on a FAILED repayment: retry() does not collect again;
    it corrects the ending to SUCCEEDED (the borrower paid) and keeps the old one."""
    card = ScriptedChannel("card", [ChannelResult.declined()])
    router = await make_router([card])
    failed = await router.repay(repayment())
    # What a late thread answer does: the attempt's own answer is journaled as SUCCEEDED.
    await router._journal.finish_attempt(failed.key, 1, ChannelResult.succeeded("late-1"),
                                         FakeClock().now())

    result = await router.retry(failed.key)

    assert (RepaymentStatus.SUCCEEDED, "card", "late-1") == (
        result.status, result.channel, result.channel_reference)
    assert [(RepaymentStatus.FAILED, RepaymentStatus.SUCCEEDED)] == [
        (c.old_status, c.new_status) for c in result.corrections]
    assert [] == collections(card)  # nothing more was asked of the channel
    assert 1 == card.submits


class ExitingSDK:
    name = "exiting"
    idempotent = False

    def submit(self, request: failover.ChannelRequest) -> ChannelResult:
        raise SystemExit("sdk gave up")

    def query(self, request: failover.ChannelRequest) -> ChannelResult:
        return ChannelResult.not_found()


async def test_system_exit_in_an_adapter_thread_is_an_unknown_answer(make_router):
    """sys.exit() in a plain-def adapter ends its thread, not the service: UNKNOWN."""
    backup = ScriptedChannel("backup")
    router = await make_router([ExitingSDK(), backup], fast(exiting={"settle_s": 0}))

    result = await router.repay(repayment())

    assert (Outcome.UNKNOWN, "adapter_error") == (result.attempts[0].outcome,
                                                  result.attempts[0].code)
    assert ["backup:loan-42/instalment-7"] == collections(backup)


class SteppedClock(FakeClock):
    """A wall clock that an NTP step moves, while monotonic time does not."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0.0

    def now(self):
        from datetime import timedelta

        return super().now() + timedelta(seconds=self.step)


async def test_a_wall_clock_step_does_not_shorten_settle_s(make_router):
    """settle_s is measured on the monotonic clock: a wall-clock step forward does not
    make a NOT_FOUND asked too soon count as proof."""
    clock = SteppedClock()
    gateway = QueuedGateway(clock, MemoryLedger(), delay_s=3.0)
    backup = ScriptedChannel("backup", ledger=gateway.ledger)
    config = failover.RouterConfig.model_validate({"deadline_s": 2.0})
    router = await make_router([gateway, backup], config, clock=clock)
    first = await router.repay(repayment())
    clock.step = 3600.0
    clock.advance(0.5)
    [after] = await router.reconcile()
    clock.advance(3.0)
    gateway._apply_due()

    assert (RepaymentStatus.PENDING, RepaymentStatus.PENDING) == (first.status, after.status)
    assert ["gateway:loan-42/instalment-7"] == collections(backup)


class QueueingGateway:
    """Deduplicates by reference; its first submit times out without collecting; a
    resubmit is received and applied a second later, and its answer never comes."""

    name = "gw"
    idempotent = True

    def __init__(self, clock: FakeClock, ledger: MemoryLedger) -> None:
        self.clock, self.ledger = clock, ledger
        self.submits = self.queries = 0
        self.queue: list[tuple[float, failover.ChannelRequest]] = []

    def apply_due(self) -> None:
        for due, request in [item for item in self.queue if item[0] <= self.clock.monotonic()]:
            self.queue.remove((due, request))
            if self.ledger.find(self.name, request.reference) is None:
                self.ledger.record(Collection(self.name, request.reference,
                                              request.repayment_key, request.amount, "gw-1"))

    async def submit(self, request: failover.ChannelRequest) -> ChannelResult:
        self.apply_due()
        self.submits += 1
        if self.submits == 1:
            return ChannelResult.unknown("gateway_timeout")
        self.queue.append((self.clock.monotonic() + 1.0, request))
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def query(self, request: failover.ChannelRequest) -> ChannelResult:
        self.apply_due()
        self.queries += 1
        if self.queries <= 3:
            return ChannelResult.unknown("status_lag")
        found = self.ledger.find(self.name, request.reference)
        return ChannelResult.succeeded("gw-1") if found else ChannelResult.not_found()


async def test_reopening_the_same_router_waits_settle_s_for_a_cut_off_resubmit(clock):
    """A resubmit cut off by close(): the same router opened again counts settle_s from
    its opening, not from an earlier call with that reference."""
    ledger = MemoryLedger()
    gateway = QueueingGateway(clock, ledger)
    backup = ScriptedChannel("backup", ledger=ledger)
    config = fast(gw={"timeout_s": 30.0, "settle_s": 5.0,
                      "retry": {"initial_backoff_s": 6.0, "max_backoff_s": 6.0}})
    router = failover.Router([gateway, backup], failover.MemoryJournal(), config, clock=clock)
    await router.open()
    caller = asyncio.ensure_future(router.repay(repayment()))
    for _ in range(1000):
        if gateway.submits == 2:
            break
        await asyncio.sleep(0)
    await router.close(grace_s=0)
    await asyncio.gather(caller, return_exceptions=True)
    await router.open()
    try:
        await router.wait_recovered()
        clock.advance(2.0)
        gateway.apply_due()
    finally:
        await router.close(grace_s=0)

    assert ["gw:loan-42/instalment-7"] == collections(backup)


async def test_joining_callers_are_compared_with_the_stored_repayment(make_router):
    """Callers of a key being resumed are compared with the journal's repayment, not with
    whichever caller started the resumption."""
    primary = ScriptedChannel("primary", [Collected(ChannelResult.unknown())],
                              queries=[ChannelResult.unknown()] * 3)
    router = await make_router([primary])
    await router.repay(repayment(amount="100.00"))  # left PENDING

    outcomes = await asyncio.gather(router.repay(repayment(amount="200.00")),
                                    router.repay(repayment(amount="200.00")),
                                    router.repay(repayment(amount="100.00")),
                                    return_exceptions=True)

    assert [failover.IdempotencyConflict, failover.IdempotencyConflict,
            failover.RepaymentResult] == [type(o) for o in outcomes]
    assert ["100.00"] == [str(c.amount) for c in primary.ledger.collections()]


@pytest.mark.parametrize("steps", [0, 1, 2])
async def test_a_caller_joining_a_repayment_stopped_before_it_ran_is_answered(journal, steps):
    """A second caller of a key whose task close() stops before its intent is written
    gets an answer (RouterClosedError), never a wait that cannot end."""
    primary = ScriptedChannel("primary")
    router = failover.Router([primary], journal, clock=FakeClock())
    await router.open()
    callers = [asyncio.ensure_future(router.repay(repayment())) for _ in range(2)]
    for _ in range(steps):
        await asyncio.sleep(0)
    await router.close(grace_s=0)

    done, pending = await asyncio.wait(callers, timeout=5)

    assert set() == pending
    for caller in done:
        assert caller.cancelled() or caller.exception() is None \
            or isinstance(caller.exception(), failover.RouterClosedError)


async def test_a_symlink_to_an_open_journal_is_refused(tmp_path: Path, clock):
    """The one-writer lock is taken on the real file: a second router reaching the same
    journal through a symlink is refused, so the two cannot both drive a key."""
    real = tmp_path / "journal.db"
    link = tmp_path / "alias.db"
    link.symlink_to(real)
    primary = ScriptedChannel("primary")
    async with failover.Router([primary], failover.SQLiteJournal(real), clock=clock):
        other = failover.Router([primary], failover.SQLiteJournal(link), clock=clock)
        with pytest.raises(JournalError, match="open for writing"):
            await other.open()


async def test_an_open_cut_short_does_not_block_the_loop(tmp_path: Path, clock):
    """open() cancelled while the journal is still opening (a shutdown timeout), then
    close(): both return, and the journal can be opened again."""
    path = tmp_path / "journal.db"
    primary = ScriptedChannel("primary")
    router = failover.Router([primary], failover.SQLiteJournal(path), clock=clock)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(router.open(), 0.0001)
    await asyncio.wait_for(router.close(grace_s=0), 5)
    await asyncio.wait_for(router.close(grace_s=0), 5)  # whatever the open did meanwhile

    async with failover.Router([primary], failover.SQLiteJournal(path), clock=clock) as again:
        result = await again.repay(repayment())
    assert ["primary:loan-42/instalment-7"] == collections(primary)
    assert RepaymentStatus.SUCCEEDED == result.status


def _logged(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        return method(*args, **kwargs)

    return wrapper


class DecoratedGateway(ScriptedChannel):
    """An async adapter whose methods a plain (functools.wraps) decorator wraps."""

    submit = _logged(ScriptedChannel.submit)
    query = _logged(ScriptedChannel.query)


async def test_a_decorated_async_adapter_is_awaited_not_threaded(make_router):
    """A decorated async def is still async: it is awaited, and collects once."""
    gateway = DecoratedGateway("gateway")
    router = await make_router([gateway])

    result = await router.repay(repayment())

    assert (RepaymentStatus.SUCCEEDED, "gateway") == (result.status, result.channel)
    assert ["gateway:loan-42/instalment-7"] == collections(gateway)
