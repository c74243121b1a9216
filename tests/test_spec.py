"""A spec is validated on its own, serialises losslessly, and its fingerprint covers what it does to the data."""

from __future__ import annotations

from typing import Any

import pytest

from backfill import BackfillSpec, SpecError


def test_schema_qualified_table_is_split() -> None:
    spec = BackfillSpec("b", "app.events", {"kind": "'x'"})

    assert (spec.schema, spec.table, spec.qualified_table) == ("app", "events", "app.events")


def test_explicit_schema_keeps_dots_in_the_table_name() -> None:
    spec = BackfillSpec("b", "weird.name", {"kind": "'x'"}, schema="app")

    assert (spec.schema, spec.table) == ("app", "weird.name")


def test_round_trip_through_a_dict() -> None:
    spec = BackfillSpec(
        "b", "events", {"kind": "'x'", "n": "n + 1"}, where="kind IS NULL", key=("a", "b"), batch_size=7
    )

    assert BackfillSpec.from_dict(spec.to_dict()) == spec


def test_a_single_key_string_is_one_column() -> None:
    assert BackfillSpec("b", "t", {"c": "1"}, key="id").key == ("id",)  # type: ignore[arg-type]


def test_fingerprint_ignores_batch_size_and_name_but_not_what_changes_data() -> None:
    base = BackfillSpec("b", "events", {"kind": "'x'"}, where="kind IS NULL")

    assert base.fingerprint() == base.with_changes(batch_size=5, name="other").fingerprint()
    assert base.fingerprint() != base.with_changes(values={"kind": "'y'"}).fingerprint()
    assert base.fingerprint() != base.with_changes(where=None).fingerprint()
    assert base.fingerprint() != base.with_changes(key=("id",)).fingerprint()
    assert base.fingerprint() != base.with_changes(schema="other").fingerprint()


def test_fingerprint_does_not_depend_on_the_order_of_values() -> None:
    a = BackfillSpec("b", "t", {"x": "1", "y": "2"})
    b = BackfillSpec("b", "t", {"y": "2", "x": "1"})

    assert a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": ""}, "backfill name"),
        ({"name": "x" * 201}, "longer than 200"),
        ({"table": " "}, "table"),
        ({"values": {}}, "at least one column"),
        ({"values": {"": "1"}}, "column name"),
        ({"values": {"c": ""}}, "expression for column 'c'"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": -5}, "batch_size must be a positive integer"),
        ({"batch_size": True}, "batch_size must be a positive integer"),
        ({"batch_size": 1.5}, "batch_size must be a positive integer"),
        ({"key": ()}, "key must name at least one column"),
        ({"key": ("a", "a")}, "key names a column twice"),
        ({"where": ""}, "where"),
    ],
)
def test_malformed_specs_are_refused_with_a_message_naming_the_problem(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"name": "b", "table": "t", "values": {"c": "1"}, **changes}

    with pytest.raises(SpecError) as caught:
        BackfillSpec(**fields)

    assert message in str(caught.value)
