"""The ``failover`` command.

    failover validate CONFIG                      check a file, print the channel table
    failover channels CONFIG [--at T] [--amount A --currency C]
                                                  the order the router would use, and why
                                                  each skipped channel is skipped
    failover status --journal JOURNAL             repayments by status, pending, failovers,
                                                  late collections and manual refunds
    failover inspect KEY --journal JOURNAL        one repayment's attempts
    failover report --journal JOURNAL [--config CONFIG] [--since T --until T] [--late-only]
                    [--format table|csv|json]     late repayments and whose faults made them late
    failover reconcile CONFIG --journal JOURNAL   resolve PENDING repayments now
    failover migrate JOURNAL                      create or upgrade a journal's schema
    failover list --journal J [--status ...]      repayments by status, channel, code, date
    failover purge --journal J --before DATE      erase accounts of repayments ended before DATE
    failover resolve KEY --journal J ...          settle a pending repayment by hand
    failover gateway-sim --port 8401 --faults ... a simulated payment gateway (HTTP)
    failover demo [--journal JOURNAL]             a simulated day, audited
    failover bench [SCENARIO ...]                 strategies compared on simulated scenarios

A JOURNAL is an SQLite file, or a PostgreSQL DSN (``postgresql://`` or ``postgres://``)
whose tables live in ``--schema`` (default ``failover``).  ``status``, ``inspect`` and
``report`` open it read-only; output names a DSN with its password masked.  Every command takes
``--json`` for scripts.

Exit codes: 0 success; 1 the command ran and found a problem (the demo's audit
failed, repayments are still pending after reconcile, no such repayment, the
failover strategy lost or duplicated money in a bench scenario);
2 bad usage or bad input (invalid config file, missing journal, a journal that cannot be
reached or opened, a schema newer than this version, bad option).
Output into a reader that has gone (``| head``) ends with exit 1 and no traceback.
``failover --version`` prints the installed version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from failover._errors import ConfigError, FailoverError, TerminalStateError
from failover.journal._postgres import mask_dsn

OK, PROBLEM, BAD_INPUT = 0, 1, 2
T = TypeVar("T")


class _Abort(Exception):
    """A clean, one-line failure of a command (no traceback)."""

    def __init__(self, message: str, code: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text())


def _check_file(path: Path) -> None:
    """One clear line for a file that cannot be a config at all (before parsing it)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _Abort(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not raw.strip():
        raise _Abort(f"{path}: the file is empty")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Abort(f"{path}: not UTF-8 text (invalid byte 0x{raw[exc.start]:02x}"
                     f" at offset {exc.start})") from exc


def _load_config(path: Path) -> Any:
    from failover._adapters import build_channel
    from failover.config import RouterConfig

    _check_file(path)
    config = RouterConfig.load(path)
    if not config.channels:
        raise _Abort(f"{path}: no channels configured ([channels.NAME] tables)")
    # Every channel is built, so one run reports every broken adapter, not the first.
    channels, problems = [], []
    for name in config.channels:
        try:
            channels.append(build_channel(name, config, str(path)))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return config, channels


# ---- validate ---------------------------------------------------------------------------

def _channel_rows(config: Any, names: Sequence[str]) -> list[dict[str, Any]]:
    from failover._eligibility import priority_order

    rows = []
    for order, name in enumerate(priority_order(config, names), start=1):
        c = config.channel(name)
        limits = c.limits
        limit_text = []
        if limits.currencies:
            limit_text.append("/".join(limits.currencies))
        if limits.min_amount is not None or limits.max_amount is not None:
            limit_text.append(f"{limits.min_amount or 0}..{limits.max_amount or 'any'}")
        for code, bounds in limits.amounts.items():
            limit_text.append(f"{code} {bounds.min_amount or 0}..{bounds.max_amount or 'any'}")
        rows.append({
            "order": order, "channel": name, "priority": c.priority, "enabled": c.enabled,
            "adapter": c.adapter, "timeout_s": c.timeout_s,
            "retry": f"{c.retry.max_attempts}x {c.retry.initial_backoff_s}-"
                     f"{c.retry.max_backoff_s}s",
            "breaker": f"{c.breaker.fail_max} fails/{c.breaker.reset_timeout_s}s",
            "limits": ", ".join(limit_text) or "none",
            "maintenance": "; ".join(w.describe() for w in c.maintenance) or "none",
            "codes": len(c.codes),
        })
    return rows


def _validate(args: argparse.Namespace) -> int:
    config, channels = _load_config(args.config)
    rows = _channel_rows(config, [c.name for c in channels])
    data = {"config": str(args.config), "valid": True, "deadline_s": config.deadline_s,
            "channels": rows}
    _emit(args, data, lambda: (
        f"{args.config}: valid; deadline_s = {config.deadline_s}\n\n"
        + _table(list(rows[0]), [list(r.values()) for r in rows])
    ))
    return OK


# ---- channels ---------------------------------------------------------------------------

def _parse_at(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _Abort(f"--at: not an ISO 8601 date-time: {text!r}") from exc
    if moment.utcoffset() is None:
        raise _Abort(f"--at: give a UTC offset, e.g. {text}+08:00 or {text}Z")
    return moment


def _amount(amount: str, currency: str) -> tuple[Decimal, str]:
    """The amount and currency as ``failover.Repayment`` accepts them, or one line per
    problem naming the option."""
    from pydantic import ValidationError

    from failover._models import Repayment

    try:
        checked = Repayment.model_validate({"key": "failover-channels", "account": "cli",
                                            "amount": amount, "currency": currency})
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            got = f" (got {error['input']!r})" if repr(error["input"]) not in message else ""
            lines.append(f"--{error['loc'][0]}: {message}{got}")
        raise _Abort("\n".join(lines)) from exc
    return checked.amount, checked.currency


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d`` (or plain seconds) as seconds."""
    from failover._models import MAX_OVERRIDE_S

    unit = text[-1:].lower()
    number = text[:-1] if unit in _UNITS else text
    try:
        seconds = float(number) * _UNITS.get(unit, 1)
    except ValueError:
        raise _Abort(f"--for: not a duration such as 90s, 30m, 2h or 1d: {text!r}") from None
    if not 0 < seconds <= MAX_OVERRIDE_S:  # NaN fails both
        raise _Abort(f"--for: must be above 0 and at most 366d (a switch ends by itself),"
                     f" got {text!r}")
    return seconds


async def _switch(target: _Target, args: argparse.Namespace) -> dict[str, Any]:
    import getpass

    from failover._models import Override
    from failover.journal._sqlite import write_override

    name = args.disable or args.enable or args.clear
    if args.config is not None:
        config, _ = _load_config(args.config)
        if name not in config.channels:
            raise _Abort(f"{name!r} is not a channel of {args.config}"
                         f" (channels: {', '.join(config.channels)})")
    now = datetime.now(UTC)
    switch = None
    if args.clear is None:
        if args.for_ is None or not args.reason:
            raise _Abort("--for and --reason are required with --disable or --enable")
        from datetime import timedelta

        switch = Override(name, args.enable is not None,
                          now + timedelta(seconds=_duration(args.for_)), args.reason,
                          args.by or getpass.getuser(), now)
    if not target.is_dsn:  # beside the running service: a one-row write of its own
        done = write_override(target.path, switch, name)
    else:
        journal = _open_journal(target, read_only=False)
        await journal.open()
        try:
            if switch is None:
                done = await journal.clear_override(name)
            else:
                await journal.set_override(switch)
                done = True
        finally:
            await journal.close()
    return {"channel": name, "done": done,
            "override": None if switch is None else _override_data(switch, now)}


def _override_data(o: Any, now: datetime) -> dict[str, Any]:
    return {"channel": o.channel, "enabled": o.enabled, "until": o.until.isoformat(),
            "active": o.active(now), "reason": o.reason, "by": o.by, "at": o.at.isoformat()}


async def _switches(target: _Target) -> dict[str, Any]:
    journal = _open_journal(target)
    await journal.open()
    try:
        overrides = await journal.overrides()
        reports = await journal.breaker_reports()
    finally:
        await journal.close()
    now = datetime.now(UTC)
    return {"overrides": [_override_data(o, now) for o in overrides],
            "breakers": [{"instance": i, "channel": c, "state": st, "at": at.isoformat()}
                         for i, c, st, at in reports]}


def _channels_of_journal(args: argparse.Namespace) -> int:
    target = _journal_target(args)
    chosen = [a for a in (args.disable, args.enable, args.clear) if a is not None]
    if len(chosen) > 1:
        raise _Abort("give one of --disable, --enable or --clear")
    if chosen:
        data = _run(target, lambda: _switch(target, args))

        def said() -> str:
            if args.clear is not None:
                return (f"{data['channel']}: switch cleared" if data["done"]
                        else f"{data['channel']}: no switch to clear")
            o = data["override"]
            return (f"{o['channel']}: {'enabled' if o['enabled'] else 'disabled'} for every"
                    f" instance until {o['until']} ({o['reason']}, by {o['by']}); instances"
                    " take it within their sweep interval")

        _emit(args, {**target.data(), **data}, said)
        return OK
    data = _run(target, lambda: _switches(target))

    def text() -> str:
        lines = [f"{target.label}: operators' switches"]
        if data["overrides"]:
            lines.append(_table(["channel", "switch", "until", "active", "reason", "by"],
                                [[o["channel"], "on" if o["enabled"] else "off",
                                  o["until"][:19], "yes" if o["active"] else "expired",
                                  o["reason"], o["by"]] for o in data["overrides"]]))
        else:
            lines.append("(none)")
        lines += ["", "breakers, as each instance last noted them"]
        if data["breakers"]:
            lines.append(_table(["instance", "channel", "state", "at"],
                                [[b["instance"], b["channel"], b["state"], b["at"][:19]]
                                 for b in data["breakers"]]))
        else:
            lines.append("(no instance has noted its breakers: they do so from their"
                         " background loop)")
        return "\n".join(lines)

    _emit(args, {**target.data(), **data}, text)
    return OK


def _channels(args: argparse.Namespace) -> int:
    from failover._eligibility import explain

    if args.journal is not None:
        return _channels_of_journal(args)
    if args.config is None:
        raise _Abort("give a config file (the order the router would use) or --journal"
                     " (operators' switches and breakers)")
    config, channels = _load_config(args.config)
    at = _parse_at(args.at)
    if (args.amount is None) != (args.currency is None):
        raise _Abort("--amount and --currency go together")
    amount, currency = Decimal(0), ""
    if args.amount is not None:
        amount, currency = _amount(args.amount, args.currency)
    names = [c.name for c in channels]
    if args.amount is None:
        # No repayment given: limits are not judged, only switches and windows.
        config = config.model_copy(update={"channels": {
            n: config.channel(n).model_copy(update={"limits": type(config.channel(n).limits)()})
            for n in names}})
    verdicts = explain(config, names, amount, currency, at)
    order = [v.channel for v in verdicts if v.eligible]
    data = {
        "at": at.isoformat(), "amount": None if args.amount is None else str(amount),
        "currency": currency or None, "order": order,
        "channels": [{"channel": v.channel, "eligible": v.eligible, "reason": v.reason,
                      "detail": v.detail} for v in verdicts],
        "breakers": "not known here: breaker state lives in the running service",
    }

    def text() -> str:
        what = f"{amount} {currency}" if args.amount is not None else "any repayment"
        rows = [[v.channel, "use" if v.eligible else "skip", v.reason or "", v.detail or ""]
                for v in verdicts]
        head = (f"at {at.isoformat()}, for {what}: "
                f"{' -> '.join(order) if order else 'no eligible channel'}")
        return (head + "\n\n" + _table(["channel", "", "reason", "detail"], rows)
                + "\n\n(breakers are not judged here: their state lives in the running service)")

    _emit(args, data, text)
    return OK


# ---- journals ---------------------------------------------------------------------------

DEFAULT_SCHEMA = "failover"


@dataclass(frozen=True, slots=True)
class _Target:
    """The journal a command works on: an SQLite file, or a PostgreSQL DSN and schema."""

    text: str
    schema: str | None  # None for an SQLite file

    @property
    def is_dsn(self) -> bool:
        return self.schema is not None

    @property
    def path(self) -> Path:
        return Path(self.text)

    @property
    def label(self) -> str:
        return mask_dsn(self.text) if self.is_dsn else str(self.path)

    @property
    def described(self) -> str:
        return f"{self.label} (schema {self.schema})" if self.is_dsn else self.label

    def redact(self, message: str) -> str:
        """``message`` without the DSN's password, should a driver or journal quote it."""
        if not self.is_dsn:
            return message
        message = message.replace(self.text, self.label)
        secrets = {m.group(1) for m in re.finditer(r"(?i)[?&](?:ssl)?password=([^&#]+)",
                                                   self.text)}
        userinfo = self.text.partition("://")[2].rpartition("@")[0]
        if ":" in userinfo:
            secrets.add(userinfo.partition(":")[2])
        for secret in sorted(secrets - {""}, key=len, reverse=True):
            message = message.replace(secret, "***")
        return message

    def data(self) -> dict[str, Any]:
        """How JSON output names the journal."""
        return {"journal": self.label, "schema": self.schema} if self.is_dsn \
            else {"journal": self.label}


def _target(text: str | None, schema: str | None) -> _Target | None:
    from failover.journal import is_dsn

    if text is None:
        if schema is not None:
            raise _Abort("--schema: only for a PostgreSQL journal (--journal postgresql://...)")
        return None
    if is_dsn(text):
        return _Target(text, schema or DEFAULT_SCHEMA)
    if schema is not None:
        raise _Abort(f"--schema: only for a PostgreSQL journal; {text} is an SQLite file")
    return _Target(text, None)


def _journal_target(args: argparse.Namespace) -> _Target:
    target = _target(args.journal, args.schema)
    assert target is not None  # --journal is required by these commands
    return target


def _codec() -> Any:
    """The account codec when ``FAILOVER_ACCOUNT_KEYS`` is set (accounts are then shown
    masked, as decoded), else none (encrypted accounts stay unreadable)."""
    import os

    if not os.environ.get("FAILOVER_ACCOUNT_KEYS"):
        return None
    from failover.codec import FernetCodec

    try:
        return FernetCodec.from_env()
    except ConfigError as exc:
        raise _Abort(str(exc)) from exc


def _open_journal(target: _Target, *, read_only: bool = True, migrate: bool = False,
                  must_exist: bool = True) -> Any:
    """The journal, not yet opened.  A missing SQLite file is refused (nothing is created)
    unless ``must_exist`` is false; a PostgreSQL schema is created only with ``migrate``."""
    from failover.journal import open_journal

    codec = _codec()
    if not target.is_dsn:
        if must_exist and not target.path.exists():
            raise _Abort(f"--journal: no journal at {target.path}")
        return open_journal(target.path, read_only=read_only, codec=codec)
    try:
        return open_journal(target.text, read_only=read_only, migrate=migrate,
                            schema=target.schema or DEFAULT_SCHEMA, codec=codec)
    except ValueError as exc:  # a schema name the journal refuses
        raise _Abort(target.redact(str(exc))) from exc


def _run(target: _Target | None, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work()``.  A PostgreSQL journal's errors (it translates the driver's) become
    one line without the DSN's password, should the driver have quoted it."""
    try:
        return asyncio.run(work())
    except FailoverError as exc:
        if target is None or not target.is_dsn:
            raise
        raise _Abort(target.redact(str(exc))) from exc


# ---- status / inspect -------------------------------------------------------------------

async def _status_data(target: _Target, limit: int) -> dict[str, Any]:
    from failover._models import LateState, RefundState

    journal = _open_journal(target)
    await journal.open()
    try:
        stats = await journal.stats()
        pending = []
        for key in (await journal.pending_keys())[:limit]:
            record = await journal.load(key)
            if record is not None:
                pending.append({"key": key, "since": record.created_at.isoformat(),
                                "reason": record.pending_reason, "channel": record.pending_channel,
                                "code": record.code})
        moves = await journal.recent_failovers(limit)
        found = await journal.late_checks(state=LateState.COLLECTED)
    finally:
        await journal.close()
    refunds = Counter(c.refund for c in found)
    # Oldest first: the borrower who has waited longest for their money comes first.
    manual = sorted((c for c in found if c.refund is RefundState.MANUAL),
                    key=lambda c: (c.refund_at is None, c.refund_at or datetime.min, c.key))
    return {
        **target.data(),
        "by_status": {status.value: count for status, count in stats.by_status.items()},
        "oldest_pending": stats.oldest_pending.isoformat() if stats.oldest_pending else None,
        "pending": pending,
        "recent_failovers": [{"key": m.key, "from": m.from_channel, "to": m.to_channel,
                              "at": m.at.isoformat()} for m in moves],
        "late_collections": {
            "found": len(found), "refunded": refunds[RefundState.REFUNDED],
            "refunding": sum(refunds[s] for s in (RefundState.DUE, RefundState.SENT,
                                                   RefundState.UNKNOWN)),
            "manual": refunds[RefundState.MANUAL],
        },
        # Keys, channels and references only: a late check holds no account number.
        "manual_refunds": [{"key": c.key, "channel": c.channel, "reference": c.reference,
                            "channel_reference": c.channel_reference,
                            "reason": c.refund_code,
                            "since": c.refund_at.isoformat() if c.refund_at else None}
                           for c in manual[:limit]],
    }


def _status(args: argparse.Namespace) -> int:
    target = _journal_target(args)
    data = _run(target, lambda: _status_data(target, args.limit))

    def text() -> str:
        counts = ", ".join(f"{s} {n}" for s, n in data["by_status"].items())
        parts = [f"{target.described}: {counts}",
                 f"oldest pending: {data['oldest_pending'] or 'none'}"]
        if data["pending"]:
            parts += ["", "pending:", _table(
                ["key", "since", "reason", "channel", "code"],
                [[p["key"], p["since"], p["reason"], p["channel"], p["code"]]
                 for p in data["pending"]])]
        if data["recent_failovers"]:
            parts += ["", "recent failovers:", _table(
                ["at", "key", "from", "to"],
                [[m["at"], m["key"], m["from"], m["to"]] for m in data["recent_failovers"]])]
        late = data["late_collections"]
        parts += ["", f"late collections: found {late['found']}, refunded {late['refunded']},"
                      f" refunding {late['refunding']}, manual {late['manual']}"]
        if late["manual"]:
            shown = data["manual_refunds"]
            more = late["manual"] - len(shown)
            parts += ["", f"manual refunds ({late['manual']}, to give back by hand"
                          f"{f'; the oldest {len(shown)} shown' if more else ''}):",
                      _table(["key", "channel", "reference", "reason", "since"],
                             [[m["key"], m["channel"], m["reference"], m["reason"], m["since"]]
                              for m in shown])]
        return "\n".join(parts)

    _emit(args, data, text)
    return OK


async def _load_record(target: _Target, key: str) -> Any:
    journal = _open_journal(target)
    await journal.open()
    try:
        return await journal.load(key)
    finally:
        await journal.close()


def _inspect(args: argparse.Namespace) -> int:
    from failover._models import _mask

    target = _journal_target(args)
    record = _run(target, lambda: _load_record(target, args.key))
    if record is None:
        raise _Abort(f"no repayment {args.key!r} in {target.described}", PROBLEM)
    attempts = [{
        "round": a.round, "channel": a.channel, "reference": a.reference,
        "outcome": a.outcome.value if a.outcome else "sent (no answer yet)", "code": a.code,
        "resolution": a.resolution.value if a.resolution else None,
        "started_at": a.started_at.isoformat(),
        "finished_at": a.finished_at.isoformat() if a.finished_at else None,
    } for a in record.attempts]
    data = {
        "key": record.key, "account": _mask(record.account), "amount": str(record.amount),
        "currency": record.currency, "status": record.status.value, "round": record.round,
        "channel": record.channel, "channel_reference": record.channel_reference,
        "code": record.code,
        "pending_reason": record.pending_reason.value if record.pending_reason else None,
        "pending_channel": record.pending_channel,
        "created_at": record.created_at.isoformat(), "updated_at": record.updated_at.isoformat(),
        "attempts": attempts,
    }

    def text() -> str:
        head = (f"{record.key}: {record.status.value}"
                + (f" on {record.channel} ({record.channel_reference})" if record.channel else "")
                + (f", code {record.code}" if record.code else "")
                + (f", waiting for {record.pending_channel}" if record.pending_channel else ""))
        facts = (f"{record.amount} {record.currency}, account {data['account']},"
                 f" created {data['created_at']}, updated {data['updated_at']}")
        rows = [[a["round"], a["channel"], a["outcome"], a["code"], a["resolution"],
                 a["started_at"], a["finished_at"], a["reference"]] for a in attempts]
        table = _table(["round", "channel", "outcome", "code", "resolved as", "started",
                        "finished", "reference"], rows) if rows else "(no attempts)"
        return f"{head}\n{facts}\n\n{table}"

    _emit(args, data, text)
    return OK


# ---- report -----------------------------------------------------------------------------

def _moment(option: str, text: str | None) -> datetime | None:
    """An ISO 8601 date-time with a UTC offset, or a date (midnight UTC)."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _Abort(f"{option}: not an ISO 8601 date or date-time: {text!r}") from exc
    if len(text) == 10:  # a date alone: its midnight in UTC
        return moment.replace(tzinfo=UTC)
    if moment.utcoffset() is None:
        raise _Abort(f"{option}: give a UTC offset, e.g. {text}+08:00 or {text}Z")
    return moment


async def _report_of(target: _Target, config: Any, now: datetime, since: datetime | None,
                     until: datetime | None, late_only: bool) -> Any:
    from failover.report import report

    journal = _open_journal(target)
    await journal.open()
    try:
        return await report(journal, config, now=now, since=since, until=until,
                            late_only=late_only)
    finally:
        await journal.close()


def _report(args: argparse.Namespace) -> int:
    from failover.config import RouterConfig

    target = _journal_target(args)
    since, until = _moment("--since", args.since), _moment("--until", args.until)
    now = _moment("--now", args.now) or datetime.now(UTC)
    if since is not None and until is not None and until <= since:
        raise _Abort(f"--until {args.until} is not after --since {args.since}")
    config = RouterConfig()
    if args.config is not None:
        # Only codes and maintenance windows are read: adapters are not built.
        _check_file(args.config)
        config = RouterConfig.load(args.config)
    result = _run(target, lambda: _report_of(target, config, now, since, until,
                                             args.late_only))
    form = "json" if args.json else args.format
    if form == "json":
        print(json.dumps({**target.data(), **result.to_dict()}, indent=2))
    elif form == "csv":
        sys.stdout.write(result.to_csv())
    else:
        print(f"{target.described}: {result.to_table()}")
    return OK


# ---- reconcile --------------------------------------------------------------------------

async def _reconcile_data(config_path: Path, target: _Target) -> dict[str, Any]:
    from failover._router import Router

    _check_file(config_path)
    # The repayments pending now: opening the router already resolves them (recovery),
    # so they are listed first and reported on, whichever of the two settled them.
    reader = _open_journal(target, read_only=True)
    await reader.open()
    try:
        keys = await reader.pending_keys()
    finally:
        await reader.close()
    journal = _open_journal(target, read_only=False)
    # A shared journal's background sweep is for services; this command reconciles once.
    extra: dict[str, Any] = {"background": False} if target.is_dsn else {}
    router = Router.from_config(config_path, journal=journal, **extra)
    data: dict[str, Any] = {}
    async with router:
        await router.wait_recovered()
        await router.reconcile()
        results = [result for key in keys if (result := await router.get(key)) is not None]
        if journal.shared:
            held = await _held_elsewhere(journal, [r.key for r in results
                                                   if r.status.value == "pending"])
            results = [r for r in results if r.key not in held]
            data["held_elsewhere"] = held
        stats = await journal.stats()
    return {
        "reconciled": len(results),
        "outcomes": {s: sum(r.status.value == s for r in results)
                     for s in ("succeeded", "failed", "pending")},
        **data,
        "journal_by_status": {s.value: n for s, n in stats.by_status.items()},
    }


async def _held_elsewhere(journal: Any, keys: Sequence[str]) -> list[str]:
    """The pending ``keys`` another instance holds (a running service driving them, or a
    stopped one whose lease has not run out): reconcile left them to their owner.

    The journal tells ownership only to one who asks to own: each key is taken and at
    once given back (what this command drove and left pending is free again)."""
    held = []
    for key in keys:
        record = await journal.acquire(key)
        if record is None:
            held.append(key)
        elif record.status.value == "pending":
            await journal.release(key)
    return held


def _reconcile(args: argparse.Namespace) -> int:
    target = _journal_target(args)
    data = _run(target, lambda: _reconcile_data(args.config, target))

    def text() -> str:
        lines = [f"reconciled {data['reconciled']}: "
                 + ", ".join(f"{s} {n}" for s, n in data["outcomes"].items())]
        if data.get("held_elsewhere"):
            held = data["held_elsewhere"]
            shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            lines.append(f"left to the instance that holds them (a live lease): {shown}")
        lines.append("journal now: "
                     + ", ".join(f"{s} {n}" for s, n in data["journal_by_status"].items()))
        return "\n".join(lines)

    _emit(args, data, text)
    if target.is_dsn:
        # Beside running instances the journal always holds repayments in flight: only
        # the ones this command could drive count.
        return PROBLEM if data["outcomes"]["pending"] else OK
    return PROBLEM if data["journal_by_status"].get("pending") else OK


# ---- list -------------------------------------------------------------------------------

async def _list_data(target: _Target, args: argparse.Namespace) -> list[dict[str, Any]]:
    from failover._models import RepaymentStatus, _mask

    journal = _open_journal(target)
    await journal.open()
    try:
        records = await journal.find(
            status=None if args.status is None else RepaymentStatus(args.status),
            channel=args.channel, code=args.code, since=_moment("--since", args.since),
            until=_moment("--until", args.until), limit=args.limit)
    finally:
        await journal.close()
    return [{
        "key": r.key, "status": r.status.value, "amount": str(r.amount),
        "currency": r.currency, "account": _mask(r.account) if not
        r.account.startswith("fernet:") else "<encrypted>",
        "channel": r.channel or r.pending_channel, "code": r.code,
        "pending_reason": None if r.pending_reason is None or r.status.value != "pending"
        else r.pending_reason.value,
        "round": r.round, "attempts": len(r.attempts),
        "created_at": r.created_at.isoformat(), "updated_at": r.updated_at.isoformat(),
        "corrections": len(r.corrections),
    } for r in records]


def _list(args: argparse.Namespace) -> int:
    target = _journal_target(args)
    if args.limit < 1:
        raise _Abort("--limit must be at least 1")
    rows = _run(target, lambda: _list_data(target, args))
    data = {**target.data(), "repayments": rows}

    def text() -> str:
        if not rows:
            return f"{target.label}: no repayment matches"
        table = _table(["key", "status", "amount", "account", "channel", "code", "attempts",
                        "created"],
                       [[r["key"], r["status"] + (f" ({r['pending_reason']})"
                                                  if r["pending_reason"] else ""),
                         f"{r['amount']} {r['currency']}", r["account"], r["channel"] or "-",
                         r["code"] or "-", r["attempts"], r["created_at"][:19]]
                        for r in rows])
        more = "" if len(rows) < args.limit else f"\n(first {args.limit}; --limit for more)"
        return f"{target.label}: {len(rows)} repayment(s), newest first\n{table}{more}"

    _emit(args, data, text)
    return OK


# ---- resolve ----------------------------------------------------------------------------

async def _channel_says(config_path: Path, record: Any, channel: str,
                        reference: str) -> tuple[str, str | None]:
    """What ``channel``'s own status query says of ``reference``: the outcome's value
    and the channel reference it gives."""
    from failover._models import ChannelRequest
    from failover._policy import invoke

    config, adapters = _load_config(config_path)
    if channel not in config.channels:
        return "not_configured", None
    adapter = next(a for a in adapters if a.name == channel)
    request = ChannelRequest(repayment_key=record.key, reference=reference,
                             account=record.account, amount=record.amount,
                             currency=record.currency, metadata=record.metadata)
    query = adapter.query

    async def ask(req: ChannelRequest) -> Any:
        if asyncio.iscoroutinefunction(query):
            return await query(req)
        # A daemon thread: one that hangs past the timeout must not hold the command
        # (asyncio.to_thread's pool is waited for when the loop closes).
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if not done.done():
                if error is not None:
                    done.set_exception(error)
                else:
                    done.set_result(value)

        def work() -> None:
            try:
                value, error = query(req), None
            except BaseException as exc:
                value, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, value, error)

        threading.Thread(target=work, name="failover-resolve-query", daemon=True).start()
        return await done

    answer = await invoke(ask, request, config.channels[channel].timeout_s,
                          config.channels[channel].outcome_map)
    return answer.outcome.value, answer.channel_reference


async def _resolve_data(target: _Target, args: argparse.Namespace) -> dict[str, Any]:
    import getpass

    from failover._flow import make_reference
    from failover._late import OPERATOR_PREFIX
    from failover._models import Correction, RepaymentStatus
    from failover.codec import account_usable

    journal = _open_journal(target, read_only=False)
    await journal.open()
    try:
        record = await journal.load(args.key)
        if record is None:
            raise _Abort(f"KEY: no repayment {args.key!r} in {target.label}")
        if record.status is not RepaymentStatus.PENDING:
            raise _Abort(f"{args.key}: it is {record.status.value}, not pending: only a"
                         " pending repayment is resolved by hand (a late collection is"
                         " corrected by the sweep)")
        collected = args.collected_by is not None
        # The operator's collection has a reference of its own: the router's own attempt
        # on that channel, if it may have collected, stays watched (a second collection
        # is refunded; the same one, reported under this channel reference, is not).
        reference = f"{OPERATOR_PREFIX}{args.channel_reference}" if collected else None
        ours = make_reference(record.key, record.round, args.collected_by) \
            if collected else None
        warnings: list[str] = []
        if args.config is not None:
            if not account_usable(record.account):
                warnings.append("the account is encrypted and FAILOVER_ACCOUNT_KEYS is not"
                                " set, or it was erased: the channels were not asked")
            elif collected:
                assert ours is not None
                said, theirs = await _channel_says(args.config, record, args.collected_by,
                                                   ours)
                if said != "succeeded":
                    warnings.append(f"{args.collected_by}'s own query says {said} for"
                                    f" {ours}, not succeeded")
                elif theirs is not None and theirs != args.channel_reference:
                    warnings.append(
                        f"{args.collected_by}'s own query says succeeded for {ours} under"
                        f" {theirs}, not {args.channel_reference}: the router will not"
                        " refund it: it goes to the manual-refund list for someone to"
                        " tell whether it is the same money")
            else:
                for attempt in record.round_attempts():
                    if attempt.in_doubt:
                        said, _ = await _channel_says(args.config, record, attempt.channel,
                                                      attempt.reference)
                        if said == "succeeded":
                            warnings.append(f"{attempt.channel}'s own query says succeeded"
                                            f" for {attempt.reference}: it collected")
        by = args.by or getpass.getuser()
        correction = Correction(
            at=datetime.now(UTC), reason="operator", old_status=record.status,
            old_channel=record.pending_channel, old_channel_reference=None,
            old_code=record.code,
            new_status=RepaymentStatus.SUCCEEDED if collected else RepaymentStatus.FAILED,
            new_channel=args.collected_by, new_channel_reference=args.channel_reference,
            reference=reference, evidence=f"operator {by}: {args.note}")
        resolved = await journal.resolve_by_hand(record.key, record.round, correction)
    finally:
        await journal.close()
    return {"key": resolved.key, "status": resolved.status.value,
            "channel": resolved.channel, "channel_reference": resolved.channel_reference,
            "by": by, "note": args.note, "warnings": warnings}


def _resolve(args: argparse.Namespace) -> int:
    target = _journal_target(args)
    if (args.collected_by is None) == (not args.not_collected):
        raise _Abort("give --collected-by CHANNEL (with --channel-reference) or"
                     " --not-collected")
    if args.collected_by is not None and not args.channel_reference:
        raise _Abort("--channel-reference: the channel's own reference of the collection"
                     " is required with --collected-by")
    try:
        data = _run(target, lambda: _resolve_data(target, args))
    except TerminalStateError as exc:
        raise _Abort(str(exc)) from exc
    for warning in data["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    payload = {**target.data(), **data}

    def text() -> str:
        how = (f"collected by {data['channel']} ({data['channel_reference']})"
               if data["status"] == "succeeded" else "not collected")
        return (f"{data['key']}: resolved by {data['by']} as {data['status']}, {how};"
                " kept with its corrections")

    _emit(args, payload, text)
    return OK


# ---- purge ------------------------------------------------------------------------------

async def _purge_count(target: _Target, before: datetime) -> int:
    journal = _open_journal(target, read_only=False)
    await journal.open()
    try:
        erased: int = await journal.purge_accounts(before)
        return erased
    finally:
        await journal.close()


def _purge(args: argparse.Namespace) -> int:
    target = _journal_target(args)
    before = _moment("--before", args.before)
    assert before is not None  # required
    erased = _run(target, lambda: _purge_count(target, before))
    data = {**target.data(), "before": before.isoformat(), "erased": erased}

    def text() -> str:
        return (f"{target.label}: erased the account of {erased} repayment(s) that ended"
                f" before {before.isoformat()} (their records and attempts are kept)")

    _emit(args, data, text)
    return OK


# ---- migrate ------------------------------------------------------------------------------

def _sqlite_version(path: Path) -> int:
    """The file's schema version, 0 for no file; refuses a database that is not a journal."""
    import sqlite3
    from urllib.parse import quote

    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
        try:
            version: int = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _Abort(f"--journal: {path} is not an SQLite journal: {exc}") from exc
    if version == 0 and tables:
        # Version 0 with tables: someone else's database, which migrating would write into.
        raise _Abort(f"--journal: {path} is an SQLite database but not a failover journal")
    return version


async def _migrate_versions(target: _Target) -> tuple[int, int]:
    if target.is_dsn:
        versions: tuple[int, int] = await _open_journal(target, read_only=False).migrate()
        return versions
    # An SQLite journal has one schema, written when the file is first opened for writing:
    # migrating creates the file (and fails where the service would, e.g. a missing folder).
    before = _sqlite_version(target.path)
    journal = _open_journal(target, read_only=False, must_exist=False)
    await journal.open()
    await journal.close()
    return before, _sqlite_version(target.path)


def _migrate(args: argparse.Namespace) -> int:
    target = _target(args.journal, args.schema)
    assert target is not None
    before, after = _run(target, lambda: _migrate_versions(target))
    data = {**target.data(), "before": before, "after": after, "migrated": before != after}
    what = f"schema {target.schema!r} in {target.label}" if target.is_dsn else target.label

    def text() -> str:
        if before == after:
            return f"{what}: version {after}, up to date (nothing to do)"
        created = " (created)" if before == 0 else ""
        return f"{what}: version {before} -> {after}{created}"

    _emit(args, data, text)
    return OK


# ---- demo ---------------------------------------------------------------------------------

async def _journal_size(target: _Target) -> int:
    """How many repayments the journal already holds (creating an absent one, as the demo
    would)."""
    journal = _open_journal(target, read_only=False, migrate=True, must_exist=False)
    await journal.open()
    try:
        stats = await journal.stats()
    finally:
        await journal.close()
    return sum(stats.by_status.values())


def _demo(args: argparse.Namespace) -> int:
    from failover._demo import print_report, run_demo

    target = _target(args.journal, args.schema)
    if target is not None:
        held = _run(target, lambda: _journal_size(target))
        if held:
            # Its repayments would be joined, not made, and the audit against today's
            # ledgers would call them false successes.
            raise _Abort(f"--journal: {target.described} already holds {held} repayments;"
                         " the demo needs an empty journal (a new file or schema)")
    if not args.json:
        where = ("a temporary SQLite journal" if target is None
                 else f"PostgreSQL journal {target.described}" if target.is_dsn
                 else f"SQLite journal {target.label}")
        print(f"failover demo: a simulated day of {args.repayments} repayments over"
              " auto_debit (primary, down 10:00-12:00, ambiguous timeouts, a few collected"
              " late), bank_card and wallet; two in three due that day, one borrower in ten"
              f" on auto-debit alone; {where}; seed {args.seed}")
        print()
    report = _run(target, lambda: run_demo(
        args.repayments, args.seed, None if target is None else target.text,
        schema=target.schema if target is not None else None))
    if args.json:
        after = report.audit_after
        print(json.dumps({
            "repayments": after.repayments, "succeeded": after.succeeded,
            "failed": after.failed, "pending_before_reconcile": report.audit_before.pending,
            "pending": after.pending, "duplicates": len(after.duplicates),
            "lost": len(after.lost), "false_successes": len(after.false_successes),
            "collected": dict(report.collected), "refunded": dict(report.refunded),
            "failovers": {f"{a}->{b}": n for (a, b), n in report.failovers.items()},
            "collected_late": {what: report.late[what]
                               for what in ("found", "refunded", "corrected", "manual")},
            "evidence": report.evidence.to_dict(),
        }, indent=2))
    else:
        print_report(report, sys.stdout)
    return OK if report.audit_after.ok and report.audit_before.ok else PROBLEM


# ---- bench ---------------------------------------------------------------------------------

def _bench(args: argparse.Namespace) -> int:
    from failover.bench import SCENARIOS, STRATEGIES, print_tables, run_bench, write_outputs
    from failover.config import RouterConfig

    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        raise _Abort(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.repayments < 1:
        raise _Abort("--repayments must be at least 1")
    if args.config:
        _check_file(args.config)
    config = RouterConfig.load(args.config) if args.config else None
    names = args.scenarios or list(SCENARIOS)
    total = sum(len(SCENARIOS[name].strategies or STRATEGIES) for name in names)
    with _progress(total, quiet=args.json) as step:
        try:
            results, data = run_bench(
                names, config=config, config_name=str(args.config) if args.config else None,
                seed=args.seed, repayments=args.repayments,
                progress=lambda scenario, strategy: step(f"{scenario}/{strategy}"),
            )
        except ValueError as exc:
            raise _Abort(str(exc)) from exc
    written = write_outputs(results, data, args.out)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_tables(results, sys.stdout)
        print(f"{data['elapsed_s']:.1f} s for {len(names)} scenario(s), {total} runs,"
              f" {args.repayments} repayments an hour each, seed {args.seed}")
        print("wrote " + ", ".join(str(p) for p in written))
        if len(written) == 1:
            print("(no plots: pip install 'failover[bench]' for matplotlib)")
    bad = [(name, strategy) for name, scenario in data["scenarios"].items()
           for strategy, m in scenario["strategies"].items()
           if strategy == "failover" and (m["duplicates"] or m["lost"])]
    return PROBLEM if bad else OK


class _progress:
    """A progress bar on stderr (rich's when installed), advanced by calling the step."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet, self.done = total, quiet, 0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Callable[[str], None]:
        if not self.quiet:
            try:
                from rich.progress import Progress

                bar = Progress(console=_stderr_console(), transient=True)
                bar.start()
                self._task = bar.add_task("bench", total=self.total)
                self._bar = bar
            except ImportError:
                self._bar = None
        return self.step

    def step(self, label: str) -> None:
        self.done += 1
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=label)
        else:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr)


# ---- gateway-sim ----------------------------------------------------------------------------

def _gateway_sim(args: argparse.Namespace) -> int:
    import sqlite3

    from failover.gateway_sim import Faults, GatewaySim

    try:
        faults = Faults.parse(args.faults)
    except ValueError as exc:
        raise _Abort(f"--faults: {exc}") from exc
    if not args.name.strip():
        raise _Abort("--name must not be blank")
    if not 0 <= args.port <= 65535:
        raise _Abort(f"--port: {args.port} is not a port (0 picks a free one)")
    if args.callback_url is not None and not args.callback_url.startswith(("http://",
                                                                           "https://")):
        raise _Abort(f"--callback-url: not an http(s) URL: {args.callback_url!r}")
    ledger = args.ledger or Path(f"{args.name}-ledger.db")
    try:
        sim = GatewaySim(args.name, ledger, faults, args.seed, args.secret, args.callback_url)
    except sqlite3.Error as exc:
        raise _Abort(f"--ledger: cannot open {ledger}: {exc}") from exc

    def ready(url: str) -> None:
        # One line, flushed: a script or test starting the command reads the URL from it.
        if args.json:
            print(json.dumps({"url": url, "name": args.name, "ledger": str(ledger),
                              "seed": args.seed, "faults": faults.to_spec(),
                              "callback_url": args.callback_url}), flush=True)
        else:
            print(f"gateway {args.name!r} listening on {url} (ledger {ledger}, seed"
                  f" {args.seed}, faults {faults.to_spec()}"
                  f"{', callbacks to ' + args.callback_url if args.callback_url else ''});"
                  " Ctrl-C stops it", flush=True)

    try:
        asyncio.run(sim.run(args.host, args.port, ready))
    except KeyboardInterrupt:  # uvicorn shut down first, then passed Ctrl-C on
        pass
    except OSError as exc:  # the port is taken, or the host is not this machine's
        raise _Abort(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
                     ) from exc
    finally:
        sim.close()
    return OK


# ---- wiring -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="failover", description="Resilient repayment collection with channel failover.",
        epilog="exit codes: 0 ok, 1 a problem found, 2 bad usage or input",
    )
    parser.add_argument("--version", action="version", version=f"failover {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str
                ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.set_defaults(run=run)
        return sub

    validate = command("validate", _validate, "check a config file; print the channel table")
    validate.add_argument("config", type=Path)

    journal_help = "SQLite file, or postgresql://USER@HOST:PORT/DB"

    channels = command("channels", _channels,
                       "the channel order the router would use, and why channels are"
                       " skipped; with --journal, operators' switches and breakers")
    channels.add_argument("config", type=Path, nargs="?", default=None)
    channels.add_argument("--at", help="ISO 8601 date-time with offset (default: now)")
    channels.add_argument("--amount", help="repayment amount, to judge limits")
    channels.add_argument("--currency", help="ISO 4217 code, with --amount")
    channels.add_argument("--journal", default=None, help=journal_help)
    channels.add_argument("--schema", default=None,
                          help=f"PostgreSQL schema of the journal (default {DEFAULT_SCHEMA})")
    channels.add_argument("--disable", metavar="NAME", help="switch a channel off, for"
                          " every instance on the journal")
    channels.add_argument("--enable", metavar="NAME", help="switch a channel on (even one"
                          " the config disables)")
    channels.add_argument("--clear", metavar="NAME", help="end a channel's switch now")
    channels.add_argument("--for", dest="for_", metavar="DURATION",
                          help="how long the switch holds: 90s, 30m, 2h, 1d")
    channels.add_argument("--reason", help="why (kept with the switch)")
    channels.add_argument("--by", default=None, help="who (default: the OS user)")

    def journal_options(sub: argparse.ArgumentParser, required: bool = True,
                        help: str = journal_help) -> None:
        sub.add_argument("--journal", required=required, help=help)
        schema_option(sub)

    def schema_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--schema", default=None,
                         help=f"PostgreSQL schema of the journal (default {DEFAULT_SCHEMA})")

    status = command("status", _status, "repayments by status, oldest pending, recent"
                     " failovers, late collections and the manual-refund list")
    journal_options(status)
    status.add_argument("--limit", type=int, default=10, help="rows per list (default 10)")

    inspect = command("inspect", _inspect, "one repayment's attempts, timestamps and outcomes")
    inspect.add_argument("key")
    journal_options(inspect)

    report = command("report", _report, "late repayments and whether channel faults or the"
                     " borrower's declines made them late (the evidence report)")
    journal_options(report)
    report.add_argument("--config", type=Path, default=None,
                        help="the router config, for its code marks and maintenance windows"
                             " (default: no config, the default borrower codes)")
    report.add_argument("--since", help="due on or after this ISO 8601 date or date-time")
    report.add_argument("--until", help="due before this ISO 8601 date or date-time")
    report.add_argument("--now", help="measure unpaid ones to this date-time (default: now)")
    report.add_argument("--late-only", action="store_true",
                        help="only the late repayments (default: every one due in the range)")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table",
                        help="output format (default table; --json is --format json)")

    reconcile = command("reconcile", _reconcile, "resolve PENDING repayments now")
    reconcile.add_argument("config", type=Path)
    journal_options(reconcile)

    listing = command("list", _list, "list repayments by status, channel, code and date"
                      " (accounts masked)")
    journal_options(listing)
    listing.add_argument("--status", choices=("pending", "failed", "succeeded"), default=None)
    listing.add_argument("--channel", help="the channel it ended on (or waits on)")
    listing.add_argument("--code", help="its code (why it failed or waits)")
    listing.add_argument("--since", help="created on or after this ISO 8601 date or date-time")
    listing.add_argument("--until", help="created before this ISO 8601 date or date-time")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (100)")

    resolve = command("resolve", _resolve, "settle a PENDING repayment by hand from an"
                      " operator's evidence (a journaled, attributed correction)")
    resolve.add_argument("key", metavar="KEY")
    journal_options(resolve)
    resolve.add_argument("--collected-by", metavar="CHANNEL", default=None,
                         help="the channel that collected it")
    resolve.add_argument("--channel-reference", default=None,
                         help="that channel's own reference of the collection")
    resolve.add_argument("--not-collected", action="store_true",
                         help="no channel collected it: it ends FAILED")
    resolve.add_argument("--note", required=True, help="the operator's evidence, kept with it")
    resolve.add_argument("--by", default=None, help="who resolves it (default: the OS user)")
    resolve.add_argument("--config", type=Path, default=None,
                         help="the router config: the channels are asked first, and a"
                              " disagreement is warned about")

    purge = command("purge", _purge, "erase the accounts of repayments that ended before a"
                    " date, keeping their audit trail")
    journal_options(purge)
    purge.add_argument("--before", required=True,
                       help="ended before this ISO 8601 date (midnight UTC) or date-time")

    migrate = command("migrate", _migrate,
                      "create or upgrade a journal's schema (PostgreSQL: apply migrations)")
    migrate.add_argument("journal", metavar="JOURNAL", help=journal_help)
    schema_option(migrate)

    from failover.bench import SCENARIOS as SCENARIO_NAMES

    bench = command("bench", _bench,
                    "compare naive, retry-only and failover strategies on simulated scenarios")
    bench.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                       help=f"{' '.join(SCENARIO_NAMES)} (default: all)")
    bench.add_argument("--config", type=Path, default=None,
                       help="your router config (channel names, priorities, policies)")
    bench.add_argument("--seed", type=int, default=7, help="traffic and fault seed (default 7)")
    bench.add_argument("--repayments", type=int, default=2000,
                       help="repayments per scenario hour (default 2000)")
    bench.add_argument("--out", type=Path, default=Path("bench-out"),
                       help="folder for bench.json and the plots (default bench-out)")

    demo = command("demo", _demo, "run a simulated day of repayments and audit it")
    demo.add_argument("--repayments", type=int, default=3000, help="how many (default 3000)")
    demo.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    journal_options(demo, required=False,
                    help="an empty journal to keep: SQLite file or postgresql:// DSN"
                         " (default: a temporary SQLite file)")

    sim = command("gateway-sim", _gateway_sim,
                  "run a simulated payment gateway (HTTP, own ledger, seeded faults)")
    sim.add_argument("--port", type=int, required=True, help="TCP port (0: a free one)")
    sim.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    sim.add_argument("--name", default="gateway", help="the gateway's name (default gateway)")
    sim.add_argument("--ledger", type=Path, default=None,
                     help="its SQLite ledger (default NAME-ledger.db here)")
    sim.add_argument("--faults", default="none",
                     help="name=value,... e.g. latency_ms=20,error_5xx=0.05,"
                          "reset_after_apply=0.05,late_apply=0.05,late_apply_s=30,"
                          "decline=0.02,maintenance=10:00-10:30 (default none)")
    sim.add_argument("--seed", type=int, default=0, help="fault seed (default 0)")
    sim.add_argument("--secret", default=None,
                     help="callback signing secret (default gateway-sim/SEED/NAME)")
    sim.add_argument("--callback-url", default=None,
                     help="POST signed payment callbacks here")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("failover")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            code: int = args.run(args)
        finally:
            sys.stdout.flush()  # inside the try: a reader that went away shows up here
    except BrokenPipeError:
        # The reader (`| head`) has gone.  As the Python docs recommend: point stdout at
        # devnull so the interpreter's final flush cannot fail again, and exit 1.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return PROBLEM
    except _Abort as exc:
        for line in str(exc).splitlines():
            print(f"failover {args.command}: {line}", file=sys.stderr)
        return exc.code
    except FailoverError as exc:  # ConfigError, JournalError...: one clear message
        for line in str(exc).splitlines():
            print(f"failover {args.command}: {line}", file=sys.stderr)
        return BAD_INPUT
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
