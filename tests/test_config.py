"""Configuration models and files."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

import failover
from failover import ConfigError, RouterConfig
from failover.config import MaintenanceWindow
from failover.testing import ScriptedChannel

from .conftest import fast, repayment

TOML = """
deadline_s = 30

[channels.auto_debit]
priority = 1
adapter = "lender.channels:AutoDebit"
options = { merchant = "m-1" }
timeout_s = 5.0

[channels.auto_debit.retry]
max_attempts = 3
initial_backoff_s = 0.2
max_backoff_s = 2.0

[channels.auto_debit.breaker]
fail_max = 5
reset_timeout_s = 30

[channels.auto_debit.limits]
currencies = ["CNY"]
max_amount = "50000.00"

[[channels.auto_debit.maintenance]]
weekdays = ["sun"]
start = "02:00"
end = "04:00"
timezone = "Asia/Shanghai"
"""


def test_defaults_match_the_contract():
    """Defaults: deadline 30, timeout 10, 3 attempts, 0.1..2 s backoff, breaker 5/30, budget."""
    config = RouterConfig()
    channel = config.channel("anything")

    assert (30.0, 10.0, True) == (config.deadline_s, channel.timeout_s, channel.enabled)
    assert (3, 0.1, 2.0) == (channel.retry.max_attempts, channel.retry.initial_backoff_s,
                             channel.retry.max_backoff_s)
    assert (5, 30.0) == (channel.breaker.fail_max, channel.breaker.reset_timeout_s)
    assert (0.2, 10.0) == (config.retry_budget.ratio, config.retry_budget.min_per_s)
    assert ((), None) == (channel.maintenance, channel.limits.currencies)


def test_design_example_file_loads(tmp_path):
    """The TOML example of DESIGN §2 loads into the typed models."""
    path = tmp_path / "failover.toml"
    path.write_text(TOML)

    config = RouterConfig.load(path)

    channel = config.channels["auto_debit"]
    assert (1, "lender.channels:AutoDebit", 5.0) == (channel.priority, channel.adapter,
                                                     channel.timeout_s)
    assert (("CNY",), Decimal("50000.00")) == (channel.limits.currencies,
                                               channel.limits.max_amount)
    assert ("sun",) == channel.maintenance[0].weekdays


def test_yaml_mirrors_toml(tmp_path):
    """A YAML file with the same keys gives the same config."""
    yaml = pytest.importorskip("yaml")
    import tomllib

    (tmp_path / "a.toml").write_text(TOML)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(tomllib.loads(TOML)))

    assert RouterConfig.load(tmp_path / "a.toml") == RouterConfig.load(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[channels.card]\ntimeout_s = -1\n", "channels.card.timeout_s"),
        ("[channels.card]\ncolour = 'red'\n", "channels.card.colour: unknown key"),
        ("[channels.a]\npriority = 1\n[channels.b]\npriority = 1\n", "share priority 1"),
        ("[channels.card.limits]\ncurrencies = ['XXY']\n", "unknown ISO 4217"),
        ("[channels.card.limits]\nmin_amount = '10'\nmax_amount = '5'\n", "below min_amount"),
        ("[[channels.card.maintenance]]\nstart = '25:00'\nend = '01:00'\n",
         "channels.card.maintenance.0.start"),
        ("deadline_s = 'soon'\n", "deadline_s"),
        ("deadline_s = = 3\n", "not valid TOML"),
    ],
)
def test_bad_files_get_one_clear_message(tmp_path, text, message):
    """A bad file raises ConfigError naming the file and the key path."""
    path = tmp_path / "bad.toml"
    path.write_text(text)

    with pytest.raises(ConfigError) as caught:
        RouterConfig.load(path)

    assert message in str(caught.value)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("moment", "inside"),
    [
        (datetime(2026, 1, 3, 18, 30, tzinfo=UTC), True),   # Sun 02:30 in Shanghai
        (datetime(2026, 1, 3, 20, 0, tzinfo=UTC), False),   # Sun 04:00 Shanghai: end excluded
        (datetime(2026, 1, 5, 18, 30, tzinfo=UTC), False),  # Tue 02:30 in Shanghai
    ],
)
def test_weekly_window_in_a_time_zone(moment, inside):
    """A window is read in its own time zone, end exclusive."""
    window = MaintenanceWindow(weekdays=("sun",), start="02:00", end="04:00",
                               timezone="Asia/Shanghai")

    assert inside == window.contains(moment)


@pytest.mark.parametrize(
    ("moment", "inside"),
    [
        (datetime(2026, 1, 3, 23, 30, tzinfo=UTC), True),  # Sat 23:30
        (datetime(2026, 1, 4, 0, 30, tzinfo=UTC), True),   # Sun 00:30, tail of Saturday's
        (datetime(2026, 1, 5, 0, 30, tzinfo=UTC), False),  # Mon 00:30: Sunday has no window
    ],
)
def test_window_crossing_midnight(moment, inside):
    """A window whose end is before its start runs past midnight into the next day."""
    window = MaintenanceWindow(weekdays=("sat",), start="23:00", end="01:00")

    assert inside == window.contains(moment)


async def test_channel_in_maintenance_is_skipped(make_router, clock):
    """Inside a maintenance window the channel is skipped; outside it is used."""
    clock.set(datetime(2026, 1, 11, 2, 30, tzinfo=UTC))  # a Sunday
    primary, backup = ScriptedChannel("primary"), ScriptedChannel("backup")
    config = fast(primary={"maintenance": [{"weekdays": ["sun"], "start": "02:00",
                                            "end": "04:00"}]})
    router = await make_router([primary, backup], config)

    during = await router.repay(repayment(key="a"))
    clock.advance(2 * 3600)
    after = await router.repay(repayment(key="b"))

    assert ("backup", "primary") == (during.channel, after.channel)


async def test_limits_by_currency_and_amount(make_router):
    """A channel outside its currency or amount limits is skipped."""
    cny_small, anything = ScriptedChannel("cny_small"), ScriptedChannel("anything")
    config = fast(cny_small={"limits": {"currencies": ["CNY"], "max_amount": "100.00"}})
    router = await make_router([cny_small, anything], config)

    small = await router.repay(repayment(key="a", amount="99.00"))
    large = await router.repay(repayment(key="b", amount="101.00"))
    usd = await router.repay(repayment(key="c", amount="1.00", currency="USD"))

    assert ("cny_small", "anything", "anything") == (small.channel, large.channel, usd.channel)


async def test_reconfigure_keeps_breaker_state(make_router):
    """reconfigure() swaps priorities and keeps the breakers' state."""
    a = ScriptedChannel("a", [failover.ChannelResult.unavailable()])
    b = ScriptedChannel("b")
    router = await make_router([a, b], fast(a={"retry": {"max_attempts": 1},
                                                "breaker": {"fail_max": 1}}))
    await router.repay(repayment(key="trip"))

    router.reconfigure(fast(b={"priority": 1}, a={"priority": 2}))

    assert ("b", "a") == router.channel_names
    assert "open" == router.breaker("a").state
