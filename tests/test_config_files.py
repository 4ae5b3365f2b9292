"""Configuration files: every bad file gets one clear line; env overrides; from_config."""

from __future__ import annotations

from pathlib import Path

import pytest

import failover
from failover import ConfigError, RouterConfig
from failover.cli import main

BAD = sorted((Path(__file__).parent / "configs" / "bad").iterdir())
EXAMPLES = Path(__file__).parent.parent / "examples"


def expected_error(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{path.name} must start with '# error: ...'"
    return first.removeprefix("# error: ")


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_every_bad_file_gets_one_line_naming_file_key_and_value(path, capsys):
    """failover validate: exit 2, one line on stderr with the file and the problem, no traceback."""
    code = main(["validate", str(path)])

    err = capsys.readouterr().err
    assert 2 == code
    assert 1 == len(err.strip().splitlines()), err
    assert str(path) in err
    assert expected_error(path) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["failover.toml", "failover.yaml"])
def test_examples_validate(name, capsys):
    """The example files validate and list their three channels in priority order."""
    code = main(["validate", str(EXAMPLES / name), "--json"])

    import json
    data = json.loads(capsys.readouterr().out)
    assert 0 == code
    assert ["auto_debit", "bank_card", "wallet"] == [c["channel"] for c in data["channels"]]


def test_toml_and_yaml_examples_are_the_same_config():
    """examples/failover.toml and examples/failover.yaml mirror each other."""
    assert RouterConfig.load(EXAMPLES / "failover.toml", environ={}) == RouterConfig.load(
        EXAMPLES / "failover.yaml", environ={})


def test_environment_overrides_single_values(tmp_path):
    """FAILOVER_CHANNELS__AUTO_DEBIT__ENABLED=false turns one value off, the rest stays."""
    environ = {"FAILOVER_CHANNELS__AUTO_DEBIT__ENABLED": "false",
               "FAILOVER_CHANNELS__BANK_CARD__TIMEOUT_S": "2.5",
               "FAILOVER_DEADLINE_S": "12"}

    config = RouterConfig.load(EXAMPLES / "failover.toml", environ=environ)

    assert (False, 2.5, 12.0) == (config.channels["auto_debit"].enabled,
                                  config.channels["bank_card"].timeout_s, config.deadline_s)
    assert 1 == config.channels["auto_debit"].priority


def test_bad_environment_override_names_its_source(tmp_path):
    """A bad override is reported like a bad file value, saying it came from the environment."""
    with pytest.raises(ConfigError) as caught:
        RouterConfig.load(EXAMPLES / "failover.toml",
                          environ={"FAILOVER_CHANNELS__WALLET__TIMEOUT_S": "-3"})

    assert "environment" in str(caught.value)
    assert "channels.wallet.timeout_s" in str(caught.value)


def test_from_config_builds_adapters_named_by_the_file(tmp_path):
    """Router.from_config builds each channel from adapter + options, named by its key."""
    router = failover.Router.from_config(EXAMPLES / "failover.toml",
                                         journal=failover.MemoryJournal())

    assert ("auto_debit", "bank_card", "wallet") == router.channel_names
    assert (False, True) == (router.breaker("auto_debit") is None,
                             router._channels.layout.lanes["bank_card"].idempotent)


def test_from_config_refuses_a_bad_file_before_starting(tmp_path):
    """A bad file raises ConfigError from from_config; no router, no journal file."""
    journal_path = tmp_path / "j.db"
    with pytest.raises(ConfigError, match="cannot import"):
        failover.Router.from_config(BAD[0].parent / "adapter_not_importable.toml",
                                    journal=failover.SQLiteJournal(journal_path))

    assert not journal_path.exists()
