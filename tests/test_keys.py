"""Repayment keys (and accounts) are stored and compared exactly as given."""

from __future__ import annotations

import pydantic
import pytest

from failover import RepaymentStatus
from failover.testing import SimulatedChannel

from .conftest import repayment

CONTROL_CHARACTERS = ["\n", "\r", "\t", "\x00", "\x1f", "\x7f", "\x85"]


def test_key_is_kept_exactly_as_given():
    """Surrounding whitespace is part of the key."""
    assert " k1 " == repayment(key=" k1 ").key


def test_account_is_kept_exactly_as_given():
    """Surrounding whitespace is part of the account: the channel receives it as given."""
    assert " 6222 0212 " == repayment(account=" 6222 0212 ").account


def test_metadata_strings_are_kept_exactly_as_given():
    """Metadata values are not stripped either."""
    assert {"note": " late "} == repayment(metadata={"note": " late "}).metadata


def test_currency_is_still_normalized():
    """A currency code is a code, not an identifier: case and padding do not matter."""
    assert "CNY" == repayment(currency=" cny ").currency


@pytest.mark.parametrize("key", ["", " ", "\u3000 "], ids=["empty", "space", "blank"])
def test_an_empty_or_blank_key_is_rejected(key):
    """A key of nothing but whitespace is almost surely a missing value: refused."""
    with pytest.raises(pydantic.ValidationError) as caught:
        repayment(key=key)

    assert [("key",)] == [e["loc"] for e in caught.value.errors()]


def test_a_key_of_200_characters_is_accepted():
    """200 characters is the longest key."""
    assert 200 == len(repayment(key="k" * 200).key)


def test_a_key_over_200_characters_is_rejected():
    """A key of 201 characters raises ValidationError naming the key."""
    with pytest.raises(pydantic.ValidationError) as caught:
        repayment(key="k" * 201)

    assert [("key",)] == [e["loc"] for e in caught.value.errors()]


@pytest.mark.parametrize("char", CONTROL_CHARACTERS, ids=repr)
def test_a_key_with_a_control_character_is_rejected(char):
    """Any Unicode control character (category Cc) in a key raises ValidationError."""
    with pytest.raises(pydantic.ValidationError) as caught:
        repayment(key=f"loan-42{char}7")

    assert [("key",)] == [e["loc"] for e in caught.value.errors()]


def test_the_control_character_error_says_what_and_where():
    """The message names the character and its position."""
    with pytest.raises(pydantic.ValidationError) as caught:
        repayment(key="loan-42\n7")

    assert ["Value error, key must not contain control characters (found '\\n' at "
            "position 7)"] == [e["msg"] for e in caught.value.errors()]


def test_a_key_with_a_lone_surrogate_is_rejected():
    """A key that cannot be encoded as UTF-8 (and so journaled) raises ValidationError."""
    with pytest.raises(pydantic.ValidationError) as caught:
        repayment(key="loan-\ud800")

    assert [("key",)] == [e["loc"] for e in caught.value.errors()]


@pytest.mark.parametrize("char", CONTROL_CHARACTERS, ids=repr)
def test_an_account_with_a_control_character_is_rejected(char):
    """Any Unicode control character in an account raises ValidationError naming it."""
    with pytest.raises(pydantic.ValidationError) as caught:
        repayment(account=f"6222{char}0212")

    assert [("account",)] == [e["loc"] for e in caught.value.errors()]


def test_a_blank_account_is_rejected():
    """An account of nothing but whitespace raises ValidationError naming it."""
    with pytest.raises(pydantic.ValidationError) as caught:
        repayment(account="   ")

    assert [("account",)] == [e["loc"] for e in caught.value.errors()]


async def test_get_finds_a_padded_key_by_exactly_that_key(make_router, clock):
    """repay(" k1 ") is found by get(" k1 "), collected once."""
    card = SimulatedChannel("card", clock=clock)
    router = await make_router([card])

    await router.repay(repayment(key=" k1 "))
    found = await router.get(" k1 ")

    assert (" k1 ", RepaymentStatus.SUCCEEDED, 1) == (
        found.key, found.status, len(card.ledger.collections()))


async def test_get_does_not_find_a_padded_key_by_its_stripped_form(make_router, clock):
    """After repay(" k1 "), get("k1") returns None."""
    router = await make_router([SimulatedChannel("card", clock=clock)])

    await router.repay(repayment(key=" k1 "))

    assert None is await router.get("k1")


async def test_keys_differing_only_in_whitespace_are_two_repayments(make_router, clock):
    """"k1" and " k1 " are different keys: each is collected, once."""
    card = SimulatedChannel("card", clock=clock)
    router = await make_router([card])

    results = [await router.repay(repayment(key=key)) for key in ("k1", " k1 ")]

    assert (["k1", " k1 "], ["k1", " k1 "]) == (
        [r.key for r in results], [c.repayment_key for c in card.ledger.collections()])
