"""The ledger's database: SQLite (a file in ``STATE/``) or PostgreSQL (a ``postgresql://`` URL).

The ledger's SQL is written once, in the dialect both engines share (``?`` placeholders,
``INSERT … ON CONFLICT``, ``RETURNING``, rows read by column name); what differs lives here
alone: placeholders, column types (identity, 64-bit integers, doubles, bytea), how a write
transaction begins (SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``SERIALIZABLE``, retried on a
serialisation failure), how a table's columns are listed, the lock that serialises
migrations, ``FOR UPDATE SKIP LOCKED``, how an identity continues past ids given (an
import), the database's clock (one clock for the leases of nodes on several machines), and
which errors mean a lost connection.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import errors as pg_errors

from service.config import mask_url

logger = logging.getLogger(__name__)

__all__ = [
    "DRIVER_ERRORS",
    "Cursor",
    "Database",
    "PostgresDatabase",
    "Row",
    "SqliteDatabase",
    "open_database",
]


class Row(Protocol):
    """A row readable by position and by column name (``sqlite3.Row`` or :class:`PgRow`)."""

    def __getitem__(self, key: int | str, /) -> Any: ...
    def keys(self) -> list[str]: ...
    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Database(Protocol):
    """One connection to the ledger's database; the :class:`~service.ledger.Ledger`
    serialises its use."""

    #: what to name in a message: the file, or the URL with its password masked
    description: str
    #: the errors of this engine's driver (all of them mean: cannot read or write now)
    errors: tuple[type[BaseException], ...]
    #: the errors that mean the database cannot be reached or used now (not a bug)
    operational: tuple[type[BaseException], ...]
    #: the IntegrityError of this engine's driver (a UNIQUE constraint refused a row)
    integrity_error: type[BaseException]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...
    def begin(self, serializable: bool = True) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def retryable(self, exc: BaseException) -> bool: ...
    def columns(self, table: str) -> set[str]: ...
    def ddl(self, sql: str) -> str: ...
    def lock_for_migration(self) -> None: ...
    def skip_locked(self, alias: str) -> str: ...
    def advance_identity(self, table: str, column: str) -> None: ...
    def clock(self) -> float: ...
    def close(self) -> None: ...


class SqliteDatabase:
    """The embedded default: one file, WAL, fsync'd commits, writers serialised by SQLite."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    operational: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
    integrity_error: type[BaseException] = sqlite3.IntegrityError

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.description = str(path)
        if readonly:
            self._db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                check_same_thread=False,
                isolation_level=None,
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        if not readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def begin(self, serializable: bool = True) -> None:
        self._db.execute("BEGIN IMMEDIATE")  # one writer at a time: serializable as it is

    def commit(self) -> None:
        self._db.execute("COMMIT")

    def rollback(self) -> None:
        self._db.execute("ROLLBACK")

    def retryable(self, exc: BaseException) -> bool:
        return False  # BEGIN IMMEDIATE waits (busy_timeout) instead of failing late

    def columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def ddl(self, sql: str) -> str:
        return sql

    def lock_for_migration(self) -> None:
        pass  # BEGIN IMMEDIATE already holds the only write lock

    def skip_locked(self, alias: str) -> str:
        return ""  # a write transaction holds the whole database: nothing else holds a row

    def advance_identity(self, table: str, column: str) -> None:
        pass  # AUTOINCREMENT already counts from the largest id ever inserted, given or not

    def clock(self) -> float:
        return float(
            self._db.execute("SELECT (julianday('now') - 2440587.5) * 86400.0").fetchone()[0]
        )

    def close(self) -> None:
        self._db.close()


class PgRow(tuple[Any, ...]):
    """A PostgreSQL row readable like ``sqlite3.Row``: by position or by column name."""

    _names: tuple[str, ...]

    def __new__(cls, values: Sequence[Any], names: tuple[str, ...]) -> PgRow:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                key = self._names.index(key)
            except ValueError:
                raise IndexError(f"no column {key}") from None
        return super().__getitem__(key)

    def keys(self) -> list[str]:
        return list(self._names)


def _pg_rows(cursor: Any) -> Any:
    names = tuple(c.name for c in cursor.description or ())

    def make(values: Sequence[Any]) -> PgRow:
        return PgRow(values, names)

    return make


#: SQLite column definitions and their PostgreSQL equivalents (SQLite's INTEGER and REAL are
#: 64 bits; PostgreSQL's are 32: sizes, nanosecond times and epoch seconds need the wider).
_PG_TYPES = (
    (
        re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)
#: a fixed key for the advisory lock that serialises migrations between nodes
_MIGRATION_LOCK = 0x6C6564676572  # "ledger"
#: SQLSTATEs after which a transaction may simply run again
_RETRYABLE = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)


class PostgresDatabase:
    """PostgreSQL: one connection in autocommit for reads, SERIALIZABLE write transactions.

    A connection the server dropped (a restart, a network cut) fails the call that found
    it (the ledger raises LedgerUnavailable); the next call opens a new one."""

    errors: tuple[type[BaseException], ...] = (psycopg.Error,)
    operational: tuple[type[BaseException], ...] = (psycopg.OperationalError,)
    integrity_error: type[BaseException] = psycopg.IntegrityError

    def __init__(self, url: str, readonly: bool = False) -> None:
        self.url = url
        self.description = mask_url(url)
        self._readonly = readonly
        self._db: psycopg.Connection[Any] | None = None
        self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        if self._db is not None and not self._db.closed and not self._db.broken:
            return self._db
        if self._db is not None:
            logger.warning("ledger: reconnecting to %s", self.description)
            self._db.close()
            self._db = None
        options = "-c default_transaction_read_only=on" if self._readonly else ""
        self._db = psycopg.connect(
            self.url,
            autocommit=True,
            row_factory=_pg_rows,
            connect_timeout=10,
            options=options,
            application_name="gateway",
        )
        return self._db

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    @staticmethod
    def _params(params: Sequence[Any]) -> list[Any]:
        """PostgreSQL text cannot hold NUL (SQLite's can): written as ``\\x00``, the way
        :func:`~service.ledger.printable` writes what UTF-8 cannot hold."""
        return [p.replace("\x00", "\\x00") if isinstance(p, str) else p for p in params]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self._connect().execute(self._sql(sql), self._params(params))  # type: ignore[arg-type]

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._connect().cursor().executemany(
                self._sql(sql),  # type: ignore[arg-type]
                [self._params(row) for row in rows],
            )

    def begin(self, serializable: bool = True) -> None:
        level = "SERIALIZABLE" if serializable else "READ COMMITTED"
        self._connect().execute(f"BEGIN ISOLATION LEVEL {level}")

    def commit(self) -> None:
        self._connect().execute("COMMIT")

    def rollback(self) -> None:
        if self._db is not None and not self._db.closed and not self._db.broken:
            self._db.execute("ROLLBACK")

    def retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, _RETRYABLE)

    def columns(self, table: str) -> set[str]:
        rows = self.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        )
        return {r[0] for r in rows}

    def ddl(self, sql: str) -> str:
        for pattern, replacement in _PG_TYPES:
            sql = pattern.sub(replacement, sql)
        return sql

    def lock_for_migration(self) -> None:
        self.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))

    def skip_locked(self, alias: str) -> str:
        return f" FOR UPDATE OF {alias} SKIP LOCKED"

    def advance_identity(self, table: str, column: str) -> None:
        """After rows were inserted with their ids given (an import): the identity
        continues past the largest (ids given do not advance it)."""
        self.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"
            f" COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)"
        )

    def clock(self) -> float:
        row = self.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8").fetchone()
        return float(row[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


#: every error either driver raises
DRIVER_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, psycopg.Error)


def is_url(location: Path | str) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_database(location: Path | str, readonly: bool = False) -> Database:
    """The database at ``location``: a ``postgresql://`` URL, or else an SQLite file."""
    if is_url(location):
        return PostgresDatabase(str(location), readonly)
    return SqliteDatabase(Path(location), readonly)
