"""Every exception ``failover`` raises, in one tree.

::

    FailoverError
     ├── IdempotencyConflict      same key, different account / amount / currency
     ├── UnknownRepayment         get/retry of a key the journal does not hold
     ├── ChannelUnavailable       raised by an adapter: the channel certainly did not collect
     ├── ConfigError              bad configuration, unknown channel name
     ├── JournalError             the journal cannot be used
     │    ├── SchemaVersionError  the journal was written by a newer version
     │    ├── TerminalStateError  an attempt to change a finished repayment
     │    └── OwnershipLost       another instance took the repayment over (shared journals)
     ├── RouterClosedError        the router is not open
     └── ReentrantCallError       a BlockingRouter called from its own event loop

Errors carry context (``key``, ``channel``) as attributes so a service can
log or map them without parsing messages.  Errors from providers (sqlite3,
adapters) are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class FailoverError(Exception):
    """Base class of every error raised by ``failover``."""


class IdempotencyConflict(FailoverError):
    """A repayment key was reused with a different account, amount or currency."""

    def __init__(self, key: str, field: str, stored: object, given: object) -> None:
        self.key = key
        self.field = field
        self.stored = stored
        self.given = given
        super().__init__(
            f"repayment {key!r} already exists with a different {field}: "
            f"stored {stored!r}, given {given!r}"
        )


class UnknownRepayment(FailoverError):
    """The journal holds no repayment with this key."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"no repayment with key {key!r}")


class UnknownReference(FailoverError, LookupError):
    """A provider's callback names a reference no repayment sent to that channel."""

    def __init__(self, channel: str, reference: str) -> None:
        self.channel = channel
        self.reference = reference
        super().__init__(f"no repayment sent reference {reference!r} to channel {channel!r}")


class CallbackRejected(FailoverError, ValueError):
    """A provider's webhook was refused: a bad signature, or a body the adapter cannot
    read.  Nothing was changed."""

    def __init__(self, channel: str, reason: str) -> None:
        self.channel = channel
        self.reason = reason
        super().__init__(f"callback for channel {channel!r} rejected: {reason}")


class ChannelUnavailable(FailoverError):
    """Raised by an adapter when the channel certainly did not collect.

    The router records the call as ``Outcome.UNAVAILABLE``: the breaker counts
    a failure, the same channel may be retried and then the next one is tried.
    """

    def __init__(self, code: str = "unavailable", detail: str | None = None) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)


class ConfigError(FailoverError):
    """The configuration is invalid, or names a channel the router does not know."""


class JournalError(FailoverError):
    """The journal cannot be opened, read or written."""


class SchemaVersionError(JournalError):
    """The journal file was written by a newer schema than this version understands."""

    def __init__(self, path: str, found: int, supported: int) -> None:
        self.path = path
        self.found = found
        self.supported = supported
        super().__init__(
            f"journal {path!r} has schema version {found}, newer than the {supported} "
            "this version of failover supports; upgrade failover to open it"
        )


class TerminalStateError(JournalError):
    """A finished repayment was asked to change; terminal states are immutable."""

    def __init__(self, key: str, status: str) -> None:
        self.key = key
        self.status = status
        super().__init__(f"repayment {key!r} is already {status} and cannot change")


class OwnershipLost(JournalError):
    """A write for a repayment was refused because another instance now owns it (its
    lease expired and was taken over, with a newer fencing token).  The instance that
    gets this stops touching the repayment; the router turns it into the new owner's
    result, so callers see it only from the journal API."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"repayment {key!r} is now owned by another instance")


class RouterClosedError(FailoverError):
    """The router was used outside ``async with router`` (or after it closed)."""


class ReentrantCallError(FailoverError, RuntimeError):
    """A ``BlockingRouter`` method was called from the router's own event loop (an async
    adapter or a hook running there): it would wait on the loop it blocks."""
