"""Operators' channel switches: shared through the journal, taken by every instance,
ending by themselves; and the instances' breaker states, shown by ``failover channels``."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import failover
from failover import Override
from failover.cli import main
from failover.testing import FakeClock, ScriptedChannel

from .conftest import repayment


def switch(clock: FakeClock, channel: str = "card", enabled: bool = False,
           hours: float = 2) -> Override:
    return Override(channel, enabled, clock.now() + timedelta(hours=hours), "bank maintenance",
                    "ops-ana", clock.now())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---- the router ---------------------------------------------------------------------------

async def test_a_disabled_channel_is_skipped_until_the_switch_ends(make_router, clock):
    card, wallet = ScriptedChannel("card"), ScriptedChannel("wallet")
    router = await make_router([card, wallet])

    await router.override("card", enabled=False, for_s=7200, reason="bank maintenance")
    during = await router.repay(repayment(key="during"))
    [verdict, _] = router.explain(repayment())
    clock.advance(7200)
    after = await router.repay(repayment(key="after"))

    assert ("wallet", "card") == (during.channel, after.channel)
    assert ("disabled", True) == (verdict.reason, "bank maintenance" in verdict.detail)
    assert 1 == card.submits  # only after the switch ended


async def test_an_enabled_switch_brings_back_a_channel_the_config_disables(make_router):
    config = failover.RouterConfig.model_validate({"channels": {"card": {"enabled": False}}})
    router = await make_router([ScriptedChannel("card"), ScriptedChannel("wallet")], config)
    assert "wallet" == (await router.repay(repayment(key="before"))).channel

    await router.override("card", enabled=True, for_s=60, reason="the fix is live")

    assert "card" == (await router.repay(repayment(key="after"))).channel


async def test_an_unknown_channel_cannot_be_switched(make_router):
    router = await make_router([ScriptedChannel("card")])
    with pytest.raises(failover.ConfigError, match="nowhere"):
        await router.override("nowhere", enabled=False, for_s=60, reason="x")
    with pytest.raises(ValueError, match="for_s"):
        await router.override("card", enabled=False, for_s=0, reason="x")


async def test_two_instances_share_a_switch_within_seconds(postgres_dsn, pg_schema):
    """A switch set through one instance is taken by another's background loop."""
    routers = []
    for name in ("a", "b"):
        journal = failover.PostgresJournal(postgres_dsn, schema=pg_schema, instance=name,
                                           migrate=True)
        router = failover.Router([ScriptedChannel("card"), ScriptedChannel("wallet")],
                                 journal, sweep_every_s=0.1)
        await router.open()
        routers.append(router)
    a, b = routers
    try:
        await a.override("card", enabled=False, for_s=3600, reason="outage")
        for _ in range(100):
            if b.explain(repayment())[0].reason == "disabled":
                break
            await asyncio.sleep(0.05)
        assert "wallet" == (await b.repay(repayment())).channel
        reports = await b._journal.breaker_reports()
        assert {"a", "b"} <= {instance for instance, *_ in reports}
    finally:
        for router in routers:
            await router.close(grace_s=0)


# ---- the command -------------------------------------------------------------------------

def run(capsys: Any, *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except ValueError:
        return code, out, err


def test_the_command_switches_a_channel_of_a_running_sqlite_service(tmp_path: Path, capsys):
    """Beside the service that holds the journal: the switch is written, the service
    takes it on its next sweep, and failover channels shows it with the breakers."""
    path = tmp_path / "journal.db"
    clock = FakeClock()

    async def service(step: Any) -> list[str]:
        channels = []
        async with failover.Router([ScriptedChannel("card"), ScriptedChannel("wallet")],
                                   failover.SQLiteJournal(path), clock=clock) as router:
            channels.append((await router.repay(repayment(key="first"))).channel)
            await asyncio.to_thread(step)  # the operator, while the service runs
            await router.sweep()
            channels.append((await router.repay(repayment(key="second"))).channel)
        return channels

    def operator() -> None:
        code, data, err = run(capsys, "channels", "--journal", str(path), "--disable", "card",
                              "--for", "2h", "--reason", "bank maintenance", "--by", "ops",
                              "--json")
        assert 0 == code, err
        assert (False, True) == (data["override"]["enabled"], data["override"]["active"])

    assert ["card", "wallet"] == asyncio.run(service(operator))
    code, data, _ = run(capsys, "channels", "--journal", str(path), "--json")
    assert 0 == code
    assert [("card", False, "bank maintenance")] == [
        (o["channel"], o["enabled"], o["reason"]) for o in data["overrides"]]
    assert {("local", "card", "closed"), ("local", "wallet", "closed")} == {
        (b["instance"], b["channel"], b["state"]) for b in data["breakers"]}
    code, data, _ = run(capsys, "channels", "--journal", str(path), "--clear", "card",
                        "--json")
    assert (0, True) == (code, data["done"])


def test_the_command_on_postgres(postgres_dsn, pg_schema, capsys):
    async def make() -> None:
        journal = failover.PostgresJournal(postgres_dsn, schema=pg_schema, migrate=True)
        await journal.open()
        await journal.close()

    asyncio.run(make())
    target = ["--journal", postgres_dsn, "--schema", pg_schema]
    code, data, err = run(capsys, "channels", *target, "--enable", "card", "--for", "30m",
                          "--reason", "fixed", "--json")
    assert 0 == code, err
    code, data, _ = run(capsys, "channels", *target)
    assert 0 == code
    assert "card" in data
    assert "fixed" in data


def test_the_command_refuses_bad_switches(tmp_path: Path, capsys):
    path = tmp_path / "journal.db"
    asyncio.run(_empty(path))
    assert 2 == main(["channels", "--journal", str(path), "--disable", "card",
                      "--reason", "x"])
    assert "--for" in capsys.readouterr().err
    assert 2 == main(["channels", "--journal", str(path), "--disable", "card",
                      "--for", "soon", "--reason", "x"])
    assert "not a duration" in capsys.readouterr().err
    assert 2 == main(["channels", "--journal", str(path), "--disable", "card",
                      "--enable", "card", "--for", "1h", "--reason", "x"])
    assert "one of" in capsys.readouterr().err
    for endless in ("inf", "nan", "1e12d", "367d", "0"):
        assert 2 == main(["channels", "--journal", str(path), "--disable", "card",
                          "--for", endless, "--reason", "x"]), endless
        assert "at most 366d" in capsys.readouterr().err


async def test_a_switch_must_end(clock):
    """Router.override refuses a switch that never ends (or ends before it starts)."""
    async with failover.Router([ScriptedChannel("card")], failover.MemoryJournal(),
                               clock=clock) as router:
        for endless in (float("inf"), float("nan"), 367 * 86400.0, 0.0):
            with pytest.raises(ValueError, match="for_s"):
                await router.override("card", enabled=False, for_s=endless, reason="x")


async def _empty(path: Path) -> None:
    journal = failover.SQLiteJournal(path)
    await journal.open()
    await journal.close()
