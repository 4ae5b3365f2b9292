"""Account numbers protected at rest: a codec the journal applies to ``account``.

A journal given ``codec=`` encodes each repayment's account before it is written and
decodes it when it is read back, so the SQLite file or the PostgreSQL table never holds
an account number; it exists in the process only, where a channel is called with it.

``FernetCodec`` (``pip install 'failover[crypto]'``) encrypts with Fernet (AES-128-CBC
with HMAC-SHA256, from ``cryptography``) under keys from the environment::

    export FAILOVER_ACCOUNT_KEYS="$(python -c 'from failover.codec import FernetCodec;
    print(FernetCodec.generate_key())')"

    journal = SQLiteJournal("repayments.db", codec=FernetCodec.from_env())

**Key rotation.** ``FAILOVER_ACCOUNT_KEYS`` is a comma-separated list: the first key
encrypts, every key decrypts.  To rotate, put a new key first and keep the old ones
after it; restart the service; accounts written from then on use the new key.  An old
key may be dropped once every repayment encrypted with it has ended and its account
was erased (``failover purge --before DATE``); nothing re-encrypts the rows already
written (``rotate(stored)`` re-encrypts one value, for a migration of one's own).  A
stored account no key can decrypt is a ``JournalError`` naming the repayment, never a
silent wrong value.

A stored value without the codec's prefix (written before the codec was turned on, or
erased by ``purge``) is read back as it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from failover._errors import ConfigError, JournalError

PURGED = "<purged>"
"""What ``purge`` leaves in place of an erased account."""

KEYS_VARIABLE = "FAILOVER_ACCOUNT_KEYS"


def account_usable(stored: str) -> bool:
    """Whether an account read back can be sent to a channel: not erased by ``purge``,
    not still encrypted (a journal opened without its codec)."""
    return stored != PURGED and not stored.startswith(FernetCodec.PREFIX)


@runtime_checkable
class AccountCodec(Protocol):
    """Turns an account into what the journal stores, and back."""

    def encode(self, account: str) -> str: ...

    def decode(self, stored: str) -> str: ...


class FernetCodec:
    """Fernet encryption of accounts, with key rotation (``MultiFernet``)."""

    PREFIX = "fernet:"

    def __init__(self, keys: str | bytes | Sequence[str | bytes]) -> None:
        try:
            from cryptography.fernet import Fernet, MultiFernet
        except ImportError as exc:  # pragma: no cover - the crypto extra is missing
            raise ConfigError("FernetCodec needs cryptography: pip install"
                              " 'failover[crypto]'") from exc
        if isinstance(keys, str | bytes):
            keys = [keys]
        if not keys:
            raise ConfigError(f"{KEYS_VARIABLE}: no key given")
        fernets = []
        for position, key in enumerate(keys, 1):
            try:
                fernets.append(Fernet(key))
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{KEYS_VARIABLE}: key {position} is not a Fernet key"
                                  " (32 url-safe base64-encoded bytes)") from exc
        self._fernet = MultiFernet(fernets)

    @classmethod
    def from_env(cls, variable: str = KEYS_VARIABLE,
                 environ: Any = None) -> FernetCodec:
        """Keys from ``variable`` (comma-separated, the first one encrypts)."""
        value = (os.environ if environ is None else environ).get(variable, "")
        keys = [k.strip() for k in value.split(",") if k.strip()]
        if not keys:
            raise ConfigError(f"{variable} is not set: give it one or more Fernet keys"
                              " (FernetCodec.generate_key())")
        return cls(keys)

    @staticmethod
    def generate_key() -> str:
        from cryptography.fernet import Fernet

        return Fernet.generate_key().decode()

    def encode(self, account: str) -> str:
        return self.PREFIX + self._fernet.encrypt(account.encode()).decode()

    def decode(self, stored: str) -> str:
        if not stored.startswith(self.PREFIX):
            return stored  # written before the codec, or erased
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(stored[len(self.PREFIX):].encode()).decode()
        except InvalidToken:
            raise JournalError(
                f"an account cannot be decrypted: the key that encrypted it is not in"
                f" {KEYS_VARIABLE}") from None

    def rotate(self, stored: str) -> str:
        """``stored`` encrypted again under the first key (already encrypted values
        only; others are returned as they are)."""
        if not stored.startswith(self.PREFIX):
            return stored
        return self.PREFIX + self._fernet.rotate(stored[len(self.PREFIX):].encode()).decode()
