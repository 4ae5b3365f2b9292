"""Property tests: the real Router against simulated channels, with faults, crashes and
resubmits, the invariants of DESIGN §4 checked against the channels' ledgers after every step.

Sizes come from the Hypothesis profile loaded in conftest.py ("ci": 200 examples x 50 steps).
Everything is seeded by Hypothesis' draws; a failure prints the blob that replays it.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from failover import IdempotencyConflict, Outcome, Repayment, RepaymentStatus
from failover._decisions import Verdict
from failover.testing import (
    FakeClock,
    FaultProfile,
    MemoryLedger,
    SimulatedChannel,
    SimulatedCrash,
    assert_invariants,
    audit,
)

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
}
CONFIG = failover.RouterConfig.model_validate({
    "deadline_s": 60,
    "channels": {
        name: {"retry": {"max_attempts": 3, "initial_backoff_s": 0.1, "max_backoff_s": 1},
               "breaker": {"fail_max": 4, "reset_timeout_s": 20}}
        for name in CHANNELS
    },
})
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
                    raise SimulatedCrash(f"crash after journal {name}")
            return value

        return write


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
        self.seen_pending = False
        self.folder = tempfile.mkdtemp(prefix="failover-prop-", dir=SHM)
        self.journal: failover.Journal = self._journal()
        self.channels: dict[str, SimulatedChannel] = {}
        self.router: failover.Router | None = None

    keys = Bundle("keys")

    def _journal(self) -> failover.Journal:
        if self.journal_kind == "sqlite":
            return failover.SQLiteJournal(Path(self.folder) / "journal.db")
        return getattr(self, "journal", None) or failover.MemoryJournal()

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def open_router(self) -> None:
        self.crashing = CrashingJournal(self.journal)
        self.router = self.router_class(
            list(self.channels.values()), self.crashing, CONFIG,
            clock=self.clock, sleep=self.clock.sleep,
        )
        self.run(self.router.open())

    @initialize(seed=st.integers(0, 2**32 - 1))
    def start(self, seed: int) -> None:
        for name in CHANNELS:
            self.channels[name] = SimulatedChannel(
                name, PROFILES["healthy"], seed=seed, idempotent=IDEMPOTENT[name],
                clock=self.clock, ledger=self.ledger,
            )
        self.open_router()

    def crash_and_restart(self) -> None:
        """Drop the router without closing it (nothing more is written), reopen the journal."""
        assert self.router is not None
        self.crashes += 1
        self.router._abandon()
        self.run(asyncio.sleep(0))  # let the cancelled tasks unwind, as a dying process would
        if self.journal_kind == "sqlite":
            self.run(self.journal.close())
            self.journal = self._journal()
        self.open_router()

    def repay(self, repayment: Repayment) -> None:
        assert self.router is not None
        try:
            self.run(self.router.repay(repayment))
        except SimulatedCrash:
            self.crash_and_restart()

    @rule(target=keys, amount=st.integers(1, 500_000))
    def submit(self, amount: int) -> str:
        self.serial += 1
        key = f"loan-{self.serial}"
        repayment = Repayment(key=key, account=f"acct-{self.serial:08d}",
                              amount=Decimal(amount).scaleb(-2), currency="CNY")
        self.accepted[key] = repayment
        self.repay(repayment)
        return key

    @rule(count=st.integers(2, 8), duplicates=st.integers(0, 3))
    def submit_concurrently(self, count: int, duplicates: int) -> None:
        """Several repayments at once, some keys twice; a crash takes them all down."""
        assert self.router is not None
        batch = []
        for _ in range(count):
            self.serial += 1
            key = f"loan-{self.serial}"
            self.accepted[key] = Repayment(key=key, account="acct-batch", amount="10.00",
                                           currency="CNY")
            batch.append(self.accepted[key])
        batch += batch[:duplicates]

        async def all_at_once():
            return await asyncio.gather(*(self.router.repay(r) for r in batch),
                                        return_exceptions=True)

        outcomes = self.run(all_at_once())
        if any(isinstance(o, SimulatedCrash) for o in outcomes):
            self.crash_and_restart()
        else:
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            assert not errors, errors

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

    @rule(seconds=st.sampled_from([1, 10, 30, 300]))
    def time_passes(self, seconds: int) -> None:
        self.clock.advance(seconds)

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
        except SimulatedCrash:
            self.crash_and_restart()

    @rule(key=keys)
    def retry_failed(self, key: str) -> None:
        assert self.router is not None
        try:
            self.run(self.router.retry(key))
        except SimulatedCrash:
            self.crash_and_restart()

    @rule()
    def heal_and_reconcile(self) -> None:
        for channel in self.channels.values():
            channel.profile = PROFILES["healthy"]
        self.clock.advance(60)  # past every breaker's reset timeout
        self.reconcile()

    def results(self) -> dict[str, failover.RepaymentResult | None]:
        assert self.router is not None
        router = self.router
        if not router._open:
            return {}

        async def fetch():
            return {key: await router.get(key) for key in self.accepted}

        return self.run(fetch())

    @invariant()
    def ledgers_agree(self) -> None:
        if self.router is None:
            return
        results = self.results()
        snapshot = audit(results, [self.ledger])
        self.seen_pending = self.seen_pending or snapshot.pending > 0
        assert_invariants(snapshot)
        for key, result in results.items():
            if result is not None and result.status is RepaymentStatus.SUCCEEDED:
                # Terminal is final: a success never changes.
                before = self.succeeded.setdefault(key, result.channel_reference)
                assert before == result.channel_reference, key
            elif key in self.succeeded:
                raise AssertionError(f"{key} was SUCCEEDED and is now {result}")

    def teardown(self) -> None:
        try:
            if self.router is not None:
                for channel in self.channels.values():
                    channel.profile = PROFILES["healthy"]
                self.clock.advance(60)
                for _ in range(3):  # a crash during recovery is itself recovered
                    try:
                        self.run(self.router.wait_recovered())
                        self.run(self.router.reconcile())
                        break
                    except SimulatedCrash:
                        self.crash_and_restart()
                final = audit(self.results(), [self.ledger])
                # Coverage of the interesting paths, shown by --hypothesis-show-statistics.
                event(f"crashes: {min(self.crashes, 3)}{'+' if self.crashes >= 3 else ''}")
                event(f"saw pending: {self.seen_pending}")
                event(f"failed at the end: {final.failed > 0}")
                assert_invariants(final, allow_pending=False)
                self.run(self.router.close())
        finally:
            if self.journal_kind == "sqlite":
                with contextlib.suppress(Exception):
                    self.run(self.journal.close())
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)


class SQLiteRouterMachine(RouterMachine):
    journal_kind = "sqlite"


def test_router_keeps_the_invariants_on_memory_journal():
    """200 x 50 steps (ci profile) of faults, crashes and resubmits on MemoryJournal."""
    run_state_machine_as_test(RouterMachine)


def test_router_keeps_the_invariants_on_sqlite_journal():
    """The same state machine on SQLiteJournal, reopening the file after each crash."""
    run_state_machine_as_test(SQLiteRouterMachine)


class FailsOverOnUnknown(failover.Router):
    """A deliberately wrong router: treats an unknown outcome as 'not collected'."""

    def _submit_verdict(self, outcome: Outcome) -> Verdict:
        if outcome is Outcome.UNKNOWN:
            return Verdict.NOT_COLLECTED
        return super()._submit_verdict(outcome)


class MutantMachine(RouterMachine):
    router_class = FailsOverOnUnknown


def test_property_test_has_teeth():
    """The same state machine finds a duplicate in a router that fails over on UNKNOWN."""
    # Its own sizes, whatever the profile: it stops at the first duplicate it finds.
    hunt = settings(settings.get_profile("ci"), max_examples=200, stateful_step_count=50,
                    phases=[Phase.generate], print_blob=False)
    with pytest.raises(AssertionError, match="duplicates"):
        run_state_machine_as_test(MutantMachine, settings=hunt)
