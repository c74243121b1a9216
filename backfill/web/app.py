"""The dashboard's web application: the page, the operator actions and ``/metrics`` (Starlette, Jinja2)."""

from __future__ import annotations

import datetime as dt
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import psycopg
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from backfill import api
from backfill.cli.durations import parse_duration
from backfill.errors import BackfillError, describe
from backfill.pg.connect import Bind, Database
from backfill.settings import SettingsError
from backfill.state import OperatorAction
from backfill.web.metrics import Snapshot, metrics_registry
from backfill.web.views import SETTINGS_FORM, BackfillView, backfill_view, live_settings

__all__ = ["ControlReader", "create_app", "MIN_TOKEN_LENGTH", "TokenError"]

log = structlog.get_logger("backfill.web")

_HERE = Path(__file__).resolve().parent
#: A token shorter than this is refused: it guards cancel, and the page can be reached by anyone who can reach it.
MIN_TOKEN_LENGTH = 16
_ACTIONS = {
    OperatorAction.PAUSE: api.pause_backfill,
    OperatorAction.RESUME: api.resume_backfill,
    OperatorAction.CANCEL: api.cancel_backfill,
    OperatorAction.RETRY: api.retry_backfill,
}
# The page loads nothing from elsewhere and runs only its own script; no other site may frame it (clickjacking).
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class TokenError(BackfillError):
    """Raised when the token given to ``backfill serve`` is too short to guard the operator actions."""


@dataclass(frozen=True)
class ControlReader:
    """Reads the control tables for the dashboard and carries out its actions, each call on a connection of its
    own (through :mod:`backfill.api`): the page and ``/metrics`` show what every machine's runners wrote there."""

    database: Database
    control_schema: str = api.DEFAULT_CONTROL_SCHEMA

    def snapshot(self) -> Snapshot:
        """Every backfill's status with its recent batches, read on one connection."""
        return api.backfill_status(self.database, control_schema=self.control_schema)

    def act(self, name: str, action: OperatorAction) -> str:
        record = _ACTIONS[action](self.database, name, control_schema=self.control_schema)
        return record.state.value

    def set(self, name: str, values: dict[str, float], reset: bool) -> dict[str, float]:
        record = api.set_backfill_settings(
            self.database,
            name,
            max_rows_per_second=values.get("max_rows_per_second"),
            sleep=values.get("sleep"),
            target_batch_time=values.get("target_batch_time"),
            reset=reset,
            control_schema=self.control_schema,
        )
        return dict(record.overrides)


def _setting(name: str, text: str) -> float:
    """A live setting typed into the page: a number (rows/s), a duration (``200ms``, ``1.5s``) or ``off`` (0)."""
    label = next(label for key, label, _, _ in SETTINGS_FORM if key == name)
    if text.lower() == "off":
        return 0.0
    try:
        return float(text) if name == "max_rows_per_second" else parse_duration(text)
    except ValueError:
        raise SettingsError(f"{label}: {text!r} is not a number, a duration (200ms, 1.5s) or off") from None


def _unavailable(exc: Exception) -> str:
    """One line for the page when the control tables cannot be read; never the password (errors are built from
    the display form of the URL) and never a traceback."""
    if isinstance(exc, BackfillError):  # ControlTablesMissingError among them: "run backfill init"
        return str(exc)
    return f"database error: {describe(exc)}"


def create_app(
    bind: Bind,
    *,
    token: str | None = None,
    control_schema: str = api.DEFAULT_CONTROL_SCHEMA,
    refresh_seconds: float = 5.0,
) -> Starlette:
    """The dashboard as an ASGI application (serve it with any ASGI server; ``backfill serve`` uses uvicorn).

    Args:
        bind: the database whose control tables it shows (URL, ``sqlalchemy.URL``, Engine or Connection).
        token: the secret the pause/resume/cancel/retry buttons (POST ``/action``) must present, compared in
            constant time. None: the page is read-only and every action is refused.
        control_schema: where the control tables live.
        refresh_seconds: how often the open page reloads its list of backfills (0: never).

    Raises:
        TokenError: ``token`` is shorter than :data:`MIN_TOKEN_LENGTH` characters.
        ConnectError: ``bind`` is not a usable PostgreSQL URL (the database is not contacted here).
    """
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(
            f"the token must be at least {MIN_TOKEN_LENGTH} characters long (e.g. the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe())'`)"
        )
    reader = ControlReader(Database.from_bind(bind, "backfill-serve"), control_schema)
    return _Dashboard(reader, token, refresh_seconds).app()


class _Dashboard:
    def __init__(self, reader: ControlReader, token: str | None, refresh_seconds: float) -> None:
        self.reader, self.token, self.refresh_seconds = reader, token, refresh_seconds
        self.templates = Jinja2Templates(
            env=jinja2.Environment(
                loader=jinja2.FileSystemLoader(_HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
            )
        )

    def app(self) -> Starlette:
        registry = metrics_registry(self.reader.snapshot)

        async def metrics(request: Request) -> Response:
            try:
                body = await run_in_threadpool(generate_latest, registry)
            except (BackfillError, psycopg.Error) as exc:
                return PlainTextResponse(_unavailable(exc) + "\n", status_code=503)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        return Starlette(
            routes=[
                Route("/", self.page, methods=["GET"]),
                Route("/backfills", self.fragment, methods=["GET"]),
                Route("/action", self.action, methods=["POST"]),
                Route("/settings", self.settings, methods=["POST"]),
                Route("/metrics", metrics, methods=["GET"]),
                Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
            ]
        )

    def _render(
        self, request: Request, template: str, *, notice: str | None = None, ok: bool = True, status: int = 200
    ) -> Response:
        views, error = self._read()
        context: dict[str, Any] = {
            "backfills": views,
            "error": error,
            "notice": notice,
            "notice_ok": ok,
            "read_only": self.token is None,
            "database": self.reader.database.display,
            "control_schema": self.reader.control_schema,
            "refresh_ms": int(self.refresh_seconds * 1000),
            "settings_form": SETTINGS_FORM,
            "now": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        }
        response = self.templates.TemplateResponse(
            request, template, context, status_code=503 if error and status == 200 else status
        )
        response.headers.update(_HEADERS)
        return response

    def _read(self) -> tuple[list[BackfillView], str | None]:
        try:
            snapshot = self.reader.snapshot()
        except (BackfillError, psycopg.Error) as exc:
            return [], _unavailable(exc)
        return [backfill_view(status) for status in snapshot], None

    async def page(self, request: Request) -> Response:
        return await run_in_threadpool(self._render, request, "dashboard.html")

    async def fragment(self, request: Request) -> Response:
        return await run_in_threadpool(self._render, request, "_backfills.html")

    def _authorised(self, request: Request, given: str) -> bool:
        if self.token is None:
            return False
        header = request.headers.get("authorization", "")
        if not given and header.lower().startswith("bearer "):
            given = header[7:].strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def action(self, request: Request) -> Response:
        form = await request.form()
        name, verb, given = (str(form.get(key) or "") for key in ("backfill", "action", "token"))
        try:
            action = OperatorAction(verb)
        except ValueError:
            return await self._notice(request, f"unknown action {verb!r}", status=400)
        if not self._authorised(request, given):
            return await self._refused(request, name, action.value)
        try:
            state = await run_in_threadpool(self.reader.act, name, action)
        except (BackfillError, psycopg.Error) as exc:
            return await self._notice(request, f"{action.value} {name!r} failed: {_unavailable(exc)}", status=409)
        log.info("serve_action", backfill=name, action=action.value, state=state)
        return await self._notice(request, f"{action.value} {name!r}: now {state}", ok=True, status=200)

    async def settings(self, request: Request) -> Response:
        form = await request.form()
        name, given, op = (str(form.get(key) or "") for key in ("backfill", "token", "op"))
        if not self._authorised(request, given):
            return await self._refused(request, name, "set")
        reset = op == "reset"
        try:
            typed = {key: str(form.get(key) or "").strip() for key, *_ in SETTINGS_FORM}
            values = {} if reset else {key: _setting(key, text) for key, text in typed.items() if text}
            if not values and not reset:
                raise SettingsError("give at least one setting, or reset")
            overrides = await run_in_threadpool(self.reader.set, name, values, reset)
        except SettingsError as exc:
            return await self._notice(request, f"set {name!r} refused: {exc}", status=400)
        except (BackfillError, psycopg.Error) as exc:
            return await self._notice(request, f"set {name!r} failed: {_unavailable(exc)}", status=409)
        log.info("serve_settings", backfill=name, overrides=overrides, reset=reset)
        shown = live_settings(overrides) or "none (each runner uses its own settings)"
        return await self._notice(request, f"live settings of {name!r}: {shown}", ok=True, status=200)

    async def _refused(self, request: Request, name: str, what: str) -> Response:
        log.warning("serve_action_refused", backfill=name, action=what, read_only=self.token is None)
        why = (
            "this dashboard is read-only: start `backfill serve` with --token or BACKFILL_SERVE_TOKEN to allow it"
            if self.token is None
            else "wrong or missing token"
        )
        return await self._notice(request, f"{what} {name!r} refused: {why}", status=403)

    async def _notice(self, request: Request, text: str, *, status: int, ok: bool = False) -> Response:
        return await run_in_threadpool(
            lambda: self._render(request, "dashboard.html", notice=text, ok=ok, status=status)
        )
