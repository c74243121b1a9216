"""The database health probes the throttles read: replica lag, vacuums on the target table, long transactions,
lock waiters and the user's own check.

Probes run on the runner's own connection between batches, each in a short transaction of its own with tight
timeouts, never inside a batch's transaction (a probe must not extend how long a batch holds its row locks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import sql as pgsql
from psycopg.rows import RowFactory, class_row, tuple_row

from backfill.pg import statements as sql
from backfill.policies import LagReading, TransactionReading, VacuumReading

__all__ = ["PostgresHealth"]

log = structlog.get_logger("backfill")

_Row = TypeVar("_Row")

#: A probe that cannot get its answer within these gives up (the throttle then logs it and the batch goes on).
_PROBE_LOCK_TIMEOUT = "1s"
_PROBE_STATEMENT_TIMEOUT = "5s"


class PostgresHealth:
    """Health probes for one target table, over a connection the caller owns.

    Args:
        connection: returns the connection to probe on (the store's: it reconnects after a failure).
        schema, table: the target table (vacuum and lock probes look at it, its partitions and TOAST tables).
    """

    def __init__(self, connection: Callable[[], psycopg.Connection[Any]], schema: str, table: str) -> None:
        self.connection = connection
        self.schema, self.table = schema, table
        self._oid: int | None = None
        self._privileges_checked = False

    def _read(
        self,
        factory: RowFactory[_Row],
        statement: pgsql.SQL | pgsql.Composed,
        params: Sequence[Any] | Mapping[str, Any] = (),
        *,
        read_only: bool = False,
    ) -> list[_Row]:
        conn = self.connection()
        if not self._privileges_checked:
            self._privileges_checked = True
            with conn.transaction():
                row = conn.execute(sql.HEALTH_CAN_READ_STATS).fetchone()
            if not (row and row[0]):
                log.warning(
                    "health_checks_limited",
                    detail="the runner's role cannot read other sessions' statistics, so replica lag, "
                    "vacuums and long transactions look healthy: GRANT pg_monitor to it",
                )
        # Pipelined into one implicit transaction (as the store's batch), the probe's settings and query cost one
        # round trip instead of four (BEGIN, settings, query, COMMIT sent one at a time): across a network, that
        # had probes taking more of a run's time than its batches. Not prepared, as in the batch: a statement left
        # unparsed by a failing pipeline would stay in psycopg's cache of prepared statements.
        with conn.pipeline():
            conn.execute(sql.PROBE_SETTINGS, (_PROBE_LOCK_TIMEOUT, _PROBE_STATEMENT_TIMEOUT, read_only), prepare=False)
            cursor = conn.cursor(row_factory=factory).execute(statement, params, prepare=False)
        return cursor.fetchall()

    def _rows(
        self,
        statement: pgsql.SQL | pgsql.Composed,
        params: Sequence[Any] | Mapping[str, Any] = (),
        *,
        read_only: bool = False,
    ) -> list[tuple[Any, ...]]:
        return self._read(tuple_row, statement, params, read_only=read_only)

    def _table_oid(self) -> int | None:
        if self._oid is None:
            rows = self._rows(sql.HEALTH_TABLE_OID, (self.schema, self.table))
            self._oid = rows[0][0] if rows else None
        return self._oid

    def replica_lag(self) -> LagReading:
        """The largest replay lag among the replicas streaming from this server (``pg_stat_replication``)."""
        return self._read(class_row(LagReading), sql.REPLICA_LAG)[0]

    def vacuums(self) -> list[VacuumReading]:
        """Vacuums at work on the table, its partitions or their TOAST tables (``pg_stat_progress_vacuum``)."""
        return self._read(class_row(VacuumReading), sql.VACUUMS, {"oid": self._table_oid()})

    def custom_check(self, query: str) -> bool:
        """Whether the user's query returns true (first column of the first row; no row or NULL is false)."""
        # A probe only reads: a query that writes (an UPDATE ... RETURNING, a function with side effects) fails.
        rows = self._rows(sql.custom_check(query), read_only=True)
        return bool(rows and rows[0] and rows[0][0])

    def oldest_transaction(self) -> TransactionReading | None:
        """The oldest transaction of another session of this database that holds back the xmin horizon."""
        rows = self._read(class_row(TransactionReading), sql.OLDEST_TRANSACTION)
        return rows[0] if rows else None

    def lock_waiters(self) -> int:
        """How many sessions wait for a lock on the table."""
        return int(self._rows(sql.LOCK_WAITERS, (self._table_oid(),))[0][0])
