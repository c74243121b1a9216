"""``python -m backfill.cli``: the same command as the ``backfill`` script."""

from backfill.cli.commands import main

main()
