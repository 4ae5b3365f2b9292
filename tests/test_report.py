"""The evidence report: a fixture journal with known outages gives exactly the expected
causes and lateness; the codes config in both shapes; the ``failover report`` command."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

import failover
from failover import ChannelResult, Outcome, RepaymentStatus
from failover._models import (
    Attempt,
    Correction,
    LateCheck,
    LateState,
    PendingReason,
    RefundState,
    Skip,
)
from failover.cli import main
from failover.config import BORROWER_CODES, RouterConfig
from failover.journal import Record
from failover.report import Cause, attribute, build_report, human_duration, report
from failover.testing import ScriptedChannel

from .conftest import fast, repayment

DUE = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday, noon UTC
NOW = DUE + timedelta(days=1)
ACCOUNT = "6222020000001234"
HOUR = 3600

CONFIG = RouterConfig.model_validate({"channels": {
    # auto_debit's bank is down for maintenance on Mondays, 10:00-13:00 UTC.
    "auto_debit": {"priority": 1, "maintenance": [
        {"weekdays": ["mon"], "start": "10:00", "end": "13:00"}]},
    "bank_card": {"priority": 2},
    "wallet": {"priority": 3, "codes": {
        "51": {"outcome": "declined", "fault": "borrower"},
        "96": {"fault": "channel"},
        "insufficient_funds": {"fault": "channel"},  # overrides the default
        "91": "unavailable",
    }},
}})


def at(hours: float) -> datetime:
    """``hours`` after the due date (negative: before it)."""
    return DUE + timedelta(hours=hours)


def tried(channel: str, hours: float, outcome: Outcome | None, code: str | None = None,
          *, resolution: Outcome | None = None, round: int = 1,
          reference: str | None = None) -> Attempt:
    started = at(hours)
    return Attempt(channel=channel, reference=reference or f"ref-{channel}-{round}",
                   outcome=outcome, code=code, started_at=started,
                   finished_at=None if outcome is None else started + timedelta(seconds=2),
                   resolution=resolution, round=round,
                   channel_reference="ch-1" if Outcome.SUCCEEDED in (outcome, resolution)
                   else None)


def record(key: str, status: RepaymentStatus, ended: float | None, *attempts: Attempt,
           due: datetime | None = DUE, code: str | None = None, skips: tuple[Skip, ...] = (),
           corrections: tuple[Correction, ...] = ()) -> Record:
    collected = next((a for a in attempts if Outcome.SUCCEEDED in (a.outcome, a.resolution)),
                     None)
    return Record(
        key=key, account=ACCOUNT, amount=Decimal("1250.00"), currency="CNY", due_at=due,
        metadata={}, preference=None, status=status, round=max((a.round for a in attempts),
                                                               default=1),
        created_at=at(-4), updated_at=at(ended if ended is not None else 1),
        channel=collected.channel if collected else None,
        channel_reference=collected.channel_reference if collected else None, code=code,
        pending_reason=PendingReason.AWAITING_CHANNEL
        if status is RepaymentStatus.PENDING else None,
        attempts=attempts, skips=skips, corrections=corrections)


S, F, P = RepaymentStatus.SUCCEEDED, RepaymentStatus.FAILED, RepaymentStatus.PENDING

OUTAGE = record(  # down for maintenance, then a timeout: collected 3 h late
    "outage", S, 3.0,
    tried("auto_debit", -1, Outcome.UNAVAILABLE, "maintenance"),
    tried("bank_card", -0.99, Outcome.UNKNOWN, "timeout", resolution=Outcome.NOT_FOUND),
    tried("bank_card", 3.0, Outcome.SUCCEEDED, round=2))
NO_FUNDS = record(  # both channels declined for the borrower's reasons: unpaid
    "no-funds", F, -2.99,
    tried("auto_debit", -3, Outcome.DECLINED, "insufficient_funds"),
    tried("bank_card", -2.995, Outcome.DECLINED, "CARD_EXPIRED"))
MIXED = record(  # the debit was down, the card had no money: collected 2 h 15 m late
    "mixed", S, 2.25,
    tried("auto_debit", -3, Outcome.UNAVAILABLE, "503"),
    tried("bank_card", -2.99, Outcome.DECLINED, "insufficient_funds"),
    tried("wallet", 2.25, Outcome.SUCCEEDED, round=2))
ON_TIME = record(
    "on-time", S, -2.99,
    tried("auto_debit", -3, Outcome.UNAVAILABLE, "503"),
    tried("bank_card", -2.99, Outcome.SUCCEEDED))
STUCK = record(  # sent, never answered: pending a day later
    "stuck", P, None, tried("auto_debit", -0.5, None), code="timeout")
CORRECTED = record(  # failed, then the debit's collection turned up: paid in time
    "corrected", S, 4.5,
    tried("auto_debit", -2, Outcome.UNKNOWN, "timeout", resolution=Outcome.NOT_FOUND,
          reference="ref-debit"),
    tried("bank_card", -1.99, Outcome.DECLINED, "05"),
    corrections=(Correction(
        at=at(4.5), reason="late_collection", old_status=F, old_channel=None,
        old_channel_reference=None, old_code="05", new_status=S, new_channel="auto_debit",
        new_channel_reference="ch-9", reference="ref-debit", evidence="query"),))
SKIPPED = record(  # nothing eligible: every channel skipped for a channel reason
    "skipped", F, -0.9, code="no_eligible_channel", skips=(
        Skip("auto_debit", "maintenance", at(-0.9)), Skip("bank_card", "breaker_open", at(-0.9)),
        Skip("wallet", "limits", at(-0.9))))
NOT_YET_DUE = record("not-yet-due", P, None, tried("auto_debit", 23.5, None),
                     due=NOW + timedelta(hours=1))
UNDATED = record("undated", F, -1, tried("auto_debit", -1, Outcome.UNAVAILABLE), due=None)

JOURNAL = (OUTAGE, NO_FUNDS, MIXED, ON_TIME, STUCK, CORRECTED, SKIPPED, NOT_YET_DUE, UNDATED)


def causes(rep: failover.report.Report) -> dict[str, tuple[Cause, int]]:
    return {e.key: (e.cause, e.late_s) for e in rep.entries}


def test_fixture_journal_gives_exact_causes_and_lateness():
    """Each repayment of the fixture journal gets its known cause and lateness."""
    rep = build_report(JOURNAL, CONFIG, now=NOW)

    assert {
        "outage": (Cause.CHANNEL, 3 * HOUR),
        "no-funds": (Cause.BORROWER, 24 * HOUR),
        "mixed": (Cause.MIXED, 2 * HOUR + 15 * 60),
        "on-time": (Cause.NONE, 0),
        "stuck": (Cause.CHANNEL, 24 * HOUR),
        "corrected": (Cause.CHANNEL, 4 * HOUR + 30 * 60),
        "skipped": (Cause.CHANNEL, 24 * HOUR),
        "not-yet-due": (Cause.NONE, 0),
    } == causes(rep)


def test_late_only_keeps_the_late_ones_in_due_order():
    """--late-only drops on-time and not-yet-due repayments; entries run by due date, key."""
    rep = build_report(JOURNAL, CONFIG, now=NOW, late_only=True)

    assert ["corrected", "mixed", "no-funds", "outage", "skipped", "stuck"] == [
        e.key for e in rep.entries]


def test_since_until_is_half_open_on_the_due_date():
    """[since, until): a repayment due exactly at until is left out, one due at since kept."""
    later = record("later", S, 0, tried("auto_debit", -1, Outcome.SUCCEEDED), due=at(5))

    assert ["later"] == [e.key for e in build_report(
        [OUTAGE, later], CONFIG, now=NOW, since=at(5)).entries]
    assert ["outage"] == [e.key for e in build_report(
        [OUTAGE, later], CONFIG, now=NOW, until=at(5)).entries]


def test_summary_counts_late_repayments_by_cause():
    """The summary counts every repayment, and the late ones by cause."""
    summary = build_report(JOURNAL, CONFIG, now=NOW).summary()

    assert (8, 2, 6, 3) == (summary.repayments, summary.on_time, summary.late, summary.unpaid)
    assert (4, 1, 1, 0) == (summary.channel, summary.borrower, summary.mixed, summary.none)


def test_entry_shows_the_first_attempt_before_the_due_date():
    """The first attempt before due_at is the earliest one started before it."""
    entry = next(e for e in build_report([OUTAGE], CONFIG, now=NOW).entries)

    assert entry.first_attempt is not None
    assert ("auto_debit", at(-1), Outcome.UNAVAILABLE, "maintenance") == (
        entry.first_attempt.channel, entry.first_attempt.started_at,
        entry.first_attempt.outcome, entry.first_attempt.code)
    assert (at(3.0), False, "3h") == (entry.ended_at, entry.unpaid, entry.late_text)


def test_no_attempt_before_the_due_date_is_noted():
    """A repayment first tried after its due date has no first attempt, and says so."""
    late_start = record("late-start", S, 1, tried("bank_card", 1, Outcome.SUCCEEDED))

    entry = build_report([late_start], CONFIG, now=NOW).entries[0]

    assert (None, Cause.NONE) == (entry.first_attempt, entry.cause)
    assert "note: no attempt before the due date" in entry.reasons


def test_maintenance_window_is_named_in_the_evidence():
    """An attempt inside the channel's maintenance window says which window."""
    why = attribute(OUTAGE, CONFIG, now=NOW)

    assert any("inside maintenance window mon 10:00-13:00 UTC" in r for r in why.reasons)


def test_unclassified_decline_alone_makes_no_cause():
    """A decline with a code nobody classified proves neither side: cause none, code listed."""
    declined = record("declined", F, -3, tried("bank_card", -3, Outcome.DECLINED, "05"))

    why = attribute(declined, CONFIG, now=NOW)

    assert (Cause.NONE, ("05",)) == (why.cause, why.unclassified)


def test_unclassified_decline_beside_a_channel_fault_is_mixed():
    """Beside a channel fault, an unclassified decline makes the cause mixed."""
    both = record("both", F, -3, tried("auto_debit", -3, Outcome.UNAVAILABLE, "503"),
                  tried("bank_card", -2.99, Outcome.DECLINED, "05"))

    assert Cause.MIXED == attribute(both, CONFIG, now=NOW).cause


def test_unclassified_decline_inside_a_maintenance_window_is_the_channels():
    """An unclassified decline made during the channel's maintenance is the channel's."""
    during = record("during", F, -1, tried("auto_debit", -1, Outcome.DECLINED, "05"))

    assert Cause.CHANNEL == attribute(during, CONFIG, now=NOW).cause


@pytest.mark.parametrize(("code", "cause"), [
    ("51", Cause.BORROWER),                  # marked borrower in the config
    ("96", Cause.CHANNEL),                   # marked channel, outcome left to the adapter
    ("insufficient_funds", Cause.CHANNEL),   # a config entry overrides the default
    ("account_frozen", Cause.BORROWER),      # a default borrower code
    ("05", Cause.NONE),                      # unclassified
])
def test_decline_codes_follow_the_config_marks(code, cause):
    """A decline's side comes from the channel's code marks, then the default codes."""
    declined = record("declined", F, -3, tried("wallet", -3, Outcome.REJECTED, code))

    assert cause == attribute(declined, CONFIG, now=NOW).cause


def test_a_late_collection_sent_before_the_due_date_is_the_channels():
    """Money taken before the due date but found late: channel, whatever the declines say."""
    why = attribute(CORRECTED, CONFIG, now=NOW)

    assert Cause.CHANNEL == why.cause
    assert why.reasons[0].startswith("note: the late collection under ref-debit was sent")
    assert ("05",) == why.unclassified


def test_a_late_collection_check_is_channel_evidence():
    """A collected late check of a repayment counts as a channel fact, and is listed."""
    unpaid = record("unpaid", F, -3, tried("bank_card", -3, Outcome.DECLINED, "05"))
    check = LateCheck(key="unpaid", channel="bank_card", reference="ref-bank_card-1", round=1,
                      state=LateState.COLLECTED, found_at=at(30), found_by="callback",
                      refund=RefundState.MANUAL)
    other = LateCheck(key="someone-else", channel="bank_card", reference="r", round=1,
                      state=LateState.COLLECTED)

    entry = build_report([unpaid], CONFIG, now=NOW, late_checks=[check, other]).entries[0]

    assert (Cause.MIXED, (check,)) == (entry.cause, entry.late_collections)
    assert "manual" == entry.to_dict()["late_collections"][0]["refund"]


def test_on_time_after_a_failover_is_not_late():
    """A channel fault that did not make the repayment late leaves the cause none."""
    why = attribute(ON_TIME, CONFIG, now=NOW)

    assert Cause.NONE == why.cause
    assert why.reasons[0].startswith("note: collected")
    assert any(r.startswith("channel: auto_debit") for r in why.reasons)


def test_without_now_an_unpaid_repayment_counts_as_late():
    """attribute() without now judges an unpaid repayment by its facts."""
    assert Cause.CHANNEL == attribute(NOT_YET_DUE, CONFIG).cause
    assert Cause.NONE == attribute(NOT_YET_DUE, CONFIG, now=NOW).cause


def test_skips_for_the_lenders_rules_are_neither_side():
    """Skips for limits are noted, not counted; maintenance and breaker skips are channel."""
    why = attribute(SKIPPED, CONFIG, now=NOW)

    assert 3 == sum(r.startswith("channel:") for r in why.reasons)  # 2 skips and the code
    assert any(r.startswith("note: wallet round 1 skipped") for r in why.reasons)


def test_failed_repayment_lateness_runs_to_now():
    """A FAILED repayment is unpaid: late from the due date to now."""
    entry = build_report([NO_FUNDS], CONFIG, now=NOW + timedelta(minutes=5)).entries[0]

    assert (True, 24 * HOUR + 300, at(-2.99)) == (entry.unpaid, entry.late_s, entry.ended_at)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (45, "45s"), (60, "1m"), (8100, "2h 15m"), (10800, "3h"),
    (90000, "1d 1h"), (86700, "1d 5m"),
])
def test_human_duration(seconds, text):
    """Lateness reads as days, hours and minutes."""
    assert text == human_duration(seconds)


def test_outputs_never_hold_the_account_number():
    """JSON, CSV and the table name keys and references, never the account."""
    rep = build_report(JOURNAL, CONFIG, now=NOW)

    for text in (rep.to_json(), rep.to_csv(), rep.to_table()):
        assert ACCOUNT not in text


def test_json_output_round_trips_the_entries():
    """to_json holds the summary and each entry with its attempts and skips."""
    data = json.loads(build_report(JOURNAL, CONFIG, now=NOW).to_json())

    outage = next(r for r in data["repayments"] if r["key"] == "outage")
    assert (6, "channel", 10800, "3h") == (
        data["summary"]["late"], outage["cause"], outage["late_s"], outage["late"])
    assert [("auto_debit", 1, "unavailable"), ("bank_card", 1, "unknown"),
            ("bank_card", 2, "succeeded")] == [
        (a["channel"], a["round"], a["outcome"]) for a in outage["attempts"]]
    assert "auto_debit" == outage["first_attempt_before_due"]["channel"]


def test_csv_output_has_one_row_per_repayment():
    """to_csv: a header and a row per entry, readable by the csv module."""
    rows = list(csv.DictReader(io.StringIO(build_report(JOURNAL, CONFIG, now=NOW).to_csv())))

    assert {"mixed": ("mixed", "8100", "auto_debit")} == {
        r["key"]: (r["cause"], r["late_s"], r["first_attempt_channel"])
        for r in rows if r["key"] == "mixed"}
    assert 8 == len(rows)


def test_table_output_lists_each_repayment_and_the_facts_of_late_ones():
    """to_table: the summary line, a row per repayment, the reasons under late ones."""
    text = build_report(JOURNAL, CONFIG, now=NOW).to_table()

    assert ("8 repayments: 2 on time, 6 late (3 unpaid); late by cause: channel 4,"
            " borrower 1, mixed 1, none 0") in text
    assert "mixed (mixed, 2h 15m late):" in text
    assert "  borrower: bank_card round 1" in text


def test_naive_times_are_refused():
    """now, since and until must be timezone-aware."""
    with pytest.raises(ValueError, match="since must be timezone-aware"):
        build_report([], CONFIG, now=NOW, since=datetime(2026, 3, 1))


# ---- the journal API and the command ----------------------------------------------------

class FixtureJournal:
    """A journal holding the fixture records, answering the two reads the report makes."""

    def __init__(self, records: tuple[Record, ...], checks: tuple[LateCheck, ...] = ()) -> None:
        self.records, self.checks, self.opened = records, checks, 0

    async def open(self) -> None:
        self.opened += 1

    async def close(self) -> None:
        self.opened -= 1

    async def due_between(self, since: datetime | None, until: datetime | None
                          ) -> list[Record]:
        return sorted((r for r in self.records if r.due_at is not None
                       and (since is None or r.due_at >= since)
                       and (until is None or r.due_at < until)),
                      key=lambda r: r.due_at or DUE)

    async def late_checks(self, key: str | None = None, *, state: LateState | None = None,
                          refund: RefundState | None = None) -> list[LateCheck]:
        return [c for c in self.checks if state is None or c.state is state]


async def test_report_reads_the_journal():
    """failover.report.report reads the journal's due repayments and late collections."""
    journal = FixtureJournal(JOURNAL)

    rep = await report(journal, CONFIG, now=NOW, late_only=True)  # type: ignore[arg-type]

    assert causes(rep) == causes(build_report(JOURNAL, CONFIG, now=NOW, late_only=True))


@pytest.fixture
def fixture_journal(monkeypatch: pytest.MonkeyPatch) -> FixtureJournal:
    journal = FixtureJournal(JOURNAL)
    monkeypatch.setattr("failover.cli._open_journal", lambda target, **kw: journal)
    return journal


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_command_prints_json(fixture_journal, capsys, tmp_path):
    """failover report --format json: the report as JSON, config codes applied, exit 0."""
    config = tmp_path / "failover.toml"
    config.write_text('[channels.bank_card.codes]\n"05" = { fault = "borrower" }\n')

    code, out, _ = run(capsys, "report", "--journal", "j.db", "--config", str(config),
                       "--now", NOW.isoformat(), "--late-only", "--format", "json")

    data = json.loads(out)
    assert (0, 0) == (code, fixture_journal.opened)
    assert ("j.db", 6) == (data["journal"], data["summary"]["late"])
    # No maintenance window in this config; "05" is the borrower's now.
    assert {"outage": "channel", "corrected": "channel", "mixed": "mixed"} == {
        r["key"]: r["cause"] for r in data["repayments"]
        if r["key"] in ("outage", "corrected", "mixed")}


def test_command_prints_csv_for_a_date_range(fixture_journal, capsys):
    """--since/--until take dates; --format csv prints the rows."""
    code, out, _ = run(capsys, "report", "--journal", "j.db", "--since", "2026-03-02",
                       "--until", "2026-03-03", "--now", NOW.isoformat(), "--format", "csv")

    rows = list(csv.DictReader(io.StringIO(out)))
    assert 0 == code
    assert 7 == len(rows)  # not-yet-due falls on 3 March, undated has no due date


def test_command_prints_a_table_by_default(fixture_journal, capsys):
    """Without --format the report is a table under the journal's name."""
    code, out, _ = run(capsys, "report", "--journal", "j.db", "--now", NOW.isoformat())

    assert 0 == code
    assert out.startswith("j.db: due any time to any time")
    assert "outage (channel, 3h late):" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--since", "yesterday"], "--since: not an ISO 8601 date or date-time: 'yesterday'"),
    (["--now", "2026-03-02T12:00"], "--now: give a UTC offset"),
    (["--since", "2026-03-03", "--until", "2026-03-02"], "--until 2026-03-02 is not after"),
])
def test_command_refuses_bad_times(fixture_journal, capsys, argv, message):
    """A bad time option is one line naming it, exit 2."""
    code, _, err = run(capsys, "report", "--journal", "j.db", *argv)

    assert 2 == code
    assert message in err


def test_command_on_an_sqlite_journal(tmp_path, capsys):
    """failover report on a real SQLite journal: an outage 3 h past due is the channel's."""
    if not hasattr(failover.SQLiteJournal, "due_between"):
        pytest.skip("SQLiteJournal.due_between is not there yet (the lead is adding it)")
    path = tmp_path / "journal.db"

    async def fill() -> None:
        journal = failover.SQLiteJournal(path)
        await journal.open()
        try:
            await journal.create(repayment(key="outage", due_at=DUE), None, at(-2))
            first = await journal.begin_attempt("outage", 1, "auto_debit", "r-1", at(-1))
            await journal.finish_attempt("outage", first, ChannelResult.unavailable("503"),
                                         at(-1))
            second = await journal.begin_attempt("outage", 1, "bank_card", "r-2", at(3))
            await journal.finish("outage", 1, S, "bank_card", "ch-2", None, at(3),
                                 attempt=(second, ChannelResult.succeeded("ch-2")))
            await journal.create(repayment(key="on-time", due_at=DUE), None, at(-2))
            third = await journal.begin_attempt("on-time", 1, "auto_debit", "r-3", at(-1))
            await journal.finish("on-time", 1, S, "auto_debit", "ch-3", None, at(-1),
                                 attempt=(third, ChannelResult.succeeded("ch-3")))
            # Declined for no funds with the debit in maintenance; a day later the
            # debit's earlier collection turned up after all.
            await journal.create(repayment(key="found-late", due_at=DUE), None, at(-2))
            fourth = await journal.begin_attempt("found-late", 1, "bank_card", "r-4", at(-1))
            await journal.finish(
                "found-late", 1, F, None, None, "insufficient_funds", at(-1),
                attempt=(fourth, ChannelResult.declined("insufficient_funds")),
                skips=[Skip("auto_debit", "maintenance", at(-1))])
            await journal.correct("found-late", 1, Correction(
                at=at(26), reason="late_collection", old_status=F, old_channel=None,
                old_channel_reference=None, old_code="insufficient_funds", new_status=S,
                new_channel="auto_debit", new_channel_reference="ch-5", reference="r-5",
                evidence="callback"))
        finally:
            await journal.close()

    asyncio.run(fill())
    code, out, _ = run(capsys, "report", "--journal", str(path), "--json",
                       "--now", (NOW + timedelta(days=1)).isoformat())

    data = json.loads(out)
    assert 0 == code
    assert {"outage": ("channel", 3 * HOUR), "on-time": ("none", 0),
            "found-late": ("mixed", 26 * HOUR)} == {
        r["key"]: (r["cause"], r["late_s"]) for r in data["repayments"]}
    found_late = next(r for r in data["repayments"] if r["key"] == "found-late")
    assert ([("auto_debit", "maintenance")], at(26).isoformat()) == (
        [(s["channel"], s["reason"]) for s in found_late["skips"]], found_late["ended_at"])
    assert "6222021234567890" not in out


# ---- the codes config -------------------------------------------------------------------

def codes_of(codes: dict[str, Any]) -> failover.ChannelConfig:
    return RouterConfig.from_mapping({"channels": {"card": {"codes": codes}}}).channel("card")


def test_codes_take_a_plain_outcome_or_a_table():
    """Old files stay valid; a table adds a fault, with or without an outcome."""
    card = codes_of({"51": "declined", "61": {"outcome": "declined", "fault": "borrower"},
                     "96": {"fault": "channel"}})

    assert {"51": "declined", "61": "declined"} == card.outcome_map
    assert (None, "borrower", "channel") == (
        card.fault_of("51"), card.fault_of("61"), card.fault_of("96"))


def test_default_borrower_codes_and_overrides():
    """The default borrower codes apply ignoring case; a config fault overrides them."""
    card = codes_of({"insufficient_funds": {"fault": "channel"}})

    assert all(card.fault_of(code.upper()) == "borrower"
               for code in BORROWER_CODES - {"insufficient_funds"})
    assert ("channel", None, None) == (
        card.fault_of("insufficient_funds"), card.fault_of("05"), card.fault_of(None))


@pytest.mark.parametrize(("codes", "message"), [
    ({"51": "maybe"}, "channels.card.codes.51: Input should be 'succeeded', 'declined',"),
    ({"51": {"fault": "lender"}},
     "channels.card.codes.51.fault: Input should be 'borrower' or 'channel' (got 'lender')"),
    ({"51": {"outcome": "perhaps"}}, "channels.card.codes.51.outcome: Input should be"),
    ({"51": {}}, "channels.card.codes.51: give outcome, fault or both"),
    ({"51": {"falt": "borrower"}}, "channels.card.codes.51.falt: unknown key"),
    ({"51": 51}, "channels.card.codes.51: Input should be an outcome"),
])
def test_bad_codes_name_the_field(codes, message):
    """A bad code entry is a ConfigError naming its key path."""
    with pytest.raises(failover.ConfigError) as caught:
        codes_of(codes)

    assert message in str(caught.value)


def test_codes_table_in_a_toml_file(tmp_path):
    """A TOML file may mix both shapes in one [channels.X.codes] table."""
    path = tmp_path / "failover.toml"
    path.write_text('[channels.card.codes]\n"51" = "declined"\n'
                    '"61" = { outcome = "declined", fault = "borrower" }\n')

    card = RouterConfig.load(path, environ={}).channel("card")

    assert ({"51": "declined", "61": "declined"}, "borrower") == (
        card.outcome_map, card.fault_of("61"))


async def test_router_applies_a_table_shaped_code(make_router):
    """A table entry's outcome reclassifies answers like a plain one: '51' declined moves on."""
    primary = ScriptedChannel("primary", [ChannelResult.unknown("51", "insufficient funds")])
    backup = ScriptedChannel("backup")
    config = fast(primary={"codes": {"51": {"outcome": "declined", "fault": "borrower"}}})
    router = await make_router([primary, backup], config)

    result = await router.repay(repayment())

    assert (Outcome.DECLINED, "backup") == (result.attempts[0].outcome, result.channel)


async def test_router_keeps_the_adapters_outcome_for_a_fault_only_code(make_router):
    """A code marked with a fault alone does not change the outcome: UNKNOWN stays UNKNOWN."""
    primary = ScriptedChannel("primary", [ChannelResult.unknown("96")],
                              queries=[ChannelResult.unknown()] * 3)
    backup = ScriptedChannel("backup")
    router = await make_router([primary, backup], fast(primary={"codes": {"96": {
        "fault": "channel"}}}))

    result = await router.repay(repayment())

    assert (RepaymentStatus.PENDING, 0) == (result.status, backup.submits)



def test_the_report_shows_the_manual_refund_list():
    """Second collections a person must give back are listed, in the table and JSON."""
    from failover import LateCheck, LateState, RefundState

    now = datetime(2026, 3, 3, 12, tzinfo=UTC)
    manual = LateCheck("k-1", "wallet", "fo-abc", 1, LateState.COLLECTED, found_at=now,
                       found_by="query", channel_reference="w-9", refund=RefundState.MANUAL,
                       refund_code="no_refund_capability", refund_at=now)
    refunded = dataclasses.replace(manual, key="k-2", refund=RefundState.REFUNDED)

    rep = build_report([], None, now=now, late_checks=[manual, refunded])

    assert [("k-1", "no_refund_capability")] == [
        (m["key"], m["reason"]) for m in json.loads(rep.to_json())["manual_refunds"]]
    table = rep.to_table()
    assert "manual refunds (1)" in table
    assert "k-1" in table
    assert "k-2" not in table
