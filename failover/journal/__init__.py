"""Journals: the durable record of every repayment and attempt."""

from __future__ import annotations

from pathlib import Path

from failover.journal._base import (
    Failover,
    Journal,
    JournalStats,
    Record,
    Resolution,
    SingleOwner,
)
from failover.journal._memory import MemoryJournal
from failover.journal._postgres import SCHEMA_VERSION as PG_SCHEMA_VERSION
from failover.journal._postgres import PostgresJournal, is_dsn, mask_dsn
from failover.journal._sqlite import SCHEMA_VERSION, SQLiteJournal

__all__ = [
    "PG_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "Failover",
    "Journal",
    "JournalStats",
    "MemoryJournal",
    "PostgresJournal",
    "Record",
    "Resolution",
    "SQLiteJournal",
    "SingleOwner",
    "is_dsn",
    "mask_dsn",
    "open_journal",
]


def open_journal(target: str | Path, *, read_only: bool = False, migrate: bool = False,
                 schema: str = "failover", **options: object) -> Journal:
    """The journal ``target`` names: a ``postgresql://`` (or ``postgres://``) URL gives a
    ``PostgresJournal`` (``migrate`` applies its migrations on open), anything else is
    an SQLite journal file.  Not opened yet: ``await journal.open()``."""
    if is_dsn(target):
        return PostgresJournal(str(target), read_only=read_only, migrate=migrate,
                               schema=schema, **options)  # type: ignore[arg-type]
    return SQLiteJournal(target, read_only=read_only,
                         codec=options.get("codec"))  # type: ignore[arg-type]
