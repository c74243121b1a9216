"""A spec resolved against one database: the table, its key and the key's types, ready for the batch statements.

``backfill.pg.catalog.resolve`` makes a :class:`Plan` from a spec; ``backfill.pg.statements`` turns its
:class:`Target` into SQL. The engine only carries them.
"""

from __future__ import annotations

from dataclasses import dataclass

from backfill.spec import BackfillSpec

__all__ = ["Plan", "Target", "Reverted"]


@dataclass(frozen=True)
class Target:
    """The resolved table, key and expressions a backfill's batch statements are built from."""

    schema: str
    table: str
    key: tuple[str, ...]
    #: The key columns' types as ``format_type`` spells them, for casting keys back from their text form.
    key_types: tuple[str, ...]
    values: tuple[tuple[str, str], ...]
    where: str | None
    #: See :attr:`Plan.key_signature`; checked again by every batch (empty: not checked, as offline).
    key_signature: tuple[str, ...] = ()
    #: Update only rows whose values differ from the expressions' results (see ``BackfillSpec.skip_unchanged``).
    skip_unchanged: bool = True
    #: The ``values`` columns' types with modifier and collation (as :attr:`key_signature`), in the order of their
    #: names: the undo log's types.
    value_types: tuple[str, ...] = ()
    #: A revert's walk: this target is the undo log (its key ``k_1``..., old values ``o_1``..., values the
    #: backfill wrote ``n_1``...), and each batch writes the old values back into the table ``(schema, table)``
    #: found by its key columns. None for a backfill.
    reverts: Reverted | None = None


@dataclass(frozen=True)
class Reverted:
    """The table a revert writes back into: the backfill's own table, key and columns."""

    schema: str
    table: str
    key: tuple[str, ...]
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """A spec resolved against one database: ``spec`` has its schema and key filled in."""

    spec: BackfillSpec
    target: Target
    #: ``pg_class.reltuples``: the planner's row estimate, or None when the table was never analysed.
    estimated_rows: int | None
    server_version: int
    #: What a checkpoint of this walk means: each key column's type with its modifier, and its collation
    #: (``"text COLLATE pg_catalog.\"C\""``). Stored with the spec; a change makes stored checkpoints unreadable.
    key_signature: tuple[str, ...] = ()
