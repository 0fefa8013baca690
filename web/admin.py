"""The admin app (``outbox web``): dashboard, dead letters, message and audit pages, the
JSON API, and the open ``/metrics``, ``/health`` and ``/health/live``.

Pages are server-rendered (Jinja2) and work without JavaScript. Every action goes
through ``outbox.deadletters``, the functions the CLI uses, so both agree (and two
operators re-driving at once still make one re-drive: the transition is a conditional
UPDATE). Bad input is a 4xx with one clear message, never a 500.
"""


import logging
import math
import os
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Form, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from outbox import clock, deadletters, dispatch, health, messages, status
from outbox.clock import iso, utcnow
from outbox.db import describe
from outbox.errors import MessageNotFound, OutboxError
from outbox.models import AuditEntry, Message

from . import prom
from .auth import WebAuth, csrf_ok, new_csrf_token

log = logging.getLogger("outbox.web")

PAGE_SIZE = 50
MAX_PAGE = 100_000
MAX_TEXT = 255
API_MAX_LIMIT = 1000
MAX_BODY = 1024 * 1024
TEMPLATES = Jinja2Templates(directory=str(FilePath(__file__).parent / "templates"))
TEMPLATES.env.filters["iso"] = iso


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413, by their Content-Length before
    reading, or while reading a body sent without one (pure ASGI middleware)."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self._refuse(send)
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except self._TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = b'{"error": "request body too large (at most 1 MB)"}'
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class NotLoggedIn(Exception):
    """A page asked for without a login: answered with a redirect to /login."""


# ---- what the app is given ---------------------------------------------------------

def create_app(sessions: sessionmaker[Session], auth: WebAuth, *,
               facts: Callable[[], Mapping[str, dict]],
               operations: Mapping[str, frozenset[str]],
               flower_url: str = "http://127.0.0.1:5555",
               clock: Callable[[], datetime] = utcnow) -> FastAPI:
    """The admin app on ``sessions``' database.

    Args:
        auth: the credentials (``WebAuth.from_env``).
        facts: the providers' live state, asked on each request that shows health
            (``integrations.registry.provider_facts``).
        operations: provider → its operations (``schemas.operations()``).
        flower_url: linked from the dashboard.
        clock: the time health is computed at (naive UTC; tests move it on).
    """
    app = FastAPI(title="integration-outbox admin API", version="1",
                  description="Dead letters and messages, as the `outbox` CLI sees them. "
                              "Authenticate with HTTP Basic (OUTBOX_WEB_AUTH) or "
                              "`Authorization: Bearer` (OUTBOX_WEB_TOKEN).",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SessionMiddleware, secret_key=auth.secret_key,
                       session_cookie="outbox_session", same_site="strict",
                       https_only=False, max_age=12 * 3600)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY)
    registry = prom.registry(prom.OutboxCollector(sessions, facts, operations, clock))

    def db():
        with sessions() as session:
            yield session

    DB = Annotated[Session, Depends(db)]

    def api_actor(request: Request) -> str:
        actor = auth.api_actor(request.headers.get("authorization"))
        if actor is None:
            raise HTTPException(401, "authentication required: HTTP Basic (OUTBOX_WEB_AUTH) "
                                     "or Authorization: Bearer (OUTBOX_WEB_TOKEN)",
                                headers={"WWW-Authenticate": 'Basic realm="outbox"'})
        return actor

    API = Annotated[str, Depends(api_actor)]

    def page_user(request: Request) -> str:
        user = request.session.get("user")
        if user is None:
            raise NotLoggedIn()
        return user

    User = Annotated[str, Depends(page_user)]

    def render(request: Request, template: str, status_code: int = 200, **context) -> Response:
        if "csrf" not in request.session:
            request.session["csrf"] = new_csrf_token()
        context |= {"csrf": request.session["csrf"], "user": request.session.get("user"),
                    "flower_url": flower_url, "flash": request.session.pop("flash", None)}
        return TEMPLATES.TemplateResponse(request, template, context, status_code=status_code)

    def check_csrf(request: Request, token: str | None) -> None:
        if not csrf_ok(request.session.get("csrf"), token):
            raise HTTPException(403, "the form has expired or did not come from this site "
                                     "(CSRF token missing or wrong): reload the page and "
                                     "try again")

    # ---- errors: one clear line, JSON for /api and the open routes, HTML for pages ----

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith(("/api", "/health", "/metrics"))

    @app.exception_handler(NotLoggedIn)
    async def _login_first(request: Request, exc: NotLoggedIn):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if wants_json(request) or request.method != "GET" and exc.status_code == 401:
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))
        return render(request, "error.html", exc.status_code, message=exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _bad_input(request: Request, exc: RequestValidationError):
        message = _validation_message(exc)
        if wants_json(request):
            return JSONResponse({"error": message}, status_code=422)
        return render(request, "error.html", 400, message=message)

    @app.exception_handler(OutboxError)
    async def _refused(request: Request, exc: OutboxError):
        code = 404 if isinstance(exc, MessageNotFound) else 400
        if wants_json(request):
            return JSONResponse({"error": str(exc)}, status_code=code)
        return render(request, "error.html", code, message=str(exc))

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError):
        log.warning("database error: %s", describe(exc) if hasattr(exc, "orig") else
                    type(exc).__name__)
        message = "the database is unreachable or failed; try again"
        if wants_json(request):
            return JSONResponse({"error": message}, status_code=503)
        return render(request, "error.html", 503, message=message)

    # ---- open routes: counts only ---------------------------------------------------

    @app.get("/health/live", include_in_schema=False)
    def live():
        return {"status": "ok"}

    @app.get("/health", include_in_schema=False)
    def health_(session: DB):
        data = health_view(status.report(session, now=clock(), facts=facts()))
        return JSONResponse(data, status_code=503 if data["level"] == health.CRITICAL else 200)

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        return Response(prom.render(registry), media_type=prom.CONTENT_TYPE)

    # ---- login ------------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, next: str = "/"):
        return render(request, "login.html", next=_local(next), error=None)

    @app.post("/login", include_in_schema=False)
    def login(request: Request, username: Annotated[str, Form(max_length=MAX_TEXT)],
              password: Annotated[str, Form(max_length=MAX_TEXT)],
              csrf: Annotated[str | None, Form(max_length=MAX_TEXT)] = None,
              next: Annotated[str, Form(max_length=2048)] = "/"):
        check_csrf(request, csrf)
        if not auth.check_password(username, password):
            log.warning("failed login for the admin app")
            return render(request, "login.html", 401, next=_local(next),
                          error="wrong user name or password")
        request.session.clear()
        request.session.update(user=auth.user, csrf=new_csrf_token())
        return RedirectResponse(_local(next), status_code=303)

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, csrf: Annotated[str | None, Form(max_length=MAX_TEXT)] = None):
        check_csrf(request, csrf)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ---- pages --------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard(request: Request, user: User, session: DB):
        live_facts = facts()
        report = status.report(session, now=clock(), facts=live_facts)
        return render(request, "dashboard.html", report=report, facts=live_facts,
                      count_text=status.count_text, protection_line=status.protection_line)

    @app.get("/dead-letters", response_class=HTMLResponse, include_in_schema=False)
    def dead_letters(request: Request, user: User, session: DB,
                     q: Annotated[DeadQuery, Depends()],
                     page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1):
        _only_known(request, {"page"})
        where = q.filter()
        total = deadletters.count_dead(session, where)
        rows = deadletters.list_dead(session, where, limit=PAGE_SIZE,
                                     offset=(page - 1) * PAGE_SIZE)
        pages = max(1, math.ceil(total / PAGE_SIZE))
        return render(request, "dead_letters.html", rows=rows, total=total, page=page,
                      pages=pages, q=q, query=q.query_string(), providers=sorted(operations),
                      error_classes=_error_classes(session))

    @app.post("/dead-letters/preview", response_class=HTMLResponse, include_in_schema=False)
    def preview(request: Request, user: User, session: DB,
                form: Annotated[BulkForm, Form()]):
        check_csrf(request, form.csrf)
        results = _bulk(session, form, user, dry_run=True)
        would = [r for r in results if r.done]
        review = [r for r in results if r.note == deadletters.NEEDS_REVIEW_NOTE]
        return render(request, "confirm.html", form=form, would=len(would),
                      skipped=len(results) - len(would), review=len(review),
                      query=form.query().query_string())

    @app.post("/dead-letters/apply", include_in_schema=False)
    def apply(request: Request, user: User, session: DB, form: Annotated[BulkForm, Form()]):
        check_csrf(request, form.csrf)
        if not form.confirm:
            raise HTTPException(400, "nothing was done: confirm the action first")
        results = _bulk(session, form, user, dry_run=False)
        dispatch.dispatcher().flush()
        done = sum(r.done for r in results)
        request.session["flash"] = (f"{form.action}: {done} of {len(results)} dead letter(s) "
                                    f"{'re-driven' if form.action == 'redrive' else 'discarded'}")
        return RedirectResponse("/dead-letters?" + form.query().query_string(), status_code=303)

    @app.get("/messages/{message_id}", response_class=HTMLResponse, include_in_schema=False)
    def message_page(request: Request, user: User, session: DB, message_id: str):
        detail = messages.detail(session, message_id)
        return render(request, "message.html", m=detail)

    @app.post("/messages/{message_id}/{action}", include_in_schema=False)
    def message_action(request: Request, user: User, session: DB, message_id: str,
                       action: Literal["redrive", "discard"],
                       reason: Annotated[str, Form(max_length=2000)] = "",
                       csrf: Annotated[str | None, Form(max_length=MAX_TEXT)] = None,
                       accept_duplicate_risk: Annotated[bool, Form()] = False):
        check_csrf(request, csrf)
        if action == "redrive":
            results = deadletters.redrive(session, reason=reason, actor=user, ids=[message_id],
                                          accept_duplicate_risk=accept_duplicate_risk)
            dispatch.dispatcher().flush()
        else:
            results = deadletters.discard(session, reason=reason, actor=user, ids=[message_id])
        request.session["flash"] = results[0].note
        return RedirectResponse(f"/messages/{message_id}", status_code=303)

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit(request: Request, user: User, session: DB,
              page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1):
        # One line per action: a bulk re-drive writes a row per message, all at one time.
        action = (AuditEntry.at, AuditEntry.actor, AuditEntry.action, AuditEntry.reason)
        total = session.execute(select(func.count()).select_from(
            select(*action).group_by(*action).subquery())).scalar_one()
        rows = session.execute(select(*action, func.count().label("count"),
                                      func.min(AuditEntry.message_id).label("message_id"))
                               .group_by(*action).order_by(AuditEntry.at.desc())
                               .limit(PAGE_SIZE).offset((page - 1) * PAGE_SIZE)).all()
        return render(request, "audit.html", rows=rows, total=total, page=page,
                      pages=max(1, math.ceil(total / PAGE_SIZE)))

    # ---- JSON API (the CLI's operations) -------------------------------------------------

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi_document(actor: API) -> dict[str, Any]:
        """The API's OpenAPI document (authenticated, like every /api route)."""
        return app.openapi()

    @app.get("/api/messages/{message_id}", tags=["messages"])
    def api_message(actor: API, session: DB, message_id: Annotated[str, Path(max_length=64)]
                    ) -> dict[str, Any]:
        """One message, its attempt timeline and audit trail (`outbox show ID --json`)."""
        return messages.detail(session, message_id)

    @app.get("/api/dead-letters", tags=["dead letters"])
    def api_dead_letters(request: Request, actor: API, session: DB,
                         q: Annotated[DeadQuery, Depends()],
                         limit: Annotated[int, Query(ge=1, le=API_MAX_LIMIT)] = 100,
                         offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0
                         ) -> dict[str, Any]:
        """Dead letters matching the filters, oldest first (`outbox dead list --json`)."""
        _only_known(request, {"limit", "offset"})
        where = q.filter()
        rows = deadletters.list_dead(session, where, limit=limit, offset=offset)
        return {"total": deadletters.count_dead(session, where),
                "dead_letters": [messages.as_dict(m) for m in rows]}

    @app.post("/api/dead-letters/redrive", tags=["dead letters"])
    def api_redrive(actor: API, session: DB, body: RedriveRequest) -> dict[str, Any]:
        """Send dead letters again (`outbox dead redrive`): ids, or a filter naming a
        provider (or `any_provider`). `dry_run` previews."""
        results = deadletters.redrive(
            session, reason=body.reason, actor=actor, ids=body.ids or None,
            where=body.where(), all_providers=body.any_provider,
            accept_duplicate_risk=body.accept_duplicate_risk, dry_run=body.dry_run)
        if not body.dry_run:
            dispatch.dispatcher().flush()
        return _results(results, body.dry_run)

    @app.post("/api/dead-letters/discard", tags=["dead letters"])
    def api_discard(actor: API, session: DB, body: DiscardRequest) -> dict[str, Any]:
        """Give up on dead letters (`outbox dead discard`): ids, or a filter."""
        results = deadletters.discard(session, reason=body.reason, actor=actor,
                                      ids=body.ids or None, where=body.where(),
                                      all_providers=body.any_provider, dry_run=body.dry_run)
        return _results(results, body.dry_run)

    return app


# ---- inputs --------------------------------------------------------------------------

Text = Annotated[str | None, Field(max_length=MAX_TEXT)]


class DeadQuery(BaseModel):
    """The dead-letter filters (page and API)."""

    model_config = ConfigDict(extra="forbid")
    provider: Text = None
    operation: Text = None
    error_class: Text = None
    since: Annotated[str | None, Field(max_length=40, description="30m, 2h, 7d or an ISO "
                                                                  "time")] = None
    text: Annotated[str | None, Field(max_length=MAX_TEXT, description="a message id, "
                                      "idempotency key or correlation id, exactly")] = None

    def filter(self) -> deadletters.DeadFilter:
        return deadletters.DeadFilter(provider=self.provider or None,
                                      operation=self.operation or None,
                                      error_class=self.error_class or None,
                                      since=parse_since(self.since) if self.since else None,
                                      text=(self.text or "").strip() or None)

    def query_string(self) -> str:
        return urlencode({k: v for k, v in self.model_dump().items() if v})


class BulkForm(DeadQuery):
    """A bulk action on the dead letters a filter selects."""

    model_config = ConfigDict(extra="ignore")
    action: Literal["redrive", "discard"]
    reason: Annotated[str, Field(max_length=2000)] = ""
    csrf: Text = None
    confirm: bool = False
    accept_duplicate_risk: bool = False
    any_provider: bool = False

    def query(self) -> DeadQuery:
        return DeadQuery(**self.model_dump(include=set(DeadQuery.model_fields)))


class _ActionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Annotated[str, Field(min_length=1, max_length=2000)]
    ids: Annotated[list[Annotated[str, Field(max_length=64)]] | None,
                   Field(max_length=10_000)] = None
    filter: DeadQuery | None = None
    any_provider: bool = False
    dry_run: bool = False

    def where(self) -> deadletters.DeadFilter | None:
        return self.filter.filter() if self.filter is not None else None


class RedriveRequest(_ActionRequest):
    accept_duplicate_risk: bool = False


class DiscardRequest(_ActionRequest):
    pass


def _bulk(session: Session, form: BulkForm, user: str, dry_run: bool):
    where = form.query().filter()
    if form.action == "redrive":
        return deadletters.redrive(session, reason=form.reason, actor=user, where=where,
                                   all_providers=form.any_provider,
                                   accept_duplicate_risk=form.accept_duplicate_risk,
                                   dry_run=dry_run)
    return deadletters.discard(session, reason=form.reason, actor=user, where=where,
                               all_providers=form.any_provider, dry_run=dry_run)


def _results(results, dry_run: bool) -> dict[str, Any]:
    return {"dry_run": dry_run, "done": sum(r.done for r in results), "total": len(results),
            "results": [r.__dict__ for r in results]}


def parse_since(text: str) -> datetime:
    """``30m``/``2h``/``7d`` ago or an ISO time (as ``outbox dead list --since``)."""
    try:
        return clock.parse_since(text)
    except ValueError as exc:
        raise OutboxError(str(exc)) from None


def _only_known(request: Request, others: set[str]) -> None:
    """An unknown filter is refused, not ignored: ignoring it would list, or re-drive,
    more than the operator meant."""
    unknown = set(request.query_params) - set(DeadQuery.model_fields) - others
    if unknown:
        raise OutboxError(f"unknown filter {sorted(unknown)[0][:40]!r}; the filters are "
                          + ", ".join(DeadQuery.model_fields))


def _local(target: str) -> str:
    """Only a path on this site (no open redirect to elsewhere after login)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _validation_message(exc: RequestValidationError) -> str:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
    return f"{where or 'input'}: {first.get('msg', 'invalid')}"


def _error_classes(session: Session) -> list[str]:
    return sorted(c for c in session.scalars(
        select(Message.last_error_class).where(*deadletters.DeadFilter().where()).distinct())
        if c)


# ---- views ----------------------------------------------------------------------------

HEALTH_FIGURES = ("depth", "retry_scheduled", "oldest_due_age_s", "oldest_pending_due_age_s",
                  "dead_awaiting", "dead_last_hour", "delivered_5m", "attempts_5m",
                  "failures_5m", "error_rate_5m", "failures_by_code_5m", "p50_ms_5m",
                  "p95_ms_5m", "p99_ms_5m", "waiting_for_key")


def health_view(report: dict) -> dict[str, Any]:
    """``/health``: levels, the thresholds that tripped, and counts; no keys or payloads
    (blocked ordering keys are counted, not named)."""
    return {
        "level": report["level"], "at": report["at"], "findings": report["findings"],
        "dead_awaiting": report["dead_awaiting"],
        "blocked_keys": len(report.get("blocked_keys", ())),
        "providers": {name: {"level": e["level"], "findings": e["findings"],
                             **{k: e[k] for k in HEALTH_FIGURES}}
                      for name, e in report["providers"].items()},
    }


def default_flower_url(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("OUTBOX_FLOWER_URL") or "http://127.0.0.1:5555"


