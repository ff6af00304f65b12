"""The dashboard's routes under /ui (left out of the API's OpenAPI schema).

Pages need a signed-in session (sessions.py): without one a page redirects to /ui/login, a POST
or the events stream gets 401. Every POST that changes state needs an admin token (else 403)
and the session's CSRF token (else 403: missing or stale); it goes through the same service
functions as the API, its audit event in the same transaction (actor: the token's name).
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Callable
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy import select

from fota.server import audit, names
from fota.server.auth import ADMIN, AuthError, verify_token
from fota.server.campaigns import (CampaignError, CampaignNotFound, CampaignStateError, abort_campaign,
                                   check_campaign_key, get_campaign, list_campaigns, pause_campaign,
                                   resume_campaign, start_campaign)
from fota.server.dashboard import pages, queries
from fota.server.dashboard.sessions import COOKIE, LOGIN_COOKIE, close_session, open_session, same, signed_in
from fota.server.deployments import DeploymentError, cancel_deployment, list_deployments
from fota.server.store import Store, utcnow
from fota.server.store.models import Device

__all__ = ["EVENTS_INTERVAL", "PREFIX", "SecurityHeaders", "mount", "router"]

log = logging.getLogger(__name__)

PREFIX = "/ui"
STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"dash.js": "text/javascript", "dash.css": "text/css"}
EVENTS_INTERVAL = 1.0      # seconds between two looks at the store for a live page
KEEPALIVE = 15.0           # seconds between comments on an idle events stream
CAMPAIGN_ACTIONS = ("start", "pause", "resume", "approve", "abort")
CHOICES_TTL = 30.0         # seconds the device filters' hardware and version menus are kept
RECENT = 20                # finished campaigns and deployments on the campaigns page
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

router = APIRouter(prefix=PREFIX, include_in_schema=False)


class NotSignedIn(Exception):
    pass


def _store(request: Request) -> Store:
    return request.app.state.store


def _ctx(request: Request) -> pages.Ctx:
    """The signed-in operator; NotSignedIn when there is no session, it went idle or its token
    stopped working."""
    operator = signed_in(_store(request), request.cookies.get(COOKIE))
    if operator is None:
        raise NotSignedIn()
    return pages.Ctx(operator.name, operator.role, operator.csrf)


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status)


def _to_login() -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}/login", 303)


def _page(request: Request, title: str, current: str, render: Callable[[pages.Ctx], str],
          live_url: str | None = None) -> Response:
    try:
        ctx = _ctx(request)
    except NotSignedIn:
        return _to_login()
    return _html(pages.layout(title, render(ctx), ctx, current, live_url))


def _live_body(fragments: dict[str, str]) -> str:
    return "".join(pages.live(key, html) for key, html in fragments.items())


def _refused(status: int, message: str, ctx: pages.Ctx | None = None) -> HTMLResponse:
    body = f'<p class="error" role="alert">{pages.e(message)}</p><p><a href="{PREFIX}/">back to the fleet</a></p>'
    return _html(pages.layout({401: "Not signed in", 403: "Refused", 404: "Not found"}.get(status, "Refused"),
                              body, ctx), status)


# ---- views shared by the pages and the events stream ---------------------------------------------
def _devices_params(request: Request) -> dict[str, str]:
    keys = ("q", "tag", "hardware", "version", "state", "online", "sort", "desc", "after")
    return {k: request.query_params.get(k, "")[:names.MAX_NAME * 4] for k in keys
            if request.query_params.get(k)}


def _device_filter(params: dict[str, str]) -> queries.DeviceFilter:
    online = {"1": True, "0": False}.get(params.get("online", ""))
    return queries.DeviceFilter(q=params.get("q") or None, tag=params.get("tag") or None,
                                hardware=params.get("hardware") or None, version=params.get("version") or None,
                                state=params.get("state") or None, online=online,
                                sort=params.get("sort") if params.get("sort") in queries.SORTS else "id",
                                desc=bool(params.get("desc")), after=params.get("after") or None)


def _devices_view(store: Store, params: dict[str, str]) -> dict[str, Any]:
    try:
        view = queries.device_page(store, _device_filter(params))
    except ValueError:  # a cursor not of ours: the first page
        params = {k: v for k, v in params.items() if k != "after"}
        view = queries.device_page(store, _device_filter(params))
    view["params"] = params
    return view


def _campaigns_view(store: Store) -> dict[str, Any]:
    all_campaigns = list_campaigns(store)
    in_campaigns = {c.deployment_id for c in all_campaigns}
    deployments = [d.id for d in list_deployments(store) if d.id not in in_campaigns][::-1][:RECENT]
    return {"campaigns": [queries.campaign_brief(store, c.id) for c in all_campaigns[::-1][:RECENT]],
            "deployments": [queries.deployment_brief(store, d) for d in deployments]}


# kind -> (load the view from the store and its argument, fragments of the view)
VIEWS: dict[str, tuple[Callable[[Store, Any], Any], Callable[[Any, pages.Ctx], dict[str, str]]]] = {
    "fleet": (lambda store, _: queries.fleet_view(store), pages.fleet_fragments),
    "devices": (_devices_view, pages.devices_fragments),
    "device": (queries.device_view, pages.device_fragments),
    "campaigns": (lambda store, _: _campaigns_view(store), pages.campaigns_fragments),
    "campaign": (queries.campaign_view, pages.campaign_fragments),
    "deployment": (queries.deployment_view, pages.deployment_fragments),
}


def _events_url(kind: str, arg: str | None = None, params: dict[str, str] | None = None) -> str:
    from urllib.parse import urlencode
    query = {"view": kind, **({"arg": arg} if arg is not None else {}), **(params or {})}
    return f"{PREFIX}/events?{urlencode(query)}"


# ---- sign-in -------------------------------------------------------------------------------------
@router.get("/login")
def login_form(request: Request):
    nonce = secrets.token_urlsafe(24)
    response = _html(pages.login_page(nonce))
    _set_cookie(request, response, LOGIN_COOKIE, nonce, path=f"{PREFIX}/login", max_age=600)
    return response


@router.post("/login")
def login(request: Request, token: Annotated[str, Form(max_length=512)] = "",
          login_nonce: Annotated[str, Form(max_length=128)] = ""):
    if not same(request.cookies.get(LOGIN_COOKIE), login_nonce):
        return _refused(403, "the sign-in form expired or came from another site: open the sign-in page again")
    try:
        row = verify_token(_store(request), token.strip())
    except AuthError as exc:
        log.warning("dashboard sign-in refused: %s", exc)
        nonce = secrets.token_urlsafe(24)
        response = _html(pages.login_page(nonce, f"sign-in refused: {exc}"), 401)
        _set_cookie(request, response, LOGIN_COOKIE, nonce, path=f"{PREFIX}/login", max_age=600)
        return response
    close_session(_store(request), request.cookies.get(COOKIE))  # a new session id at every sign-in
    sid, _ = open_session(_store(request), row.id)
    log.info("dashboard sign-in: token %s (%s)", row.name, row.role)
    response = RedirectResponse(f"{PREFIX}/", 303)
    _set_cookie(request, response, COOKIE, sid, path=PREFIX)
    response.delete_cookie(LOGIN_COOKIE, path=f"{PREFIX}/login")
    return response


@router.post("/logout")
def logout(request: Request, csrf: Annotated[str, Form(max_length=128)] = ""):
    sid = request.cookies.get(COOKIE)
    operator = signed_in(_store(request), sid)
    if operator is not None and not same(operator.csrf, csrf):
        return _refused(403, "stale or missing CSRF token: reload the page and try again")
    close_session(_store(request), sid)
    response = _to_login()
    response.delete_cookie(COOKIE, path=PREFIX)
    return response


def _set_cookie(request: Request, response: Response, name: str, value: str, *, path: str,
                max_age: int | None = None) -> None:
    response.set_cookie(name, value, path=path, max_age=max_age, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


# ---- pages ---------------------------------------------------------------------------------------
@router.get("/")
def fleet(request: Request):
    def render(ctx):
        return _live_body(pages.fleet_fragments(queries.fleet_view(_store(request)), ctx))
    return _page(request, "Fleet", "fleet", render, _events_url("fleet"))


def _filter_choices(request: Request) -> tuple[list[str], list[str]]:
    """The hardware types and versions the filters offer: a scan of the devices table, so kept
    for CHOICES_TTL seconds (a new version shows in the menu that much later)."""
    cached = getattr(request.app.state, "dashboard_choices", None)
    if cached is not None and time.monotonic() - cached[0] < CHOICES_TTL:
        return cached[1]
    with _store(request).session() as s:
        choices = (sorted(h for h in s.scalars(select(Device.hardware).distinct()) if h),
                   sorted(v for v in s.scalars(select(Device.version).distinct()) if v))
    request.app.state.dashboard_choices = (time.monotonic(), choices)
    return choices


@router.get("/devices")
def devices(request: Request):
    params = _devices_params(request)
    store = _store(request)

    def render(ctx):
        hardware, versions = _filter_choices(request)
        view = _devices_view(store, params)
        return pages.devices_filters(params, hardware, versions) + _live_body(pages.devices_fragments(view, ctx))
    return _page(request, "Devices", "devices", render, _events_url("devices", params=params))


@router.get("/devices/{device_id}")
def device(request: Request, device_id: str):
    def load(store):
        return queries.device_view(store, device_id) if len(device_id) <= names.MAX_NAME else None
    return _detail(request, load, lambda v: f"Device {v['id']}", "devices", f"no device {device_id!r}",
                   pages.device_fragments, lambda v: _events_url("device", v["id"]))


@router.get("/releases")
def releases(request: Request):
    trust_loader = getattr(request.app.state, "trust_loader", None)

    def render(ctx):
        return pages.releases_body(queries.releases_view(_store(request), trust_loader() if trust_loader else None))
    return _page(request, "Releases", "releases", render)


@router.get("/campaigns")
def campaigns(request: Request):
    return _page(request, "Campaigns and deployments", "campaigns",
                 lambda ctx: _live_body(pages.campaigns_fragments(_campaigns_view(_store(request)), ctx)),
                 _events_url("campaigns"))


@router.get("/campaigns/{ref}")
def campaign(request: Request, ref: str):
    def load(store):
        try:
            return queries.campaign_view(store, ref)
        except CampaignError:
            return None
    return _detail(request, load, lambda v: f"Campaign {v['name']}", "campaigns", f"no campaign {ref!r}",
                   pages.campaign_fragments, lambda v: _events_url("campaign", v["name"]))


@router.get("/deployments/{deployment_id}")
def deployment(request: Request, deployment_id: int):
    def load(store):
        return queries.deployment_view(store, deployment_id) if 0 < deployment_id <= names.MAX_DB_INT else None
    return _detail(request, load, lambda v: f"Deployment {v['id']}", "campaigns", f"no deployment {deployment_id}",
                   pages.deployment_fragments, lambda v: _events_url("deployment", str(v["id"])))


def _detail(request: Request, load, title, current: str, missing: str, fragments, live_url) -> Response:
    """A page of one thing: the session checked before the store is read; 404 when load finds nothing."""
    try:
        ctx = _ctx(request)
    except NotSignedIn:
        return _to_login()
    view = load(_store(request))
    if view is None:
        return _refused(404, missing, ctx)
    return _html(pages.layout(title(view), _live_body(fragments(view, ctx)), ctx, current, live_url(view)))


# ---- state changes -------------------------------------------------------------------------------
def _admin_with_csrf(request: Request, csrf: str) -> tuple[pages.Ctx | None, Response | None]:
    """(ctx, None) when the session may change state, else (None, the refusal)."""
    try:
        ctx = _ctx(request)
    except NotSignedIn:
        return None, _refused(401, "not signed in")
    if ctx.role != ADMIN:
        log.warning("dashboard: token %s (role %s) tried a state change", ctx.name, ctx.role)
        return None, _refused(403, f"token {ctx.name!r} has role {ctx.role!r}: this needs an admin token", ctx)
    if not same(ctx.csrf, csrf):
        log.warning("dashboard: stale or missing CSRF token from token %s", ctx.name)
        return None, _refused(403, "stale or missing CSRF token: reload the page and try again", ctx)
    return ctx, None


@router.post("/campaigns/{ref}/{action}")
def campaign_action(request: Request, ref: str, action: str, csrf: Annotated[str, Form(max_length=128)] = ""):
    ctx, refusal = _admin_with_csrf(request, csrf)
    if refusal is not None:
        return refusal
    if action not in CAMPAIGN_ACTIONS:
        return _refused(404, f"no action {action!r}", ctx)
    store = _store(request)
    trust_loader = getattr(request.app.state, "trust_loader", None)
    try:
        with audit.transaction(store) as tx:
            if action in ("start", "resume", "approve") and trust_loader is not None:
                check_campaign_key(tx, ref, trust_loader())  # they send the release: its key must be trusted
            if action == "approve":
                if get_campaign(tx, ref).state != "waiting":
                    raise CampaignStateError(f"campaign {ref} is not waiting for an approval")
                c = resume_campaign(tx, ref)
            else:
                c = {"start": start_campaign, "pause": pause_campaign, "resume": resume_campaign,
                     "abort": abort_campaign}[action](tx, ref)
            tx.record(ctx.name, f"campaign.{action}", f"campaign:{c.name}",
                      {"id": c.id, "state": c.state, "via": "dashboard"})
    except CampaignNotFound as exc:
        return _refused(404, str(exc), ctx)
    except CampaignError as exc:
        return _refused(409, str(exc), ctx)
    except Exception as exc:  # ReleaseError of the key check, a concurrent change
        log.warning("dashboard: campaign %s %s refused: %s", ref, action, exc)
        return _refused(409, str(exc), ctx)
    return RedirectResponse(f"{PREFIX}/campaigns/{quote(c.name)}", 303)


@router.post("/deployments/{deployment_id}/cancel")
def deployment_cancel(request: Request, deployment_id: int, csrf: Annotated[str, Form(max_length=128)] = ""):
    ctx, refusal = _admin_with_csrf(request, csrf)
    if refusal is not None:
        return refusal
    store = _store(request)
    try:
        with audit.transaction(store) as tx:
            with tx.session() as s:
                outcome = cancel_deployment(s, deployment_id, utcnow())
            tx.record(ctx.name, "deployment.cancel", f"deployment:{deployment_id}", {**outcome, "via": "dashboard"})
    except DeploymentError as exc:
        return _refused(409, str(exc), ctx)
    return RedirectResponse(f"{PREFIX}/deployments/{deployment_id}", 303)


# ---- live updates --------------------------------------------------------------------------------
@router.get("/events")
async def events(request: Request, view: Annotated[str, Query(max_length=16)],
                 arg: Annotated[str | None, Query(max_length=names.MAX_NAME)] = None):
    """Server-sent events: `fragments` (JSON: element id -> HTML) whenever a live section of the
    page changes; `signout` when the session ended."""
    try:
        ctx = await asyncio.to_thread(_ctx, request)
    except NotSignedIn:
        return Response("not signed in", 401)
    if view not in VIEWS or (view in ("device", "campaign", "deployment") and not arg):
        return Response("no such view", 404)
    load, fragments = VIEWS[view]
    store = _store(request)
    if view == "devices":
        arg = _devices_params(request)
    elif view == "deployment":
        arg = int(arg) if arg and arg.isdigit() else 0
    interval = getattr(request.app.state, "dashboard_interval", EVENTS_INTERVAL)

    async def stream():
        sent: dict[str, str] = {}
        idle = 0.0
        yield "retry: 2000\n\n"
        while not await request.is_disconnected():
            try:
                await asyncio.to_thread(_ctx, request)  # revoked, expired, signed out: stop
                data = await asyncio.to_thread(load, store, arg)
            except NotSignedIn:
                yield "event: signout\ndata: {}\n\n"
                return
            except Exception:  # a database hiccup: try again at the next tick
                log.exception("dashboard events: %s %s", view, arg)
                data = None
            if data is not None:
                changed = {k: v for k, v in fragments(data, ctx).items() if sent.get(k) != v}
                if changed:
                    sent.update(changed)
                    idle = 0.0
                    yield f"event: fragments\ndata: {json.dumps(changed)}\n\n"
            idle += interval
            if idle >= KEEPALIVE:
                idle = 0.0
                yield ": still here\n\n"
            await asyncio.sleep(interval)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.get("/static/{name}")
def static(name: str):
    if name not in STATIC_FILES:
        return Response("not found", 404)
    return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


class SecurityHeaders:
    """ASGI middleware: on every /ui response no framing, no inline script, nothing cached (a plain
    ASGI wrapper: it leaves the events stream a stream)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == "/" or path.startswith(PREFIX)):
            await self.app(scope, receive, send)
            return

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                have = {k.lower() for k, _ in headers}
                extra = [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY"),
                         (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if not path.startswith(f"{PREFIX}/static/"):
                    extra.append((b"cache-control", b"no-store"))
                headers += [(k, v) for k, v in extra if k not in have]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def mount(app) -> None:
    """The dashboard on an API app (fota.server.api.create_app): its routes, / -> /ui/, the headers."""
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse(f"{PREFIX}/", 307)
    app.add_middleware(SecurityHeaders)
