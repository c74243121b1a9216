"""The CLI's parameter types: durations (``90s``, ``1h30m``), sizes (``64MB``) and ``off`` for a check turned off."""

from __future__ import annotations

import enum
import math
import re
from typing import Any

import click

from backfill.cli.durations import parse_duration

__all__ = ["Off", "OFF", "Duration", "ByteSize", "NumberOrOff", "DURATION", "DURATION_OFF", "DURATION_ZERO", "BYTES"]


class Off(enum.Enum):
    """What a setting's flag parses to when the operator turns that check off (``off``): the field becomes None."""

    OFF = "off"


OFF = Off.OFF


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.3 on
    """``90s``, ``5m``, ``1h30m``, ``250ms`` or a number of seconds.

    Args:
        zero: accept 0 (e.g. no retries at all).
        off: accept ``off`` (and 0) for a check the operator turns off: the value is :data:`OFF`.
    """

    name = "duration"

    def __init__(self, *, zero: bool = False, off: bool = False) -> None:
        self.zero, self.off = zero, off

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | Off:
        if value is OFF or isinstance(value, (int, float)):
            return value  # a default, already converted
        if self.off and str(value).strip().lower() == "off":
            return OFF
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if seconds == 0 and self.off:
            return OFF
        if seconds < 0 or (seconds == 0 and not self.zero):
            self.fail(f"{value!r} must be longer than zero", param, ctx)
        return seconds


#: Byte units as PostgreSQL reads them in its settings (kB = 1024 bytes), plus the explicit binary spellings.
_BYTE_UNITS = {"": 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1024**2, "mib": 1024**2, "gb": 1024**3, "gib": 1024**3,
               "tb": 1024**4, "tib": 1024**4}  # fmt: skip
_BYTES = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


class ByteSize(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.3 on
    """A size: ``64MB``, ``1GiB``, ``512kB`` (units of 1024, as in postgresql.conf), plain bytes, or ``off``."""

    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | Off:
        if value is OFF or isinstance(value, int):
            return value  # a default, already converted
        text = str(value).strip().lower()
        if text == "off":
            return OFF
        found = _BYTES.fullmatch(text)
        if found is None or found[2] not in _BYTE_UNITS:
            self.fail(f"{value!r} is not a size (use e.g. 64MB, 1GiB, 500kB or a number of bytes)", param, ctx)
        return int(float(found[1]) * _BYTE_UNITS[found[2]])


class NumberOrOff(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.3 on
    """A number > 0, or ``off`` (or 0) for a limit turned off: :data:`OFF`."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | Off:
        if value is OFF or isinstance(value, (int, float)):
            return value  # a default, already converted
        text = str(value).strip().lower()
        if text == "off":
            return OFF
        try:
            number = float(text)
        except ValueError:
            self.fail(f"{value!r} is not a number (or off)", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"{value!r} must be a number >= 0 (or off)", param, ctx)
        return OFF if number == 0 else number


DURATION = Duration()
DURATION_OFF = Duration(off=True)
DURATION_ZERO = Duration(zero=True)
BYTES = ByteSize()
POSITIVE_INT = click.IntRange(min=1)
POSITIVE_NUMBER = click.FloatRange(min=0, min_open=True)
NUMBER_OFF = NumberOrOff()
