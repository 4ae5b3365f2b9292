"""Property tests: the real Router against simulated channels, with faults, crashes and
resubmits, the invariants of DESIGN §4 checked against the channels' ledgers after every step.

Besides channel faults the machine generates, by itself, the paths that took money twice
or broke the contract before: submits answering NOT_FOUND, plain-``def`` adapters whose
threads outlive the timeout (auto_debit is one), gateways that apply a submit late,
close/open cycles with calls in the air, reloads while intents are written, callers
cancelled mid-write, adapters raising CancelledError, and crashes during reconcile.

Sizes come from the Hypothesis profile loaded in conftest.py ("ci": 200 examples x 50 steps).
Everything is seeded by Hypothesis' draws; a failure prints the blob that replays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import tempfile
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import failover
from failover import IdempotencyConflict, Outcome, Repayment, RepaymentStatus, _decisions
from failover._decisions import Verdict
from failover.testing import (
    FakeClock,
    FaultProfile,
    MemoryLedger,
    SimulatedChannel,
    SimulatedCrash,
    SyncSimulatedChannel,
    assert_invariants,
    audit,
    crash,
)

from . import pg

CHANNELS = ("auto_debit", "card", "wallet")
IDEMPOTENT = {"auto_debit": False, "card": True, "wallet": False}

PROFILES = {
    "healthy": FaultProfile(),
    "flaky": FaultProfile(unavailable=0.3, decline=0.1),
    "ambiguous": FaultProfile(unknown_collected=0.25, unknown_not_collected=0.25,
                              query_failure=0.4),
    "down": FaultProfile(unavailable=1.0),
    "broke": FaultProfile(decline=0.6, reject=0.05),
    "crashy": FaultProfile(unknown_collected=0.1, crash_before=0.05, crash_after=0.05,
                           query_failure=0.2),
    "black_hole": FaultProfile(unknown_collected=0.5, unknown_not_collected=0.5,
                               query_failure=1.0),
    "confused": FaultProfile(not_found_collected=0.4, query_failure=0.7),
    "queued": FaultProfile(late_apply=0.5, late_apply_s=4.0),
    "buggy": FaultProfile(raise_cancelled=0.4),
    "overrunning": FaultProfile(overrun=0.5),
    # Applied after a status query said NOT_FOUND: found by the sweep or a callback.
    "late": FaultProfile(late_apply_after_query=0.4, late_apply_after_s=120.0,
                         callback_late=0.5),
    "chatty": FaultProfile(unknown_collected=0.2, callback_instead=0.3, callback_before=0.3,
                           callback_after=0.3, query_failure=0.5),
    "refunds_fail": FaultProfile(late_apply_after_query=0.4, late_apply_after_s=30.0,
                                 refund_fail=0.2, refund_unknown_applied=0.25,
                                 refund_unknown_not_applied=0.25, refund_unavailable=0.2),
}
LATE_PROFILES = {"late", "chatty", "refunds_fail"}
"""Profiles that can leave a second collection (or a FAILED repayment's money) standing
until the late-collection sweep makes it right."""
REFUNDS = {"auto_debit": True, "card": True, "wallet": False}
"""wallet cannot refund: its second collections go to the manual-refund list."""
SETTLE_S = 5.0
CONFIG = failover.RouterConfig.model_validate({
    "deadline_s": 60,
    "channels": {
        name: {"retry": {"max_attempts": 3, "initial_backoff_s": 0.1, "max_backoff_s": 1},
               "breaker": {"fail_max": 4, "reset_timeout_s": 20}, "settle_s": SETTLE_S,
               # auto_debit runs on threads; a FakeClock timeout also ends after as many
               # real seconds, so an overrunning thread costs 20 ms of real time.
               "timeout_s": 0.02 if name == "auto_debit" else 10}
        for name in CHANNELS
    },
    "late": {"checks_s": [10, 600], "retry_s": 30},
})
HORIZON_S = 600.0
RELOADS = [
    failover.RouterConfig.model_validate({
        **CONFIG.model_dump(),
        "channels": {name: {**CONFIG.channels[name].model_dump(), "priority": rank,
                            "enabled": name != disabled}
                     for rank, name in enumerate(order)},
    })
    for order, disabled in [
        (CHANNELS, None), (CHANNELS[::-1], None), (("card", "auto_debit", "wallet"), "wallet"),
        (CHANNELS, "auto_debit"),
    ]
]
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else None


class CrashingJournal:
    """Wraps a journal; when armed, the process "dies" right after the next write
    (the write is durable, nothing after it happens): the crash points between
    journal writes that channel faults alone cannot reach."""

    WRITES = ("begin_attempt", "finish_attempt", "resolve_attempts", "set_pending", "finish")

    def __init__(self, inner: failover.Journal) -> None:
        self.inner = inner
        self.armed_after: int | None = None

    def __getattr__(self, name: str):
        method = getattr(self.inner, name)
        if name not in self.WRITES:
            return method

        async def write(*args, **kwargs):
            value = await method(*args, **kwargs)
            if self.armed_after is not None:
                self.armed_after -= 1
                if self.armed_after < 0:
                    self.armed_after = None
                    self.on_crash()
                    raise SimulatedCrash(f"crash after journal {name}")
            return value

        return write

    def on_crash(self) -> None:
        """Set by the machine: stops the router, as the process dying would."""


class RouterMachine(RuleBasedStateMachine):
    """Drives a Router like a busy payments service would, crashes included."""

    journal_kind = "memory"
    router_class: type[failover.Router] = failover.Router

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.ledger = MemoryLedger()
        self.accepted: dict[str, Repayment] = {}
        self.succeeded: dict[str, str | None] = {}
        self.serial = 0
        self.crashes = 0
        self.callers: dict[asyncio.Task, Repayment] = {}
        self.seen_pending = False
        self.late_exposed = False
        self.corrected = 0
        self.folder = tempfile.mkdtemp(prefix="failover-prop-", dir=SHM)
        self.journal: failover.Journal = self._journal()
        self.channels: dict[str, SimulatedChannel] = {}
        self.router: failover.Router | None = None

    keys = Bundle("keys")

    def _journal(self) -> failover.Journal:
        if self.journal_kind == "sqlite":
            return failover.SQLiteJournal(Path(self.folder) / "journal.db")
        if self.journal_kind == "postgres":
            # One instance name for every journal of the run: a restarted instance takes
            # its repayments back at once, so leases never need to run out on real time.
            if not hasattr(self, "schema"):
                self.schema = pg.new_schema()
            return failover.PostgresJournal(pg.require(), schema=self.schema,
                                            instance="machine", lease_s=60, migrate=True)
        return getattr(self, "journal", None) or failover.MemoryJournal()

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def open_router(self) -> None:
        self.crashing = CrashingJournal(self.journal)
        self.router = router = self.router_class(
            list(self.channels.values()), self.crashing, self.config,
            clock=self.clock, background=False,
        )
        self.crashing.on_crash = lambda: crash(router)
        for channel in self.channels.values():
            if not isinstance(channel, SyncSimulatedChannel):
                channel.on_crash = lambda: crash(router)
        self.run(self.router.open())

    @initialize(seed=st.integers(0, 2**32 - 1))
    def start(self, seed: int) -> None:
        self.config = CONFIG
        for name in CHANNELS:
            kind = SyncSimulatedChannel if name == "auto_debit" else SimulatedChannel
            self.channels[name] = kind(
                name, PROFILES["healthy"], seed=seed, idempotent=IDEMPOTENT[name],
                clock=self.clock, ledger=self.ledger, callbacks=self.callback,
                refunds=REFUNDS[name],
            )
        self.open_router()

    async def callback(self, channel: str, reference: str,
                       result: failover.ChannelResult) -> None:
        """A provider's webhook reaches whichever router is open (a service behind a load
        balancer); one that reaches a closed or crashing router is lost, as a webhook
        answered 503 would be until the provider retries."""
        router = self.router
        if router is None or not router.is_open:
            return
        with contextlib.suppress(SimulatedCrash, failover.RouterClosedError):
            await router.notify(channel, reference, result)

    def crash_and_restart(self) -> None:
        """Drop the router without closing it (nothing more is written), reopen the journal."""
        assert self.router is not None
        self.crashes += 1
        crash(self.router)
        self.run(asyncio.sleep(0))  # let the cancelled tasks unwind, as a dying process would
        if self.journal_kind != "memory":
            self.run(self.journal.close())
            self.journal = self._journal()
        self.open_router()

    def repay(self, repayment: Repayment) -> None:
        """repay(), as a client does it: when the router went down under the call (its
        intent may or may not be written), the client calls again on the new one."""
        for _ in range(5):
            assert self.router is not None
            try:
                self.run(self.router.repay(repayment))
                return
            except (SimulatedCrash, failover.RouterClosedError):
                self.crash_and_restart()

    def new_repayment(self, amount: int = 1000) -> Repayment:
        self.serial += 1
        key = f"loan-{self.serial}"
        repayment = Repayment(key=key, account=f"acct-{self.serial:08d}",
                              amount=Decimal(amount).scaleb(-2), currency="CNY")
        self.accepted[key] = repayment
        return repayment

    def start_callers(self, count: int) -> list[asyncio.Task]:
        """New repayments whose repay() has begun (its task registered), not finished."""
        assert self.router is not None
        tasks = []
        for _ in range(count):
            tasks.append(self.spawn(self.new_repayment()))
        self.run(asyncio.sleep(0))  # each repay() runs to its first await
        return tasks

    def spawn(self, repayment: Repayment) -> asyncio.Task:
        assert self.router is not None
        task = self.loop.create_task(self.router.repay(repayment))
        self.callers[task] = repayment
        return task

    def step(self, steps: int) -> None:
        for _ in range(steps):
            self.run(asyncio.sleep(0))

    def finish_callers(self, tasks: list[asyncio.Task], reopen: bool = False) -> None:
        """Wait for the callers; a caller told the router closed tries again (a client's
        retry), on a router opened anew if ``reopen``, as a service's client would."""
        outcomes = self.run(asyncio.gather(*tasks, return_exceptions=True))
        errors = [o for o in outcomes if isinstance(o, BaseException)
                  and not isinstance(o, SimulatedCrash | failover.RouterClosedError
                                     | asyncio.CancelledError)]
        assert not errors, errors
        again = [self.callers.pop(task) for task, outcome in zip(tasks, outcomes, strict=True)
                 if isinstance(outcome, failover.RouterClosedError | SimulatedCrash)
                 and task in self.callers]
        for task in tasks:
            self.callers.pop(task, None)
        if reopen:
            self.reopen()
        elif any(isinstance(o, SimulatedCrash | failover.RouterClosedError) for o in outcomes):
            self.crash_and_restart()
        for repayment in again:
            self.repay(repayment)

    def reopen(self) -> None:
        if self.journal_kind != "memory":
            self.run(self.journal.close())
            self.journal = self._journal()
        self.open_router()

    @rule(target=keys, amount=st.integers(1, 500_000))
    def submit(self, amount: int) -> str:
        repayment = self.new_repayment(amount)
        self.repay(repayment)
        return repayment.key

    @rule(count=st.integers(1, 4), steps=st.integers(0, 6), grace=st.sampled_from([0, 0.5]))
    def close_with_calls_in_air(self, count: int, steps: int, grace: float) -> None:
        """close(grace_s) while repayments are being written and called; a new router
        (a rolling deploy) opens the journal right after."""
        assert self.router is not None
        tasks = self.start_callers(count)
        self.step(steps)
        with contextlib.suppress(SimulatedCrash):
            self.run(self.router.close(grace_s=grace))
        self.finish_callers(tasks, reopen=True)

    @rule(count=st.integers(1, 4), steps=st.integers(0, 6),
          reload=st.integers(0, len(RELOADS) - 1))
    def reload_while_writing(self, count: int, steps: int, reload: int) -> None:
        """reconfigure() between the steps of repayments in flight."""
        assert self.router is not None
        tasks = self.start_callers(count)
        self.step(steps)
        self.config = RELOADS[reload]
        self.router.reconfigure(self.config)
        self.finish_callers(tasks)

    @rule(steps=st.integers(1, 6))
    def cancel_a_caller(self, steps: int) -> None:
        """A caller gives up while its intent or its calls are in flight: the repayment
        carries on without it."""
        [task] = self.start_callers(1)
        self.step(steps - 1)
        task.cancel()
        self.finish_callers([task])

    @rule()
    def auto_debit_threads_overrun(self) -> None:
        """The plain-def channel's submits start to outlive their timeout (a rule of its
        own: among every channel x profile pair it would come up too seldom)."""
        self.channels["auto_debit"].profile = PROFILES["overrunning"]

    @rule()
    def overrunning_threads_finish(self) -> None:
        """Plain-def submits that outlived their timeout answer at last."""
        channel = self.channels["auto_debit"]
        assert isinstance(channel, SyncSimulatedChannel)
        channel.release_overruns()
        self.wait_for_threads()
        channel.hold_overruns()

    def wait_for_threads(self) -> None:
        channel = self.channels["auto_debit"]
        assert isinstance(channel, SyncSimulatedChannel)
        for _ in range(2000):  # bounded: real threads, released, end within milliseconds
            if channel.overrunning == 0:
                break
            self.run(asyncio.sleep(0.001))
        self.step(5)  # their answers reach the loop and the journal

    @rule(count=st.integers(2, 8), duplicates=st.integers(0, 3))
    def submit_concurrently(self, count: int, duplicates: int) -> None:
        """Several repayments at once, some keys twice; a crash takes them all down."""
        assert self.router is not None
        batch = [self.new_repayment() for _ in range(count)]
        batch += batch[:duplicates]
        self.finish_callers([self.spawn(repayment) for repayment in batch])

    @rule(key=keys)
    def resubmit_same(self, key: str) -> None:
        self.repay(self.accepted[key])

    @rule(key=keys)
    def resubmit_conflicting(self, key: str) -> None:
        assert self.router is not None
        other = self.accepted[key].model_copy(update={"amount": Decimal("0.01")
                                                      + self.accepted[key].amount})
        with pytest.raises(IdempotencyConflict):
            self.run(self.router.repay(other))

    @rule(channel=st.sampled_from(CHANNELS), profile=st.sampled_from(sorted(PROFILES)))
    def change_faults(self, channel: str, profile: str) -> None:
        self.channels[channel].profile = PROFILES[profile]
        self.late_exposed = self.late_exposed or profile in LATE_PROFILES

    @rule(seconds=st.sampled_from([1, 10, 30, 300, 900]))
    def time_passes(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule()
    def sweep(self) -> None:
        """The background loop's late-collection pass: re-queries, corrections, refunds."""
        assert self.router is not None
        try:
            self.run(self.router.sweep())
        except (SimulatedCrash, failover.RouterClosedError):
            self.crash_and_restart()
        self.run(self.drain_callbacks())

    async def drain_callbacks(self) -> None:
        for channel in self.channels.values():
            await channel.drain_callbacks()

    @rule()
    def crash(self) -> None:
        self.crash_and_restart()

    @rule(writes=st.integers(0, 6), amount=st.integers(1, 500_000))
    def submit_and_crash_between_writes(self, writes: int, amount: int) -> None:
        """The process dies right after the n-th journal write of a new repayment."""
        self.crashing.armed_after = writes
        self.submit(amount)
        self.crashing.armed_after = None

    @rule()
    def reconcile(self) -> None:
        assert self.router is not None
        try:
            self.run(self.router.reconcile())
        except (SimulatedCrash, failover.RouterClosedError):
            self.crash_and_restart()

    @rule(writes=st.integers(0, 6))
    def reconcile_and_crash_between_writes(self, writes: int) -> None:
        """The process dies right after the n-th journal write of a reconcile."""
        self.crashing.armed_after = writes
        self.reconcile()
        self.crashing.armed_after = None

    @rule(key=keys)
    def retry_failed(self, key: str) -> None:
        assert self.router is not None
        router = self.router
        # Twice at once: both callers join one new round.
        self.finish_callers([self.loop.create_task(router.retry(key)) for _ in range(2)])

    def heal(self) -> None:
        for channel in self.channels.values():
            channel.profile = PROFILES["healthy"]
        self.overrunning_threads_finish()
        self.clock.advance(60)  # past every breaker's reset timeout and settle_s

    @rule()
    def heal_and_reconcile(self) -> None:
        self.heal()
        self.reconcile()

    def results(self) -> dict[str, failover.RepaymentResult | None]:
        for channel in self.channels.values():
            channel.apply_due()  # the providers' queues move with time, asked or not
        for _ in range(5):
            assert self.router is not None
            if not self.router.is_open:  # a crash in background work (recovery) stopped it
                self.crash_and_restart()
            router = self.router

            async def fetch(router=router):
                return {key: await router.get(key) for key in self.accepted}

            try:
                return self.run(fetch())
            except failover.RouterClosedError:
                continue  # crashed while reading: restart and read again
        raise AssertionError("the router kept crashing while its results were read")

    @invariant()
    def ledgers_agree(self) -> None:
        if self.router is None:
            return
        results = self.results()
        snapshot = audit(results, [self.ledger], manual=self.manual())
        self.seen_pending = self.seen_pending or snapshot.pending > 0
        # Until the sweep has made them right, late collections may stand as a second
        # collection or as a FAILED repayment's money; nothing else may, ever.
        self.check(snapshot, results, late_pending=self.late_exposed)
        for key, result in results.items():
            if result is not None and result.status is RepaymentStatus.SUCCEEDED:
                # Terminal is final, except for a journaled correction.
                before = self.succeeded.setdefault(key, result.channel_reference)
                if before != result.channel_reference:
                    assert result.corrections, f"{key}: ending changed without a correction"
                    self.succeeded[key] = result.channel_reference
            elif key in self.succeeded:
                raise AssertionError(f"{key} was SUCCEEDED and is now {result}")
            if result is not None and result.corrections:
                first = result.corrections[0]
                assert first.new_status is RepaymentStatus.SUCCEEDED, key

    def manual(self) -> list[str]:
        """Keys on the manual-refund list, as the journal holds it."""
        assert self.router is not None
        router = self.router

        async def listed() -> list[str]:
            return [c.key for c in await router._journal.late_checks(
                refund=failover.RefundState.MANUAL)]

        try:
            return self.run(listed())
        except failover.RouterClosedError:
            return []

    def check(self, snapshot, results, allow_pending: bool = True,
              late_pending: bool = False) -> None:
        """assert_invariants, and on failure what the journal and the ledger say of each key.

        ``late_pending``: the sweep may not have run yet, so duplicates and paid FAILED
        repayments are allowed; refunds twice, refunds of the only collection, false
        successes and strays are not."""
        if late_pending:
            snapshot = dataclasses.replace(snapshot, duplicates=(), lost=())
        try:
            assert_invariants(snapshot, allow_pending=allow_pending)
        except AssertionError as failure:
            troubled = {*snapshot.duplicates, *snapshot.lost, *snapshot.false_successes,
                        *snapshot.strays, *snapshot.refunded_twice, *snapshot.refunded_only,
                        *([] if allow_pending else snapshot.pending_keys)}
            lines = [str(failure)]
            for key in sorted(troubled)[:3]:
                lines.append(f"{key}: {results.get(key)}")
                collected = [c for c in self.ledger.collections() if c.repayment_key == key]
                lines.append(f"  collected: {collected}")
                refunded = [r for r in self.ledger.refunds() if r.repayment_key == key]
                lines.append(f"  refunded: {refunded}")
            raise AssertionError("\n".join(lines)) from None

    def teardown(self) -> None:
        try:
            if self.router is not None:
                self.heal()
                for _ in range(3):  # a crash during recovery is itself recovered
                    try:
                        self.run(self.router.wait_recovered())
                        self.run(self.router.reconcile())
                        break
                    except (SimulatedCrash, failover.RouterClosedError):
                        self.crash_and_restart()
                # Past the sweep horizon: every late collection found and made right.
                for _ in range(8):
                    self.clock.advance(HORIZON_S / 4)
                    self.sweep()
                results = self.results()
                final = audit(results, [self.ledger], manual=self.manual())
                event(f"refunds: {min(final.refunds, 3)}{'+' if final.refunds >= 3 else ''}")
                event(f"manual refunds: {bool(final.manual)}")
                event(f"corrected: {any(r and r.corrections for r in results.values())}")
                # Coverage of the interesting paths, shown by --hypothesis-show-statistics.
                event(f"crashes: {min(self.crashes, 3)}{'+' if self.crashes >= 3 else ''}")
                event(f"saw pending: {self.seen_pending}")
                event(f"failed at the end: {final.failed > 0}")
                self.check(final, results, allow_pending=False)
                self.run(self.router.close(grace_s=0))
        finally:
            channel = self.channels.get("auto_debit")
            if isinstance(channel, SyncSimulatedChannel):
                channel.release_overruns()
            if self.journal_kind != "memory":
                with contextlib.suppress(Exception):
                    self.run(self.journal.close())
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)


class SQLiteRouterMachine(RouterMachine):
    journal_kind = "sqlite"


class PostgresRouterMachine(RouterMachine):
    journal_kind = "postgres"


def test_router_keeps_the_invariants_on_memory_journal():
    """200 x 50 steps (ci profile) of faults, crashes and resubmits on MemoryJournal."""
    run_state_machine_as_test(RouterMachine)


def test_router_keeps_the_invariants_on_sqlite_journal():
    """The same state machine on SQLiteJournal, reopening the file after each crash."""
    run_state_machine_as_test(SQLiteRouterMachine)


@pytest.mark.slow
def test_router_keeps_the_invariants_on_postgres_journal():
    """The same state machine on PostgresJournal, a new journal object after each crash
    (profile ``standard``; marked slow: about a minute of commits, so .ci/run runs it in
    its second step rather than in the README's test command)."""
    pg.require()
    run_state_machine_as_test(PostgresRouterMachine)


AFTER_SUBMIT = _decisions.after_submit


def fails_over_on_unknown(outcome: Outcome) -> Verdict:
    """A deliberately wrong decision: an unknown outcome taken as 'not collected'."""
    if outcome is Outcome.UNKNOWN:
        return Verdict.NOT_COLLECTED
    return AFTER_SUBMIT(outcome)


def test_property_test_has_teeth(monkeypatch):
    """The same state machine finds a duplicate when the flow fails over on UNKNOWN."""
    monkeypatch.setattr(_decisions, "after_submit", fails_over_on_unknown)
    # Its own sizes, whatever the profile: it stops at the first duplicate it finds.
    hunt = settings(settings.get_profile("ci"), max_examples=200, stateful_step_count=50,
                    phases=[Phase.generate], print_blob=False)
    with pytest.raises(AssertionError, match="duplicates"):
        run_state_machine_as_test(RouterMachine, settings=hunt)
