"""Journals: the durable record of every repayment and attempt."""

from failover.journal._base import Failover, Journal, JournalStats, Record, Resolution
from failover.journal._memory import MemoryJournal
from failover.journal._sqlite import SCHEMA_VERSION, SQLiteJournal

__all__ = [
    "SCHEMA_VERSION",
    "Failover",
    "Journal",
    "JournalStats",
    "MemoryJournal",
    "Record",
    "Resolution",
    "SQLiteJournal",
]
