"""Regression tests for the production features (codec, purge, resolve, switches, the
httpx kit): each once charged the wrong account, charged twice, leaked an account,
ignored an operator or hung; each is checked against what the channels were asked."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import failover
from failover import ChannelResult, RepaymentStatus
from failover.codec import FernetCodec
from failover.testing import Collection, FakeClock, MemoryLedger, ScriptedChannel, audit

from . import pg
from .conftest import repayment

ACCOUNT = "6222021234567890"
KEY = "loan-42/instalment-7"


class ShiftCodec:
    """A format-preserving tokenizer (each digit + 3): ``decode`` of a plain account
    gives another plausible account, so decoding twice charges the wrong one."""

    def encode(self, account: str) -> str:
        return "".join(str((int(c) + 3) % 10) if c.isdigit() else c for c in account)

    def decode(self, stored: str) -> str:
        return "".join(str((int(c) - 3) % 10) if c.isdigit() else c for c in stored)


@pytest.fixture(params=["sqlite", "postgres"])
def journal_of(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    def make(codec: Any = None) -> failover.Journal:
        if request.param == "sqlite":
            return failover.SQLiteJournal(tmp_path / "journal.db", codec=codec)
        return failover.PostgresJournal(pg.require(), schema=pg.schema_for(str(tmp_path)),
                                        migrate=True, instance="prod", codec=codec)

    return make


async def test_a_tokenizing_codec_charges_the_borrowers_account(journal_of):
    """The first repay() of a key calls the channel with the account as given, not with
    the codec's decode of it."""
    card = ScriptedChannel("card")
    async with failover.Router([card], journal_of(ShiftCodec()), clock=FakeClock()) as router:
        await router.repay(repayment(account=ACCOUNT))
        again = await router.repay(repayment(account=ACCOUNT))

    assert [ACCOUNT] == [r.account for r in card.requests]
    assert RepaymentStatus.SUCCEEDED == again.status


async def test_an_encrypted_journal_opened_without_its_codec_calls_no_channel(journal_of):
    """Reconciling without FAILOVER_ACCOUNT_KEYS must not send the ciphertext as the
    account: nothing is sent and the repayment stays pending."""
    keys = [FernetCodec.generate_key()]
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")],
                           queries=[ChannelResult.unknown("query_timeout")] * 3)
    config = failover.RouterConfig.model_validate(
        {"channels": {"card": {"settle_s": 0, "retry": {"max_attempts": 1}}}})
    async with failover.Router([card], journal_of(FernetCodec(keys)), config,
                               clock=FakeClock()) as router:
        assert RepaymentStatus.PENDING == (await router.repay(repayment(account=ACCOUNT))).status
    sent = len(card.requests) + len(card.query_requests)

    async with failover.Router([card], journal_of(), config, clock=FakeClock()) as router:
        await router.reconcile()  # each repayment it cannot drive is left as it stands
        assert RepaymentStatus.PENDING == (await router.get(KEY)).status

    assert sent == len(card.requests) + len(card.query_requests)
    assert {ACCOUNT} == {r.account for r in card.requests + card.query_requests}


async def test_an_operators_collection_leaves_the_routers_own_attempt_watched(tmp_path):
    """Resolved by hand as collected at the counter; the router's own attempt on that
    channel, still in doubt, applies later: it is found, and put on the manual-refund
    list, never refunded by the router (the operator's reference is free text: it may
    be the same money, and refunding the only collection is never right)."""
    from failover.cli import main

    path = tmp_path / "journal.db"
    clock = FakeClock()
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")],
                           queries=[ChannelResult.unknown("busy")] * 3, ledger=ledger)
    config = failover.RouterConfig.model_validate(
        {"channels": {"card": {"settle_s": 0, "retry": {"max_attempts": 1}}},
         "late": {"checks_s": [0, 3600]}})
    async with failover.Router([card], failover.SQLiteJournal(path), config,
                               clock=clock) as router:
        pending = await router.repay(repayment(account=ACCOUNT))
    ledger.record(Collection("card", "counter", KEY, Decimal("1250.00"), "BC-99812"))

    code = await asyncio.to_thread(
        main, ["resolve", KEY, "--journal", str(path), "--collected-by", "card",
               "--channel-reference", "BC-99812", "--note", "paid at the counter"])
    assert 0 == code
    ledger.record(Collection("card", pending.attempts[0].reference, KEY, Decimal("1250.00"),
                             "card-77"))  # the router's own request, applied late
    clock.set(datetime.now(UTC) + timedelta(minutes=1))  # the command wrote wall time
    async with failover.Router([card], failover.SQLiteJournal(path), config,
                               clock=clock) as router:
        await router.sweep()
        result = await router.get(KEY)
        late = await router.get_late(KEY)

    assert late is not None
    manual = late.late
    assert ("succeeded", "BC-99812") == (result.status.value, result.channel_reference)
    assert [] == ledger.refunds()
    assert [(pending.attempts[0].reference, "may_be_the_operators_collection")] \
        == [(c.reference, c.refund_code) for c in manual
            if c.refund is failover.RefundState.MANUAL]
    assert audit({KEY: result}, [ledger], manual=[KEY]).ok


async def test_the_same_collection_reported_by_the_operator_is_not_refunded(tmp_path):
    """When the router's own attempt is the very collection the operator reports (the
    same channel reference), nothing is refunded: it is the only collection."""
    from failover.cli import main

    path = tmp_path / "journal.db"
    clock = FakeClock()
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")],
                           queries=[ChannelResult.unknown("busy")] * 3, ledger=ledger)
    config = failover.RouterConfig.model_validate(
        {"channels": {"card": {"settle_s": 0, "retry": {"max_attempts": 1}}},
         "late": {"checks_s": [0]}})
    async with failover.Router([card], failover.SQLiteJournal(path), config,
                               clock=clock) as router:
        pending = await router.repay(repayment(account=ACCOUNT))
    ledger.record(Collection("card", pending.attempts[0].reference, KEY, Decimal("1250.00"),
                             "card-77"))
    assert 0 == await asyncio.to_thread(
        main, ["resolve", KEY, "--journal", str(path), "--collected-by", "card",
               "--channel-reference", "card-77", "--note", "seen on the statement"])
    clock.set(datetime.now(UTC) + timedelta(minutes=1))  # the command wrote wall time
    async with failover.Router([card], failover.SQLiteJournal(path), config,
                               clock=clock) as router:
        await router.sweep()
        result = await router.get(KEY)

    assert [] == ledger.refunds()
    assert audit({KEY: result}, [ledger]).ok


def test_an_http_channel_without_an_idempotency_key_is_not_idempotent():
    """Without the reference on the wire a resend collects again: such a channel is not
    treated as deduplicating, and claiming it is refused."""
    from failover.http import GatewayChannel

    assert not GatewayChannel(base_url="http://127.0.0.1:9", idempotency_header=None).idempotent
    with pytest.raises(ValueError, match="idempotency_header"):
        GatewayChannel(base_url="http://127.0.0.1:9", idempotency_header=None, idempotent=True)
    assert GatewayChannel(base_url="http://127.0.0.1:9").idempotent


def test_a_2xx_the_adapter_cannot_read_is_never_unavailable():
    """A 2xx means the gateway acted; an adapter raising ChannelUnavailable while reading
    it must not make the router fail over as if nothing was collected."""
    import httpx

    from failover.http import GatewayChannel

    class Broken(GatewayChannel):
        def read_submit(self, request: Any, response: Any) -> ChannelResult:
            raise failover.ChannelUnavailable("parse", "unexpected body")

    def gateway(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"status": "weird"})

    channel = Broken(base_url="http://gateway.test", transport=httpx.MockTransport(gateway))
    request = failover.ChannelRequest(KEY, "fo-1", ACCOUNT, Decimal("1.00"), "CNY")
    result = asyncio.run(channel.submit(request))
    assert failover.Outcome.UNKNOWN == result.outcome


async def test_purge_keeps_what_late_work_still_needs_and_the_key_answers(tmp_path):
    """A repayment marked for the watch (not yet turned into checks) keeps its account;
    a purged key still answers repay() with its result; retry() of a purged FAILED one
    sends nothing."""
    clock = FakeClock()
    ledger = MemoryLedger()
    card = ScriptedChannel("card", [Collected_unknown(), ChannelResult.declined()],
                           queries=[ChannelResult.not_found()], ledger=ledger)
    wallet = ScriptedChannel("wallet", ledger=ledger)
    config = failover.RouterConfig.model_validate(
        {"channels": {"card": {"settle_s": 0, "retry": {"max_attempts": 1}},
                      "wallet": {"settle_s": 0}}, "late": {"checks_s": [0]}})
    journal = failover.SQLiteJournal(tmp_path / "journal.db")
    async with failover.Router([card, wallet], journal, config, clock=clock) as router:
        await router.repay(repayment(key="watched", account=ACCOUNT))
        await router.repay(repayment(key="failed", account=ACCOUNT), channels=["card"])
        clock.advance(86400)
        assert 1 == await journal.purge_accounts(clock.now())  # "failed" only
        assert ACCOUNT == (await journal.load("watched")).account
        await router.sweep()  # the watch finds card's late money and refunds it
        assert [ACCOUNT] == [r.account for r in card.refund_requests]

        again = await router.repay(repayment(key="failed", account=ACCOUNT))
        assert RepaymentStatus.FAILED == again.status
        sent = len(card.requests) + len(wallet.requests)
        with pytest.raises(failover.JournalError, match="erased"):
            await router.retry("failed")
        assert sent == len(card.requests) + len(wallet.requests)


def Collected_unknown() -> Any:
    from failover.testing import Collected

    return Collected(ChannelResult.unknown("timeout"))


async def test_an_adapters_error_text_never_puts_the_account_in_the_journal(tmp_path):
    """An adapter whose exception quotes the account: the journaled detail is masked, so
    with a codec the raw file holds no account number at all."""

    class Quoting(ScriptedChannel):
        async def submit(self, request: failover.ChannelRequest) -> ChannelResult:
            self.requests.append(request)
            raise KeyError(request.account)

    path = tmp_path / "journal.db"
    config = failover.RouterConfig.model_validate({"channels": {"card": {"settle_s": 0}}})
    async with failover.Router([Quoting("card"), ScriptedChannel("wallet")],
                               failover.SQLiteJournal(path, codec=FernetCodec(
                                   FernetCodec.generate_key())), config,
                               clock=FakeClock()) as router:
        await router.repay(repayment(account=ACCOUNT))

    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("journal"))
    assert ACCOUNT.encode() not in raw
    assert b"7890" in raw  # the masked form is there


async def test_a_switch_is_taken_without_a_background_loop_and_after_a_restart(tmp_path):
    """An SQLite service with default settings: the next repayment after the switch's
    read interval, and every one after a restart, avoids the disabled channel."""
    from failover.journal._sqlite import write_override

    path = tmp_path / "journal.db"
    clock = FakeClock()
    card, wallet = ScriptedChannel("card"), ScriptedChannel("wallet")
    async with failover.Router([card, wallet], failover.SQLiteJournal(path),
                               clock=clock) as router:
        assert "card" == (await router.repay(repayment(key="k0"))).channel
        write_override(path, failover.Override("card", False, clock.now() + timedelta(hours=1),
                                               "double charging", "ops", clock.now()), "card")
        clock.advance(6)
        await router.repay(repayment(key="k1"))  # its call reads the switches, beside it
        assert "wallet" == (await router.repay(repayment(key="k2"))).channel
    async with failover.Router([card, wallet], failover.SQLiteJournal(path),
                               clock=clock) as router:
        assert "wallet" == (await router.repay(repayment(key="k3"))).channel


def test_resolve_asks_a_hung_channel_no_longer_than_its_timeout(tmp_path, capsys):
    """A plain-def status query that hangs: resolve --config warns after the channel's
    timeout and returns; the thread is left behind (daemon), not waited for."""
    from failover.cli import main

    release = threading.Event()

    path = tmp_path / "journal.db"
    module = tmp_path / "hung_channel.py"
    module.write_text(
        "import threading\n"
        "from failover import ChannelResult\n"
        "HOLD = threading.Event()\n"
        "class Hung:\n"
        "    idempotent = False\n"
        "    def __init__(self, name='card'):\n"
        "        self.name = name\n"
        "    def submit(self, request):\n"
        "        return ChannelResult.unknown('timeout')\n"
        "    def query(self, request):\n"
        "        HOLD.wait(30)\n"
        "        return ChannelResult.not_found()\n")
    config = tmp_path / "failover.toml"
    config.write_text('[channels.card]\nadapter = "hung_channel:Hung"\ntimeout_s = 0.5\n')
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")],
                           queries=[ChannelResult.unknown("busy")] * 3)

    async def pending() -> None:
        async with failover.Router([card], failover.SQLiteJournal(path), clock=FakeClock(),
                                   config=failover.RouterConfig.model_validate(
                                       {"channels": {"card": {"settle_s": 0, "retry": {
                                           "max_attempts": 1}}}})) as router:
            await router.repay(repayment())

    asyncio.run(pending())
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        started = time.monotonic()
        code = main(["resolve", KEY, "--journal", str(path), "--not-collected", "--note",
                     "statement", "--config", str(config)])
        elapsed = time.monotonic() - started
    finally:
        import hung_channel  # type: ignore[import-not-found]

        hung_channel.HOLD.set()
        release.set()
        sys.path.remove(str(tmp_path))

    assert 0 == code
    assert elapsed < 10, elapsed


# -- the fourth review: purge, resolve and late collections ------------------------------


def late_config(checks_s: tuple[float, ...] = (0,)) -> failover.RouterConfig:
    return failover.RouterConfig.model_validate(
        {"channels": {"card": {"priority": 1, "settle_s": 0, "retry": {"max_attempts": 1}},
                      "wallet": {"priority": 2, "settle_s": 0}},
         "late": {"checks_s": list(checks_s)}})


async def test_a_collection_reported_after_purge_goes_to_the_manual_list(journal_of):
    """A card request cleared by its query, the repayment collected by the wallet, its
    account purged, then the card applies late and calls back: no refund can be sent
    without the account, so it goes on the manual-refund list (it used to be journaled
    "sent" with nothing sent, and every later sweep raised)."""
    clock, ledger = FakeClock(), MemoryLedger()
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")], ledger=ledger)
    wallet = ScriptedChannel("wallet", ledger=ledger)
    journal = journal_of()
    async with failover.Router([card, wallet], journal, late_config(), clock=clock,
                               background=False) as router:
        ended = await router.repay(repayment(KEY, account=ACCOUNT))
        await router.sweep()
        clock.advance(10)
        await router.sweep()  # the card's one re-query: NOT_FOUND, the watch cleared
        clock.advance(86400)
        assert 1 == await journal.purge_accounts(clock.now())
        reference = card.requests[0].reference
        ledger.record(Collection("card", reference, KEY, ended.amount, "card-late-1"))
        await router.notify("card", reference, ChannelResult.succeeded("card-late-1"))
        clock.advance(3600)
        await router.sweep()
        manual = await journal.late_checks(refund=failover.RefundState.MANUAL)

    assert (RepaymentStatus.SUCCEEDED, "wallet") == (ended.status, ended.channel)
    assert [("card", "account_erased")] == [(c.channel, c.refund_code) for c in manual]
    assert [] == card.refund_requests
    assert audit({KEY: ended}, [ledger], manual=[c.key for c in manual]).ok


class FailingLoad(failover.SQLiteJournal):
    """An SQLite journal whose reads of one key fail while ``failing`` is set."""

    failing: str | None = None

    async def load(self, key: str) -> Any:
        if key == self.failing:
            raise failover.JournalError(f"cannot read {key}")
        return await super().load(key)


async def test_one_failing_check_never_stops_the_sweep(tmp_path: Path):
    """A check that fails (its repayment cannot be read) is logged and comes back; the
    other repayment's check is worked in the same pass."""
    clock = FakeClock()
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")] * 2,
                           queries=[ChannelResult.not_found()] * 4)
    journal = FailingLoad(tmp_path / "journal.db")
    async with failover.Router([card, ScriptedChannel("wallet")], journal,
                               late_config((60,)), clock=clock, background=False) as router:
        await router.repay(repayment("loan-a", account=ACCOUNT))
        await router.repay(repayment("loan-b", account=ACCOUNT))
        await router.sweep()  # the watches become checks
        before = [r.repayment_key for r in card.query_requests]
        journal.failing = "loan-a"
        clock.advance(61)
        await router.sweep()
        asked = [r.repayment_key for r in card.query_requests][len(before):]
        checks = {c.key: c.state for c in await journal.late_checks()}

    assert ["loan-b"] == asked
    assert {"loan-a": failover.LateState.WATCHING,
            "loan-b": failover.LateState.CLEARED} == checks


async def test_retry_refuses_a_purged_repayment_and_journals_nothing(tmp_path: Path):
    """retry() of a FAILED repayment whose account was purged raises before the new
    round is journaled (it used to leave a PENDING round nothing could end)."""
    clock = FakeClock()
    card = ScriptedChannel("card", [ChannelResult.declined("insufficient_funds")])
    journal = failover.SQLiteJournal(tmp_path / "journal.db")
    async with failover.Router([card], journal, clock=clock) as router:
        failed = await router.repay(repayment(KEY, account=ACCOUNT))
        clock.advance(86400)
        assert 1 == await journal.purge_accounts(clock.now())
        with pytest.raises(failover.JournalError, match="erased by purge"):
            await router.retry(KEY)
        record = await journal.load(KEY)
        reconciled = await router.reconcile()

    assert RepaymentStatus.FAILED == failed.status
    assert record is not None
    assert (RepaymentStatus.FAILED, 1, 1) == (record.status, record.round, len(card.requests))
    assert [] == reconciled


def test_resolve_under_the_operators_own_reference_never_refunds_the_collection(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The primary collected but its answer was lost; the operator resolves "collected
    by primary" with a bank statement's reference, not the gateway's.  The command warns
    that the channel reports another reference, and the sweep puts the router's own
    collection on the manual-refund list instead of refunding the only money kept."""
    import json

    from failover.cli import main
    from failover.testing import FaultProfile, SimulatedChannel, SQLiteLedger

    journal, ledger = tmp_path / "journal.db", tmp_path / "ledger.db"
    config = tmp_path / "failover.toml"
    config.write_text(f"""
late = {{ checks_s = [0] }}
[channels.primary]
priority = 1
settle_s = 0
adapter = "failover.testing:SimulatedChannel"
options = {{ idempotent = false, ledger = "{ledger}" }}
[channels.backup]
priority = 2
adapter = "failover.testing:SimulatedChannel"
options = {{ idempotent = true, ledger = "{ledger}" }}
""")

    def channels(profile: Any = None) -> list[Any]:
        return [SimulatedChannel("primary", profile, idempotent=False,
                                 ledger=SQLiteLedger(ledger)),
                SimulatedChannel("backup", idempotent=True, ledger=SQLiteLedger(ledger))]

    async def fill() -> failover.RepaymentResult:
        lost = FaultProfile(unknown_collected=1.0, query_failure=1.0)
        async with failover.Router(channels(lost), failover.SQLiteJournal(journal),
                                   clock=FakeClock()) as router:
            return await router.repay(repayment(KEY, account=ACCOUNT))

    pending = asyncio.run(fill())
    code = main(["resolve", KEY, "--journal", str(journal), "--collected-by", "primary",
                 "--channel-reference", "BANK-STMT-0042", "--note", "seen on the statement",
                 "--config", str(config), "--json"])
    resolved = json.loads(capsys.readouterr().out)

    async def sweep() -> tuple[failover.RepaymentResult, list[Any]]:
        clock = FakeClock(datetime.now(UTC))  # the command stamps the wall clock
        opened = failover.SQLiteJournal(journal)
        async with failover.Router(channels(), opened, failover.RouterConfig.load(config),
                                   clock=clock, background=False) as router:
            for _ in range(4):
                clock.advance(120)
                await router.sweep()
            return (await router.get(KEY),
                    await opened.late_checks(refund=failover.RefundState.MANUAL))

    final, manual = asyncio.run(sweep())
    kept = SQLiteLedger(ledger)

    assert failover.PendingReason.AWAITING_CHANNEL == pending.pending_reason
    assert (0, "succeeded") == (code, resolved["status"])
    assert ["primary's own query says succeeded"] \
        == [w.split(" for ", 1)[0] for w in resolved["warnings"]]
    assert (RepaymentStatus.SUCCEEDED, "BANK-STMT-0042") \
        == (final.status, final.channel_reference)
    assert [("primary", "may_be_the_operators_collection")] \
        == [(c.channel, c.refund_code) for c in manual]
    assert (1, 0) == (len(kept.collections()), len(kept.refunds()))


class Pausing(ScriptedChannel):
    """Answers UNAVAILABLE and asks for a pause of ``pause_s`` on the fake clock (a 503
    with Retry-After), as the httpx kit's ``paused_for`` does."""

    def __init__(self, name: str, clock: FakeClock, pause_s: float) -> None:
        super().__init__(name, [ChannelResult.unavailable("service_unavailable")] * 10)
        self.clock, self.pause_s, self.until = clock, pause_s, 0.0

    @property
    def paused_for(self) -> float:
        return max(0.0, self.until - self.clock.monotonic())

    async def submit(self, request: failover.ChannelRequest) -> ChannelResult:
        answer = await super().submit(request)
        self.until = self.clock.monotonic() + self.pause_s
        return answer


async def test_an_answer_that_asks_for_a_pause_never_opens_the_breaker():
    """UNAVAILABLE from a channel that then asks for a pause is not a breaker failure
    (calls admitted before the pause began, refused by it, once opened the breaker for
    its reset_timeout_s): the channel is tried again as soon as its pause has passed."""
    clock = FakeClock()
    gw, backup = Pausing("gw", clock, 5), ScriptedChannel("backup")
    config = failover.RouterConfig.model_validate({"channels": {
        "gw": {"priority": 1, "retry": {"max_attempts": 1},
               "breaker": {"fail_max": 1, "reset_timeout_s": 600}},
        "backup": {"priority": 2}}})
    async with failover.Router([gw, backup], failover.MemoryJournal(), config,
                               clock=clock) as router:
        first = await router.repay(repayment("loan-1", account=ACCOUNT))
        state = router.breaker("gw").state
        clock.advance(6)
        second = await router.repay(repayment("loan-2", account=ACCOUNT))

    assert [("backup", ["gw", "backup"])] * 2 == [
        (r.channel, [a.channel for a in r.attempts]) for r in (first, second)]
    assert ("closed", 2) == (state, gw.submits)


async def test_events_carry_the_real_skip_reason_and_every_failover():
    """A new repayment's skips are told with their reason (once "ineligible" for all),
    and a round resumed after a pending answer tells its move to the next channel."""
    events: list[Any] = []
    clock = FakeClock()
    card = ScriptedChannel("card", [ChannelResult.unknown("timeout")],
                           queries=[ChannelResult.unknown("busy")] * 3
                           + [ChannelResult.not_found()])
    config = failover.RouterConfig.model_validate({"channels": {
        "card": {"priority": 1, "settle_s": 0, "retry": {"max_attempts": 1}},
        "wallet": {"priority": 2}, "cash": {"priority": 0, "enabled": False}}})
    async with failover.Router([card, ScriptedChannel("wallet"), ScriptedChannel("cash")],
                               failover.MemoryJournal(), config, clock=clock,
                               hooks=[events.append]) as router:
        pending = await router.repay(repayment("loan-1", account=ACCOUNT))
        [resumed] = await router.reconcile()

    skips = [(e.channel, e.reason.split(":", 1)[0]) for e in events
             if isinstance(e, failover.events.ChannelSkipped)]
    moves = [(e.from_channel, e.to_channel, e.reason) for e in events
             if isinstance(e, failover.events.FailedOver)]
    assert (RepaymentStatus.PENDING, RepaymentStatus.SUCCEEDED, "wallet") \
        == (pending.status, resumed.status, resumed.channel)
    assert ("cash", "disabled") == skips[0]
    assert [("card", "wallet", "not_found")] == moves  # what the query settled, not the submit's


def every_byte(directory: Path) -> bytes:
    """The files of ``directory`` (a journal and its -wal, -shm), concatenated."""
    return b"".join(p.read_bytes() for p in directory.iterdir() if p.is_file())


async def test_an_account_a_channel_echoes_in_its_code_is_masked_everywhere(tmp_path: Path):
    """A provider that puts the account in its answer's code (a submit's, a query's):
    the events, the pending code and the journal file never hold it."""
    events: list[Any] = []
    echo = f"account_{ACCOUNT}_busy"
    grouped = " ".join(ACCOUNT[i:i + 4] for i in range(0, len(ACCOUNT), 4))
    card = ScriptedChannel("card", [ChannelResult.unknown(echo, f"for {grouped}")],
                           queries=[ChannelResult.unknown(f"{ACCOUNT[:8]}-{ACCOUNT[8:]}")] * 3)
    path = tmp_path / "journal.db"
    config = failover.RouterConfig.model_validate(
        {"channels": {"card": {"settle_s": 0, "retry": {"max_attempts": 1}}}})
    async with failover.Router([card], failover.SQLiteJournal(path, codec=FernetCodec(
            [FernetCodec.generate_key()])), config, clock=FakeClock(),
            hooks=[events.append]) as router:
        pending = await router.repay(repayment(KEY, account=ACCOUNT))

    assert RepaymentStatus.PENDING == pending.status
    seen = repr(events) + (pending.code or "") + repr(pending.attempts)
    raw = every_byte(tmp_path)
    for form in (ACCOUNT, grouped, f"{ACCOUNT[:8]}-{ACCOUNT[8:]}"):
        assert form not in seen
        assert form.encode() not in raw


class Answering(ScriptedChannel):
    """Answers from a script of (result, pause asked for, in seconds on the fake clock),
    exposing ``paused_for`` as the httpx kit does."""

    def __init__(self, name: str, clock: FakeClock,
                 script: list[tuple[ChannelResult, float]]) -> None:
        super().__init__(name, [answer for answer, _ in script])
        self.clock, self.pauses, self.until = clock, [p for _, p in script], 0.0

    @property
    def paused_for(self) -> float:
        return max(0.0, self.until - self.clock.monotonic())

    async def submit(self, request: failover.ChannelRequest) -> ChannelResult:
        pause = self.pauses[self.submits] if self.submits < len(self.pauses) else 0.0
        answer = await super().submit(request)
        if pause:
            self.until = self.clock.monotonic() + pause
        return answer


async def test_an_answer_asking_for_a_pause_is_not_a_success_either():
    """A half-open breaker whose trial is answered 503 + Retry-After stays half-open (a
    success once closed it), and such answers never reset the failures counted before."""
    clock = FakeClock()
    refused, busy = ChannelResult.unavailable("connect_error"), \
        ChannelResult.unavailable("service_unavailable")
    gw = Answering("gw", clock, [(refused, 0), (busy, 5), (refused, 0)])
    config = failover.RouterConfig.model_validate({"channels": {
        "gw": {"priority": 1, "retry": {"max_attempts": 1},
               "breaker": {"fail_max": 1, "reset_timeout_s": 10}},
        "backup": {"priority": 2}}})
    async with failover.Router([gw, ScriptedChannel("backup")], failover.MemoryJournal(),
                               config, clock=clock) as router:
        await router.repay(repayment("loan-1", account=ACCOUNT))
        opened = router.breaker("gw").state
        clock.advance(11)
        await router.repay(repayment("loan-2", account=ACCOUNT))  # the trial: 503, pause
        after_trial = router.breaker("gw").state
        clock.advance(6)
        await router.repay(repayment("loan-3", account=ACCOUNT))  # a new trial: refused
        states = (opened, after_trial, router.breaker("gw").state)

    assert ("open", "half-open", "open") == states
    assert 3 == gw.submits


def test_the_lease_covers_channels_the_config_does_not_name():
    """A channel with no entry in the config has the default timeout_s, which the
    journal's lease must exceed too (a repayment was once accepted, then refused every
    call for it and stayed pending)."""
    journal = failover.PostgresJournal(pg.require(), schema="unused", lease_s=5)

    with pytest.raises(failover.ConfigError, match=r"channels\.card\.timeout_s"):
        failover.Router([ScriptedChannel("card")], journal)


@pytest.mark.parametrize("lease_s", [float("nan"), float("inf"), 0.0])
def test_a_lease_must_be_a_positive_finite_number(lease_s: float):
    """NaN passed every comparison of the lease checks (FAILOVER_LEASE_S=nan)."""
    with pytest.raises(ValueError, match="lease_s"):
        failover.PostgresJournal("postgresql://localhost/unused", lease_s=lease_s)


@pytest.mark.parametrize("same_reference", [True, False])
async def test_a_displaced_operators_collection_is_never_refunded_twice(tmp_path: Path,
                                                                       same_reference: bool):
    """Round 1 fails (a's request NOT_FOUND, then applied late); round 2's b collects but
    its answer is lost; an operator resolves it as collected by b; the sweep keeps a's
    round-1 collection.  b's money is given back once when the operator gave b's own
    reference (it was refunded twice: as the operator's and as the router's), and goes
    to the manual-refund list when the operator's reference is free text."""
    from failover._models import Correction
    from failover.testing import Collected

    clock, ledger = FakeClock(), MemoryLedger()
    a = ScriptedChannel("a", [ChannelResult.unknown("timeout"), ChannelResult.declined("no")],
                        queries=[ChannelResult.not_found()], ledger=ledger)
    b = ScriptedChannel("b", [ChannelResult.declined("no"),
                              Collected(ChannelResult.unknown("timeout"))],
                        queries=[ChannelResult.unknown("busy")] * 3, ledger=ledger)
    config = failover.RouterConfig.model_validate(
        {"channels": {"a": {"settle_s": 0, "priority": 1, "retry": {"max_attempts": 1}},
                      "b": {"settle_s": 0, "priority": 2, "retry": {"max_attempts": 1}}},
         "late": {"checks_s": [0, 3600]}})
    journal = failover.SQLiteJournal(tmp_path / "journal.db")
    async with failover.Router([a, b], journal, config, clock=clock) as router:
        first = await router.repay(repayment(KEY, account=ACCOUNT))
        late_ref = next(x.reference for x in first.attempts if x.channel == "a")
        ledger.record(Collection("a", late_ref, KEY, first.amount, "A-LATE"))
        await router.retry(KEY)
        [b_money] = [c.channel_reference for c in ledger.collections() if c.channel == "b"]
        evidence = b_money if same_reference else "BANK-STMT-0042"
        record = await journal.load(KEY)
        assert record is not None
        await journal.resolve_by_hand(KEY, record.round, Correction(
            at=clock.now(), reason="operator", old_status=record.status,
            old_channel=record.pending_channel, old_channel_reference=None,
            old_code=record.code, new_status=RepaymentStatus.SUCCEEDED, new_channel="b",
            new_channel_reference=evidence, reference=f"operator:{evidence}",
            evidence="operator ops: paid"))
        for _ in range(6):
            clock.advance(4000)
            await router.sweep()
        late = await router.get_late(KEY)

    assert late is not None
    manual = [c for c in late.late if c.refund is failover.RefundState.MANUAL]
    assert (RepaymentStatus.SUCCEEDED, "a") == (late.status, late.channel)
    if same_reference:
        assert (1, []) == (len(ledger.refunds()), manual)
    else:
        assert [] == ledger.refunds()
        assert {"may_be_the_operators_collection"} == {c.refund_code for c in manual}
    assert audit({KEY: late}, [ledger], manual=[KEY] if manual else []).ok


class RefusingRefunds(ScriptedChannel):
    """Its gateway refuses the refund, but the answer is lost on the way back; the
    refund's status query then reports the refusal (as the gateway simulator does)."""

    async def _refund(self, request: failover.ChannelRequest, channel_reference: Any,
                      amount: Any) -> ChannelResult:
        self.refund_requests.append(request)
        return ChannelResult.unknown("read_timeout")

    async def _query_refund(self, request: failover.ChannelRequest) -> ChannelResult:
        return ChannelResult.rejected("amount_exceeds_refundable")


async def test_a_refund_its_status_query_reports_refused_goes_to_the_manual_list():
    """A second collection whose refund answer was lost, and whose refund status says
    refused, is handed to a person (it was re-queried for ever, the borrower charged
    twice with nothing on the list)."""
    clock, ledger = FakeClock(), MemoryLedger()
    from failover.testing import Collected

    a = RefusingRefunds("a", [Collected(ChannelResult.unknown("timeout"))],
                        queries=[ChannelResult.not_found()], ledger=ledger)
    b = ScriptedChannel("b", ledger=ledger)
    config = failover.RouterConfig.model_validate(
        {"channels": {"a": {"settle_s": 0, "priority": 1, "retry": {"max_attempts": 1}},
                      "b": {"settle_s": 0, "priority": 2}},
         "late": {"checks_s": [0, 3600], "retry_s": 60}})
    async with failover.Router([a, b], failover.MemoryJournal(), config,
                               clock=clock) as router:
        ended = await router.repay(repayment(KEY, account=ACCOUNT))
        for _ in range(20):
            clock.advance(600)
            await router.sweep()
        late = await router.get_late(KEY)

    assert late is not None
    assert (RepaymentStatus.SUCCEEDED, "b") == (ended.status, ended.channel)
    assert [("a", "amount_exceeds_refundable")] == [
        (c.channel, c.refund_code) for c in late.late if c.refund is failover.RefundState.MANUAL]
    assert 1 == len(a.refund_requests)
    assert audit({KEY: late}, [ledger], manual=[KEY]).ok


class BrokenPause(ScriptedChannel):
    """An adapter whose ``paused_for`` raises."""

    @property
    def paused_for(self) -> float:
        raise RuntimeError("pause bookkeeping failed")


async def test_a_paused_for_that_raises_never_loses_the_answer():
    """The pause is read before and after each call: one that raises is no pause, and
    the call's answer and the breaker's permit are kept (a half-open trial could leak)."""
    card = BrokenPause("card", [ChannelResult.unavailable("down"), ChannelResult.succeeded("c-1")])
    config = failover.RouterConfig.model_validate({"channels": {"card": {
        "retry": {"max_attempts": 1}, "breaker": {"fail_max": 1, "reset_timeout_s": 10}}}})
    clock = FakeClock()
    async with failover.Router([card], failover.MemoryJournal(), config, clock=clock) as router:
        failed = await router.repay(repayment("loan-1", account=ACCOUNT))
        clock.advance(11)
        trial = await router.repay(repayment("loan-2", account=ACCOUNT))

    assert (RepaymentStatus.FAILED, RepaymentStatus.SUCCEEDED) == (failed.status, trial.status)
    assert 2 == card.submits
