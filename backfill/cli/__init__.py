"""The ``backfill`` command line: a thin shell over :mod:`backfill.api` (commands), its parameter types (params,
durations) and what it shows an operator (progress, logging). Only this package configures logging."""

from __future__ import annotations

from backfill.cli.commands import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_WORK_LEFT,
    OUTCOME_EXIT_CODES,
    cli,
    main,
)

__all__ = ["main", "cli", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_WORK_LEFT", "OUTCOME_EXIT_CODES"]
