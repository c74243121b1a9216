"""What a backfill is: a named, serialisable description of the change, stored whole in the control table.

A spec carries no connection and no code, so any later process (the CLI, a cron job, another machine) can resume a
backfill that an Alembic migration started, from the control table alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from backfill.errors import SpecError

__all__ = ["BackfillSpec", "DEFAULT_BATCH_SIZE", "MAX_BATCH_SIZE", "REVERT_SUFFIX", "split_table"]

#: Where batches start when the spec leaves ``batch_size`` open (they then adapt to a target duration).
DEFAULT_BATCH_SIZE = 10_000

#: The largest batch size accepted anywhere: a billion rows of key range in one transaction is never a batch, and
#: the look-ahead's OFFSET and the stored counters stay far from the limits of bigint.
MAX_BATCH_SIZE = 1_000_000_000

_MAX_NAME = 200

#: A revert is a backfill of its own, named after the one it reverts with this suffix.
REVERT_SUFFIX = ":revert"


def split_table(table: str, schema: str | None = None) -> tuple[str | None, str]:
    """``(schema, table)`` from a table name that may be schema-qualified (``"app.events"``). A ``schema`` given
    apart wins, and the name is then taken whole."""
    if schema is None and "." in table:
        schema, table = table.split(".", 1)
    return schema, table


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{what} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class BackfillSpec:
    """A backfill: set ``values`` on every row of ``table`` matching ``where``, walking ``key`` in batches.

    Args:
        name: unique name of the backfill; the control table's handle on it.
        table: the target table, optionally schema-qualified (``"app.events"``).
        values: column name -> SQL expression evaluated per row (e.g. ``{"total": "price * qty"}``).
            Expressions are SQL written by the migration's author and run as they are.
        where: optional SQL filter; rows not matching it are skipped (their key range is still walked).
        key: columns to walk, in order; defaults to the primary key. Needs a btree index leading with them.
        batch_size: key range per batch, counted in rows of the table. Left open (None), batches start at
            :data:`DEFAULT_BATCH_SIZE` and adapt to a target duration; a number pins every batch to that size.
        schema: the table's schema; defaults to the one in ``table`` or the search path.
        keep_in_sync: before the run fixes its key range, install a ``BEFORE INSERT OR UPDATE`` row trigger that
            applies ``values`` to every row the application writes where ``where`` holds and the application left
            the column empty (see :mod:`backfill.schema.sync` for the exact rule): code that does not know the
            new column keeps working through the rest of a rolling deploy. The trigger stays until
            ``drop_backfill_trigger`` (or the backfill is deleted).
        skip_unchanged: update only rows whose stored values differ from the expressions' results (compared in
            their text form, ``IS DISTINCT FROM``), so a re-run over rows that already hold their values writes
            nothing: no WAL, no dead rows, no replica lag, and no UPDATE trigger fires for them. Each expression
            is then evaluated twice per row (once to compare, once to set): set it False for expressions that
            must be applied to every row regardless, or that are volatile or have side effects (``nextval``,
            ``random()``, ``clock_timestamp()``, a function that writes).
        reversible: keep what each batch overwrites in an undo log (a table in the control schema whose columns
            have the target's types), written by the batch's own statement, so ``revert_backfill`` can put every
            row back exactly, and leave alone the rows the application changed after the backfill wrote them.
        reverts: set by ``revert_backfill`` only: this backfill walks the undo log ``(schema, table)`` back.

    Raises:
        SpecError: a field is malformed.
    """

    name: str
    table: str
    values: Mapping[str, str]
    where: str | None = None
    key: tuple[str, ...] | None = None
    batch_size: int | None = None
    schema: str | None = None
    keep_in_sync: bool = False
    skip_unchanged: bool = True
    reversible: bool = False
    reverts: tuple[str, str] | None = None
    _frozen_values: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name = _text(self.name, "backfill name")
        if len(name) > _MAX_NAME + (len(REVERT_SUFFIX) if self.reverts is not None else 0):
            raise SpecError(f"backfill name is longer than {_MAX_NAME} characters")
        schema, table = split_table(_text(self.table, "table"), self.schema)
        if schema is not None:
            _text(schema, "schema")
        if not isinstance(self.values, Mapping) or not self.values:
            raise SpecError("values must map at least one column to an SQL expression")
        values = {_text(c, "column name"): _text(e, f"expression for column {c!r}") for c, e in self.values.items()}
        key = self.key
        if key is not None:
            key = (key,) if isinstance(key, str) else tuple(key)
            if not key:
                raise SpecError("key must name at least one column")
            for column in key:
                _text(column, "key column")
            if len(set(key)) != len(key):
                raise SpecError(f"key names a column twice: {', '.join(key)}")
        if self.where is not None:
            _text(self.where, "where")
        size = self.batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise SpecError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if size is not None and size > MAX_BATCH_SIZE:
            raise SpecError(f"batch_size must be at most {MAX_BATCH_SIZE:,}, got {size:,}")
        if not isinstance(self.keep_in_sync, bool):
            raise SpecError(f"keep_in_sync must be True or False, got {self.keep_in_sync!r}")
        if not isinstance(self.skip_unchanged, bool):
            raise SpecError(f"skip_unchanged must be True or False, got {self.skip_unchanged!r}")
        if not isinstance(self.reversible, bool):
            raise SpecError(f"reversible must be True or False, got {self.reversible!r}")
        reverts = self.reverts
        if reverts is not None:
            reverts = tuple(reverts)  # type: ignore[assignment]
            if len(reverts) != 2 or not all(isinstance(part, str) and part for part in reverts):
                raise SpecError(f"reverts must be a (schema, table) pair, got {self.reverts!r}")
            if self.reversible or self.keep_in_sync:
                raise SpecError("a revert is neither reversible nor kept in sync")
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "schema", schema)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "reverts", reverts)
        object.__setattr__(self, "_frozen_values", tuple(values.items()))

    def __hash__(self) -> int:
        return hash(
            (
                self.name,
                self.schema,
                self.table,
                self._frozen_values,
                self.where,
                self.key,
                self.keep_in_sync,
                self.skip_unchanged,
                self.reversible,
                self.reverts,
            )
        )

    @property
    def qualified_table(self) -> str:
        """``schema.table`` for messages (not for SQL: statements quote each part)."""
        return f"{self.schema}.{self.table}" if self.schema else self.table

    @property
    def initial_batch_size(self) -> int:
        """The first batch's size: the pinned one, or where adaptive sizing starts."""
        return self.batch_size or DEFAULT_BATCH_SIZE

    def with_changes(self, **changes: Any) -> BackfillSpec:
        """A copy with some fields replaced (and validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "schema": self.schema,
            "table": self.table,
            "values": dict(self.values),
            "where": self.where,
            "key": list(self.key) if self.key is not None else None,
            "batch_size": self.batch_size,
            "skip_unchanged": self.skip_unchanged,
        }
        if self.keep_in_sync:
            # Only when set: specs stored before the option existed keep their fingerprint.
            data["keep_in_sync"] = True
        if self.reversible:
            data["reversible"] = True
        if self.reverts is not None:
            data["reverts"] = list(self.reverts)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackfillSpec:
        key: Iterable[str] | None = data.get("key")
        reverts = data.get("reverts")
        return cls(
            name=data["name"],
            table=data["table"],
            values=data["values"],
            where=data.get("where"),
            key=tuple(key) if key is not None else None,
            batch_size=data.get("batch_size"),
            schema=data.get("schema"),
            keep_in_sync=bool(data.get("keep_in_sync", False)),
            skip_unchanged=data.get("skip_unchanged", True),
            reversible=bool(data.get("reversible", False)),
            reverts=(reverts[0], reverts[1]) if reverts is not None else None,
        )

    def fingerprint(self) -> str:
        """A digest of what the backfill does to the data. Batch size is left out: it may be tuned on resume."""
        return fingerprint_of(self.fingerprint_text())

    def fingerprint_text(self) -> str:
        """The text :meth:`fingerprint` digests (an offline script completes it with the key it finds)."""
        what = {k: v for k, v in self.to_dict().items() if k not in ("name", "batch_size")}
        what["values"] = sorted(self.values.items())
        if self.skip_unchanged:
            # The default, left out so specs stored before the field existed keep their fingerprint.
            del what["skip_unchanged"]
        return json.dumps(what, sort_keys=True)


def fingerprint_of(text: str) -> str:
    """The first 16 hex digits of the SHA-256 of ``text`` (what the control table stores)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
