"""One service instance of the chaos test: a ``failover.Router`` on the shared
PostgreSQL journal, serving a line protocol on localhost.

Run as ``python -m tests.chaos.worker --dsn ... --instance ... --port ...`` from the
repository root (the driver does).  Each connection carries one JSON request line and
gets one JSON answer line:

    {"op": "repay", "key": ..., "account": ..., "amount": "12.34"}
        -> {"status": "succeeded"|"pending"|"failed", "channel", "channel_reference", "code"}
    {"op": "retry", "key": ...}          -> the same shape (a new round for a FAILED key)
    {"op": "reconcile"}                  -> {"resolved": n, "pending": n}
    {"op": "heal"}                       -> {"healed": true}   (the channels stop failing)
    {"op": "counts"}                     -> what each channel did, by kind

Anything that goes wrong answers {"error": "..."}; a killed instance answers nothing
(the driver sends the request elsewhere).  It prints ``ready`` on stdout once it
serves, and nothing else there; its log goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import sys
import time
import traceback
from decimal import Decimal
from typing import Any

import asyncpg

import failover
from tests.chaos.ledger import channels as ledger_channels

CHANNEL_TIMEOUT_S = 1.0
"""Each channel call's timeout; a hanging submit sleeps past it."""
SETTLE_S = 4.0
DEADLINE_S = 15.0


def router_config() -> failover.RouterConfig:
    channel = {
        "timeout_s": CHANNEL_TIMEOUT_S,
        # A queued submit applies at most 2.5 s after it was sent (ledger.Faults.late_s),
        # within settle_s.  The other late sender is an instance paused (SIGSTOP)
        # between its lease check and its INSERT.  A new owner counts settle_s from its
        # takeover, which comes at least timeout_s after the pause began (the lease
        # outlived the call when it was checked); so a pause shorter than timeout_s +
        # settle_s ends before the new owner can take NOT_FOUND as proof.  Longer pauses
        # are the window DESIGN §5 leaves to the late-collection sweep; the driver's
        # pauses stay below it.  FAILOVER_CHAOS_SETTLE_S=0 breaks the rule for queued
        # submits: the audit must then find duplicates (a canary for the test itself).
        "settle_s": float(os.environ.get("FAILOVER_CHAOS_SETTLE_S") or SETTLE_S),
        "retry": {"max_attempts": 4, "initial_backoff_s": 0.05, "max_backoff_s": 0.5},
        # Faults are frequent here; a breaker that opens on a few of them would fail
        # most repayments during a cluster restart instead of exercising failover.
        "breaker": {"fail_max": 25, "reset_timeout_s": 1.0},
    }
    return failover.RouterConfig.model_validate({
        "deadline_s": DEADLINE_S,
        "channels": dict.fromkeys(("auto_debit", "card", "wallet"), channel),
    })


def log(instance: str, message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [{instance}] {message}", file=sys.stderr, flush=True)


def answer_of(result: failover.RepaymentResult) -> dict[str, Any]:
    return {"status": result.status.value, "channel": result.channel,
            "channel_reference": result.channel_reference, "code": result.code}


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.instance: str = args.instance
        self.pool: Any = None
        self.channels: list[Any] = []
        self.router: failover.Router | None = None
        self.errors = 0

    async def start(self) -> None:
        args = self.args
        # min_size=0: the pool connects on first use, so it can be built while the
        # cluster is down; its connections are named for the driver's diagnostics.
        self.pool = await asyncpg.create_pool(
            args.dsn, min_size=0, max_size=10, max_inactive_connection_lifetime=30,
            server_settings={"application_name": f"chaos-ledger:{self.instance}"})
        self.channels = ledger_channels(
            self.pool, seed=f"{args.seed}/{self.instance}/{args.incarnation}",
            instance=self.instance, hang_s=CHANNEL_TIMEOUT_S + 0.5, healed=args.healed)
        deadline = time.monotonic() + args.open_timeout_s
        while True:  # the cluster may be restarting: a service's supervisor would retry
            journal = failover.PostgresJournal(
                args.dsn, instance=self.instance, lease_s=args.lease_s, schema=args.schema,
                migrate=True)
            # A quick sweep: a dead or paused instance's work is taken over about
            # lease_s after its last renewal, while the load is still running.
            router = failover.Router(self.channels, journal, router_config(),
                                     sweep_every_s=0.5, reconcile_every_s=5.0)
            try:
                await router.open()
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise
                log(self.instance, f"open failed, retrying: {exc!r}")
                await asyncio.sleep(0.5)
                continue
            self.router = router
            return

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if not line:
                return
            try:
                reply = await self.serve(json.loads(line))
            except Exception as exc:
                self.errors += 1
                if self.errors <= 20:
                    log(self.instance, "".join(traceback.format_exception(exc)).rstrip())
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client gave up (timeout): the repayment goes on regardless
        finally:
            writer.close()

    async def serve(self, request: dict[str, Any]) -> dict[str, Any]:
        router = self.router
        assert router is not None
        op = request["op"]
        if op == "repay":
            result = await router.repay(failover.Repayment(
                key=request["key"], account=request["account"],
                amount=Decimal(request["amount"]), currency="CNY"))
            return answer_of(result)
        if op == "retry":
            return answer_of(await router.retry(request["key"]))
        if op == "reconcile":
            results = await router.reconcile()
            still = sum(1 for r in results if r.status is failover.RepaymentStatus.PENDING)
            return {"resolved": len(results) - still, "pending": still}
        if op == "heal":
            for channel in self.channels:
                channel.heal()
            return {"healed": True}
        if op == "counts":
            return {channel.name: channel.counts for channel in self.channels}
        raise ValueError(f"unknown op {op!r}")


def dump(worker: Worker) -> None:
    """On SIGUSR1 (the driver sends it when this instance leaves a request unanswered):
    every task's stack, and the state of the journal's own tasks, to the log."""
    tasks = asyncio.all_tasks()
    log(worker.instance, f"dump: {len(tasks)} tasks")
    for running in tasks:
        print(f"--- task {running.get_name()}", file=sys.stderr)
        running.print_stack(limit=12, file=sys.stderr)
    # The journal's own tasks (its attributes, or its writer lanes'; private, read for
    # this diagnosis only): a task that ended is not listed above, and nothing else
    # would say how it ended.
    journal = getattr(worker.router, "_journal", None)
    for name, value in sorted(vars(journal).items()) if journal is not None else ():
        found = value if isinstance(value, list | tuple) else [value]
        for item in found:  # a task itself, or an object holding one (a writer lane)
            task = item if isinstance(item, asyncio.Task) else getattr(item, "task", None)
            if not isinstance(task, asyncio.Task):
                continue
            queue = getattr(item, "queue", None)
            state = "running"
            if task.done():
                error = None if task.cancelled() else task.exception()
                state = f"ENDED cancelled={task.cancelled()} error={error!r}"
                if error is not None:
                    traceback.print_exception(error, file=sys.stderr)
            print(f"--- journal {name} {task.get_name()}: {state}; queued:"
                  f" {None if queue is None else queue.qsize()}", file=sys.stderr)
    sys.stderr.flush()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--incarnation", type=int, default=0)
    parser.add_argument("--lease-s", type=float, default=2.0)
    parser.add_argument("--open-timeout-s", type=float, default=60.0)
    parser.add_argument("--healed", action="store_true", help="channels that never fail")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s [{args.instance}] %(name)s %(levelname)s %(message)s")

    worker = Worker(args)
    await worker.start()
    assert worker.router is not None
    server = await asyncio.start_server(worker.handle, "127.0.0.1", args.port,
                                        reuse_address=True, backlog=512)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump, worker)
    if stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):
        # The driver holds our stdin open and never writes: end of file means it died.
        orphaned = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(orphaned),
                                     sys.stdin)
        watch = asyncio.ensure_future(orphaned.read())
        watch.add_done_callback(lambda _: stop.set())
    log(worker.instance, f"serving on {args.port} (incarnation {args.incarnation})")
    print("ready", flush=True)
    await stop.wait()
    server.close()
    with contextlib.suppress(Exception):
        await worker.router.close(grace_s=2.0)
    with contextlib.suppress(Exception):
        await worker.pool.close()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # the default loop does as well, a little slower
        asyncio.run(main())
    else:
        uvloop.run(main())
