"""failover: collect loan repayments through several channels, failing over
safely: no accepted repayment lost, none collected twice."""

from failover._blocking import BlockingRouter
from failover._channel import Channel
from failover._clock import Clock, SystemClock
from failover._errors import (
    ChannelUnavailable,
    ConfigError,
    FailoverError,
    IdempotencyConflict,
    JournalError,
    RouterClosedError,
    SchemaVersionError,
    TerminalStateError,
    UnknownRepayment,
)
from failover._models import (
    Attempt,
    ChannelRequest,
    ChannelResult,
    Outcome,
    PendingReason,
    Repayment,
    RepaymentResult,
    RepaymentStatus,
)
from failover._router import Router, make_reference
from failover.config import (
    BreakerConfig,
    ChannelConfig,
    LimitsConfig,
    MaintenanceWindow,
    RetryBudgetConfig,
    RetryConfig,
    RouterConfig,
)
from failover.journal import Journal, MemoryJournal, SQLiteJournal

__version__ = "0.1.0"

__all__ = [
    "Attempt",
    "BlockingRouter",
    "BreakerConfig",
    "Channel",
    "ChannelConfig",
    "ChannelRequest",
    "ChannelResult",
    "ChannelUnavailable",
    "Clock",
    "ConfigError",
    "FailoverError",
    "IdempotencyConflict",
    "Journal",
    "JournalError",
    "LimitsConfig",
    "MaintenanceWindow",
    "MemoryJournal",
    "Outcome",
    "PendingReason",
    "Repayment",
    "RepaymentResult",
    "RepaymentStatus",
    "RetryBudgetConfig",
    "RetryConfig",
    "Router",
    "RouterClosedError",
    "RouterConfig",
    "SQLiteJournal",
    "SchemaVersionError",
    "SystemClock",
    "TerminalStateError",
    "UnknownRepayment",
    "make_reference",
]
