"""The ``failover`` command.

Exit codes: 0 success; 1 the command ran and found a problem (the demo's ledger
audit failed); 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from failover._demo import print_report, run_demo

    print(f"failover demo: a simulated day of {args.repayments} repayments over auto_debit"
          " (primary, down 10:00-12:00, ambiguous timeouts), bank_card and wallet;"
          f" SQLite journal; seed {args.seed}")
    print()
    report = asyncio.run(run_demo(args.repayments, args.seed, args.journal))
    print_report(report, sys.stdout)
    return 0 if report.audit_after.ok and report.audit_before.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="failover", description="Resilient repayment collection with channel failover."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a simulated day of repayments and audit it")
    demo.add_argument("--repayments", type=int, default=3000, help="how many (default 3000)")
    demo.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    demo.add_argument("--journal", type=Path, default=None,
                      help="SQLite journal file to keep (default: a temporary one)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
