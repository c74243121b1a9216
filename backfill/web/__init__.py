"""``backfill serve``: a dashboard of every backfill and Prometheus ``/metrics``, read from the control tables.

Needs the ``serve`` extra (``pip install 'backfill[serve]'``): Starlette, uvicorn, Jinja2, the Prometheus client.
"""

from __future__ import annotations

from backfill.web.app import MIN_TOKEN_LENGTH, ControlReader, TokenError, create_app
from backfill.web.server import DashboardServer

__all__ = ["MIN_TOKEN_LENGTH", "ControlReader", "DashboardServer", "TokenError", "create_app"]
