"""failover: collect loan repayments through several channels, failing over
safely: no accepted repayment lost, none collected twice."""

from failover._blocking import BlockingRouter
from failover._channel import Channel
from failover._clock import Clock, SystemClock
from failover._eligibility import Eligibility
from failover._errors import (
    ChannelUnavailable,
    ConfigError,
    FailoverError,
    IdempotencyConflict,
    JournalError,
    OwnershipLost,
    ReentrantCallError,
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
from failover._policy import Breaker, Permit
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
from failover.journal import (
    Failover,
    Journal,
    JournalStats,
    MemoryJournal,
    PostgresJournal,
    Record,
    Resolution,
    SQLiteJournal,
    open_journal,
)

__version__ = "0.1.0"

__all__ = [
    "Attempt",
    "BlockingRouter",
    "Breaker",
    "BreakerConfig",
    "Channel",
    "ChannelConfig",
    "ChannelRequest",
    "ChannelResult",
    "ChannelUnavailable",
    "Clock",
    "ConfigError",
    "Eligibility",
    "Failover",
    "FailoverError",
    "IdempotencyConflict",
    "Journal",
    "JournalError",
    "JournalStats",
    "LimitsConfig",
    "MaintenanceWindow",
    "MemoryJournal",
    "Outcome",
    "OwnershipLost",
    "PendingReason",
    "Permit",
    "PostgresJournal",
    "Record",
    "ReentrantCallError",
    "Repayment",
    "RepaymentResult",
    "RepaymentStatus",
    "Resolution",
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
    "open_journal",
]
