"""The ``failover`` command.

    failover validate CONFIG                      check a file, print the channel table
    failover channels CONFIG [--at T] [--amount A --currency C]
                                                  the order the router would use, and why
                                                  each skipped channel is skipped
    failover status --journal PATH                repayments by status, pending, failovers
    failover inspect KEY --journal PATH           one repayment's attempts
    failover reconcile CONFIG --journal PATH      resolve PENDING repayments now
    failover demo                                 a simulated day, audited
    failover bench [SCENARIO ...]                 strategies compared on simulated scenarios

Every command takes ``--json`` for scripts.

Exit codes: 0 success; 1 the command ran and found a problem (the demo's audit
failed, repayments are still pending after reconcile, no such repayment, the
failover strategy lost or duplicated money in a bench scenario);
2 bad usage or bad input (invalid config file, missing journal, bad option).
Output into a reader that has gone (``| head``) ends with exit 1 and no traceback.
``failover --version`` prints the installed version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from failover._errors import ConfigError, FailoverError

OK, PROBLEM, BAD_INPUT = 0, 1, 2


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


def _channels(args: argparse.Namespace) -> int:
    from failover._eligibility import explain

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


# ---- status / inspect -------------------------------------------------------------------

def _open_journal(path: Path, read_only: bool = True) -> Any:
    from failover.journal import SQLiteJournal

    if not path.exists():
        raise _Abort(f"--journal: no journal at {path}")
    return SQLiteJournal(path, read_only=read_only)


async def _status_data(path: Path, limit: int) -> dict[str, Any]:
    journal = _open_journal(path)
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
    finally:
        await journal.close()
    return {
        "journal": str(path),
        "by_status": {status.value: count for status, count in stats.by_status.items()},
        "oldest_pending": stats.oldest_pending.isoformat() if stats.oldest_pending else None,
        "pending": pending,
        "recent_failovers": [{"key": m.key, "from": m.from_channel, "to": m.to_channel,
                              "at": m.at.isoformat()} for m in moves],
    }


def _status(args: argparse.Namespace) -> int:
    data = asyncio.run(_status_data(args.journal, args.limit))

    def text() -> str:
        counts = ", ".join(f"{s} {n}" for s, n in data["by_status"].items())
        parts = [f"{data['journal']}: {counts}",
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
        return "\n".join(parts)

    _emit(args, data, text)
    return OK


async def _load_record(path: Path, key: str) -> Any:
    journal = _open_journal(path)
    await journal.open()
    try:
        return await journal.load(key)
    finally:
        await journal.close()


def _inspect(args: argparse.Namespace) -> int:
    from failover._models import _mask

    record = asyncio.run(_load_record(args.journal, args.key))
    if record is None:
        raise _Abort(f"no repayment {args.key!r} in {args.journal}", PROBLEM)
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


# ---- reconcile --------------------------------------------------------------------------

async def _reconcile_data(config_path: Path, journal_path: Path) -> dict[str, Any]:
    from failover._router import Router

    _check_file(config_path)
    # The repayments pending now: opening the router already resolves them (recovery),
    # so they are listed first and reported on, whichever of the two settled them.
    reader = _open_journal(journal_path, read_only=True)
    await reader.open()
    try:
        keys = await reader.pending_keys()
    finally:
        await reader.close()
    journal = _open_journal(journal_path, read_only=False)
    router = Router.from_config(config_path, journal=journal)
    async with router:
        await router.wait_recovered()
        await router.reconcile()
        results = [result for key in keys if (result := await router.get(key)) is not None]
        stats = await journal.stats()
    return {
        "reconciled": len(results),
        "outcomes": {s: sum(r.status.value == s for r in results)
                     for s in ("succeeded", "failed", "pending")},
        "journal_by_status": {s.value: n for s, n in stats.by_status.items()},
    }


def _reconcile(args: argparse.Namespace) -> int:
    data = asyncio.run(_reconcile_data(args.config, args.journal))
    _emit(args, data, lambda: (
        f"reconciled {data['reconciled']}: "
        + ", ".join(f"{s} {n}" for s, n in data["outcomes"].items())
        + "\njournal now: " + ", ".join(f"{s} {n}" for s, n in data["journal_by_status"].items())
    ))
    return PROBLEM if data["journal_by_status"].get("pending") else OK


# ---- demo ---------------------------------------------------------------------------------

def _demo(args: argparse.Namespace) -> int:
    from failover._demo import print_report, run_demo

    if not args.json:
        print(f"failover demo: a simulated day of {args.repayments} repayments over"
              " auto_debit (primary, down 10:00-12:00, ambiguous timeouts), bank_card and"
              f" wallet; SQLite journal; seed {args.seed}")
        print()
    report = asyncio.run(run_demo(args.repayments, args.seed, args.journal))
    if args.json:
        after = report.audit_after
        print(json.dumps({
            "repayments": after.repayments, "succeeded": after.succeeded,
            "failed": after.failed, "pending_before_reconcile": report.audit_before.pending,
            "pending": after.pending, "duplicates": len(after.duplicates),
            "lost": len(after.lost), "false_successes": len(after.false_successes),
            "collected": dict(report.collected),
            "failovers": {f"{a}->{b}": n for (a, b), n in report.failovers.items()},
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
    total = len(names) * len(STRATEGIES)
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
        print(f"{data['elapsed_s']:.1f} s for {len(names)} scenario(s) x {len(STRATEGIES)}"
              f" strategies, {args.repayments} repayments each, seed {args.seed}")
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

    channels = command("channels", _channels,
                       "the channel order the router would use, and why channels are skipped")
    channels.add_argument("config", type=Path)
    channels.add_argument("--at", help="ISO 8601 date-time with offset (default: now)")
    channels.add_argument("--amount", help="repayment amount, to judge limits")
    channels.add_argument("--currency", help="ISO 4217 code, with --amount")

    status = command("status", _status, "repayments by status, oldest pending, recent failovers")
    status.add_argument("--journal", type=Path, required=True)
    status.add_argument("--limit", type=int, default=10, help="rows per list (default 10)")

    inspect = command("inspect", _inspect, "one repayment's attempts, timestamps and outcomes")
    inspect.add_argument("key")
    inspect.add_argument("--journal", type=Path, required=True)

    reconcile = command("reconcile", _reconcile, "resolve PENDING repayments now")
    reconcile.add_argument("config", type=Path)
    reconcile.add_argument("--journal", type=Path, required=True)

    bench = command("bench", _bench,
                    "compare naive, retry-only and failover strategies on simulated scenarios")
    bench.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                       help="steady outage brownout flapping ambiguous declines maintenance"
                            " crash (default: all)")
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
    demo.add_argument("--journal", type=Path, default=None,
                      help="SQLite journal file to keep (default: a temporary one)")
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
