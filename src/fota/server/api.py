"""The control center's HTTP API (FastAPI): read the fleet, re-key or revoke devices' broker
accounts, create releases, deployments and campaigns, manage API tokens. `fota` in remote mode
(fota.backend.remote, docs/cli.md) uses it.

    app = create_app(store, home.blobs, lambda: load_private_key(home.private_key))
    uvicorn.run(app, host="127.0.0.1", port=8080)      # or: fota api

Every request carries ``Authorization: Bearer <secret>`` (tokens: ``fota token create``).
A missing, unknown, expired or revoked token gets 401; a ``read`` token on an admin
endpoint gets 403. The store is neither read nor changed before the token is checked
(request bodies are parsed first, so their size is capped: 413 beyond ``max_upload_bytes``).

The routes are thin: the work is done by fota.server.releases, fleet, accounts and deployments.
Every state change and its audit event (actor = the token's name) are committed in one
transaction (fota.server.audit.transaction). The OpenAPI schema states the form of every
parameter and body (patterns, lengths, integer ranges: fota.server.names); a request not of that
form gets 422 (FastAPI's validation errors), before anything is read. Errors of the service
modules become 400 (a rule on stored data: unknown release or device, wrong hardware, ...), 404
(unknown resource in the path) or 409, with their message in ``{"detail": "..."}``. Every status
an endpoint returns is in its ``responses``; a 405's ``Allow`` lists the methods the schema
documents for the path. OpenAPI UI: /docs; tests/test_api_schema.py runs schemathesis on it.

Plain HTTP: bind it to localhost, or put a TLS-terminating proxy in front of it.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Path as PathParam, Query, Request, \
    Response, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fota.server import audit, metrics, names
from fota.server.accounts import change_account, no_home_report
from fota.server.auth import ADMIN, MAX_TTL_SECONDS, ROLES, AuthError, create_token, list_tokens, revoke_token, \
    token_state, verify_token
from fota.server.blob_gc import DEFAULT_GRACE, collect_garbage
from fota.server.campaigns import (
    CampaignError,
    CampaignNotFound,
    CampaignStateError,
    abort_campaign,
    campaign_summary,
    check_campaign_key,
    create_campaign,
    list_campaigns,
    pause_campaign,
    preview_campaign,
    resume_campaign,
    start_campaign,
)
from fota.server.campaigns.states import DEVICE_STATES
from fota.server.deployments import (
    HISTORY_LIMIT,
    HISTORY_MAX_LIMIT,
    DeploymentError,
    DeploymentNotFound,
    DeploymentStateError,
    cancel_deployment,
    create_deployment,
    deployment_summary,
    history_page,
    recent_deployments,
)
from fota.server.fleet import FleetError, get_device, list_devices
from fota.server.release_delete import ReleaseInUse, delete_release
from fota.server.release_prune import DEFAULT_KEEP, prune_releases
from fota.server.releases import (IMAGE_SUFFIXES, KINDS, ReleaseError, ReleaseNotFound, check_release_key,
                                  create_release, get_release, list_releases)
from fota.server.store import Store, utcnow
from fota.server.store.models import ApiToken

__all__ = ["API_PREFIX", "DEFAULT_MAX_UPLOAD", "create_app"]

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
DEFAULT_MAX_UPLOAD = 16 * 1024 * 1024  # bytes of one release image or bundle
MULTIPART_OVERHEAD = 64 * 1024  # form fields and boundaries around the file

SERVICE_ERRORS = (ReleaseError, DeploymentError, FleetError, CampaignError)

# ---- the forms of names and numbers (fota.server.names): the schema states them, pydantic checks them
VersionStr = Annotated[str, Field(min_length=1, max_length=names.MAX_NAME, pattern=names.VERSION,
                                  description=f"release version: {names.describe(names.VERSION)}")]
NameStr = Annotated[str, Field(min_length=1, max_length=names.MAX_NAME, pattern=names.NAME,
                               description=names.describe(names.NAME))]
DeviceIdStr = Annotated[str, Field(min_length=1, max_length=names.MAX_NAME, pattern=names.DEVICE_ID,
                                   description=f"device id: {names.describe(names.DEVICE_ID)}")]
CampaignNameStr = Annotated[str, Field(min_length=1, max_length=names.MAX_NAME, pattern=names.CAMPAIGN_NAME,
                                       description=f"campaign name: {names.describe(names.CAMPAIGN_NAME)}")]
RowId = Annotated[int, Field(ge=1, le=names.MAX_DB_INT)]
ReleaseRef = Annotated[VersionStr | RowId, Field(description="release version (or id)")]
# Hardware form fields: one name, or several separated by commas
HARDWARE_FIELD = "^{0}(,{0})*$".format(names.NAME.removeprefix("^").removesuffix("$"))
# Audit log filters (actors are token names or cli:<user>): printable ASCII
AUDIT_FILTER = r"^[!-~]{1,128}$"
MAX_FILENAME = 128  # characters of an upload's file name kept in the audit log


# ---- response bodies -----------------------------------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class DeviceOut(_Out):
    id: str
    hardware: str | None
    version: str | None
    online: bool
    tags: list[str]
    created_at: datetime
    last_seen: datetime | None


class DeviceDetail(DeviceOut):
    inventory: dict[str, Any]


class StatusEventOut(_Out):
    id: int
    job_id: int | None
    state: str
    code: str | None
    reason: str | None
    progress: float | None
    version: str | None
    boot: int
    seq: int
    received_at: datetime
    ignored: str | None = Field(None, description="null: the status took effect (rejected, keys and health "
                                                  "statuses: it happened); otherwise why it did not: "
                                                  "other_device, no_such_job, job_ended")


class HistoryPageOut(BaseModel):
    statuses: list[StatusEventOut] = Field(description="at most `limit` statuses, in the order asked for")
    next_cursor: int | None = Field(description="pass it as `cursor` (same `order`) for the next page; "
                                                "null: this is the last page")


class ReleaseOut(_Out):
    id: int
    version: str
    kind: str
    size: int
    sha256: str
    hardware: list[str]
    key_id: str
    security_counter: int
    manifest: str = Field(description="the exact signed manifest text")
    signature: str = Field(description="ECDSA P-256 signature of the manifest, hex r||s")
    created_at: datetime
    deleted_at: datetime | None = Field(None, description="when it was deleted (listed only with deleted=true); "
                                                          "null: not deleted")


class ReleaseDeletedOut(BaseModel):
    id: int
    version: str
    deleted_at: datetime
    blobs_removed: list[str] = Field(description="sha256 of the blobs (image, patches) removed from the blobs "
                                                 "directory and object storage")
    patches_removed: int = Field(description="cached delta patches from or to its image, removed")
    image_kept_for: list[str] = Field(description="other releases with the same image: it stays for them")
    object_storage: bool = Field(description="the blobs were removed from object storage too")
    failures: list[str] = Field(description="files or objects that could not be removed (left behind)")


def _grace_field():
    return Field(DEFAULT_GRACE, ge=0, le=names.MAX_DB_INT,
                 description="seconds: a blob nothing names is removed only once it is that old (a release "
                             "or patch being made writes its blob before its row commits)")


class BlobGcIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace: int = _grace_field()
    dry_run: bool = Field(False, description="only list what would be removed: nothing changes")


class ReleasePruneIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: int = Field(DEFAULT_KEEP, ge=1, le=names.MAX_DB_INT,
                      description="newest releases kept per hardware type and kind (by version order)")
    dry_run: bool = Field(False, description="only list what would be deleted: nothing changes")
    grace: int = _grace_field()


class BlobOut(BaseModel):
    sha256: str
    size: int


class BlobGcOut(BaseModel):
    dry_run: bool
    grace: int
    files: list[BlobOut] = Field(description="blobs removed from the blobs directory (dry run: that would be), "
                                             "named by no live release and no patch, at least `grace` seconds old")
    objects: list[BlobOut] = Field(description="the same, from object storage (under its prefix)")
    young: int = Field(description="blobs named by nothing but younger than `grace`: a later run removes them")
    object_storage: bool = Field(description="object storage was swept too")
    failures: list[str] = Field(description="files or objects that could not be removed or listed")


class PrunedReleaseOut(BaseModel):
    version: str
    hardware: list[str]
    kind: str


class KeptReleaseOut(PrunedReleaseOut):
    why: list[str] = Field(description="why it stays: among the newest, running on devices, in use by …")


class ReleasePruneOut(BaseModel):
    keep: int
    dry_run: bool
    deleted: list[PrunedReleaseOut] = Field(description="the releases deleted (dry run: that would be), "
                                                        "in version order")
    kept: list[KeptReleaseOut] = Field(description="every other release, in version order, with why")
    blobs_removed: list[str] = Field(description="sha256 of the blobs removed (none in a dry run)")
    patches_removed: int
    object_storage: bool = Field(description="the blobs were removed from object storage too")
    failures: list[str] = Field(description="files or objects that could not be removed (left behind)")
    gc: BlobGcOut = Field(description="the garbage collection after the deletes (as POST /release-gc): "
                                      "what earlier failures left behind")


class JobOut(BaseModel):
    job: int
    device: str
    state: str
    code: str | None
    reason: str | None
    progress: float | None
    bytes_served: int
    sent_at: datetime | None
    sends: int = Field(0, description="how often the command was published: more than 1 after an expiry or "
                                      "when its online device never answered (docs/protocol.md §9)")
    updated_at: datetime | None


class DeploymentOut(BaseModel):
    id: int
    release: str
    state: str
    target: Any
    created_at: datetime
    min_battery: int | None = None
    timeout: int | None = None
    transport: str = "mqtt"
    counts: dict[str, int]
    progress: float
    jobs: list[JobOut]


class DeploymentCancelOut(DeploymentOut):
    withdrawn: list[int] = Field(description="pending jobs ended without being sent")
    cancelling: list[int] = Field(description="jobs sent a cancel command; they end when their device reports")
    finishing: list[int] = Field(description="jobs past their download: they finish on the device")


class AuditEventOut(_Out):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


class DeploymentIn(BaseModel):
    """Either ``devices`` or ``tag``."""

    # The schema states the rule too: exactly one of them is given (and not null)
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["devices"], "properties": {"devices": {"type": "array"}}},
        {"required": ["tag"], "properties": {"tag": {"type": "string"}}}]})
    release: ReleaseRef
    devices: list[DeviceIdStr] | None = Field(None, min_length=1, description="explicit device ids")
    tag: NameStr | None = Field(None, description="every device with this tag (and the release's hardware)")
    min_battery: int | None = Field(None, ge=0, le=100,
                                    description="battery % a device needs to download and to install")
    timeout: int | None = Field(None, ge=1, le=names.MAX_DB_INT,
                                description="seconds until unfinished jobs end 'timed_out'")
    transport: Literal["mqtt", "http"] = Field(
        "mqtt", description="payload transport: chunks over MQTT, or a signed URL over HTTP(S) to devices that "
                            "declare http (the others get chunks)")

    @model_validator(mode="after")
    def _one_target(self) -> DeploymentIn:
        if (self.devices is None) == (self.tag is None):
            raise ValueError("give either devices or tag")
        return self


class WaveOut(BaseModel):
    wave: int
    percent: float | None
    devices: list[str] | None
    tag: str | None
    success: float
    failure: float
    approval: bool
    total: int
    counts: dict[str, int]
    current: bool
    probation_ends_at: datetime | None = Field(description="when the wave's last device on probation may succeed")


class CampaignDeviceOut(BaseModel):
    device: str
    wave: int
    state: str
    attempts: int
    job: int | None
    job_state: str | None
    code: str | None
    reason: str | None
    confirmed_at: datetime | None
    probation_ends_at: datetime | None = Field(description="on probation: when it succeeds if it stays healthy")
    updated_at: datetime | None


DeviceStateName = Literal[DEVICE_STATES]  # a device's state in a campaign (campaigns.states)


class SkippedOut(BaseModel):
    reason: str
    devices: int


class WaveSizeOut(BaseModel):
    wave: int
    devices: int


class CampaignPreviewOut(BaseModel):
    targeted: int = Field(description="devices the campaign would drive")
    offline: int = Field(description="of them offline now (they start once online)")
    skipped: list[SkippedOut] = Field(description="devices matching the filter it would not drive, by reason "
                                                  "(other hardware, already on the version, too old, held)")
    waves: list[WaveSizeOut]
    unknown: list[str] = Field(description="a dynamic campaign: device ids and tags no device has yet")


class CampaignOut(BaseModel):
    id: int
    name: str
    release: str
    state: str
    wave: int = Field(description="current wave, 1-based")
    waves_total: int
    reason: str | None
    rate: float | None = Field(description="current starts per minute (None: no limit)")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]
    total: int = Field(description="targeted devices (skipped ones excluded)")
    counts: dict[str, int]
    progress: float = Field(description="share of the targeted devices that succeeded")
    window_open: bool | None = Field(description="inside the maintenance window (always, without one); None "
                                                 "once the campaign is aborting, aborted or done")
    window_opens_at: datetime | None = Field(description="next opening of the maintenance window, if closed")
    probation_ends_at: datetime | None = Field(description="when the last device now on probation may succeed")
    eta: datetime | None = Field(description="running: when it may end at the pace devices settled so far "
                                             "(windows, approvals and pauses not foreseen)")
    skipped: list[SkippedOut] = Field(description="skipped devices by reason")
    preview: CampaignPreviewOut | None = Field(description="a draft: what starting it now would target")
    waves: list[WaveOut]
    devices: list[CampaignDeviceOut] | None = None
    now: datetime | None = Field(default=None, description="the center's clock when this summary was made: "
                                 "the time stamps above are relative to it (a client's clock may differ)")


class CampaignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: CampaignNameStr
    release: ReleaseRef
    spec: dict[str, Any] = Field(default_factory=dict,
                                 description="filter, waves, pacing: see docs/campaigns.md")


class CampaignPreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: CampaignNameStr
    release: ReleaseRef
    spec: dict[str, Any] = Field(default_factory=dict, description="as for POST /campaigns")


class DeploymentBriefOut(BaseModel):
    id: int
    release: str
    state: str
    created_at: datetime


class WhoamiOut(BaseModel):
    name: str = Field(description="the token's name (the actor in the audit log)")
    role: str
    expires_at: datetime | None


class TokenOut(BaseModel):
    name: str
    role: str
    state: str = Field(description="active, expired or revoked")
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None


class TokenCreatedOut(TokenOut):
    secret: str = Field(description="the token's secret: shown only in this answer, stored nowhere")


# a token's name: the actor in the audit log (fota.server.auth.NAME_RE)
TOKEN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(pattern=TOKEN_NAME, description="1-64 of [A-Za-z0-9_.@-], from a letter or digit")]
    role: Literal[ROLES]
    ttl: int | None = Field(None, ge=1, le=MAX_TTL_SECONDS, description="expires after this many seconds "
                                                                      "(default: never)")


class BrokerAccountsOut(BaseModel):
    """What rewriting the broker's accounts from the registry did in the API's process
    (fota.server.accounts)."""
    kind: Literal["mosquitto", "nats", "external", "none"] = Field(
        description="mosquitto: the managed one; nats: a NATS cluster; external: a broker whose accounts fota does "
                    "not keep; none: this API process knows no home")
    applied: bool = Field(description="every broker process was told to reload here: the change is in force")
    file: str | None = Field(description="the password or users file rewritten (a path on the API's machine)")
    reloaded: list[str] = Field(description="pid files of the broker processes told to reload")
    not_reloaded: list[str] = Field(description="pid files of those not reached: not running, on another machine, "
                                                "or refused")
    refused: list[str] = Field(default_factory=list,
                               description="of those, the processes running on the API's machine as another OS user, "
                                           "which the API may not signal (EPERM): their user or root reloads them")
    missing: list[str] = Field(description="NATS: devices left out of the users file for want of a bcrypt hash")
    note: str | None = Field(description="what is left for the operator to do; null: nothing")
    error: str | None = Field(description="why the rewrite failed; the registry change stands and the next "
                                          "rewrite applies it (the same request again, or `fota serve` starting)")


class DeviceAccountOut(BaseModel):
    device: str
    broker: BrokerAccountsOut


class DeviceRekeyOut(DeviceAccountOut):
    password: str = Field(description="the device's new broker password: shown only in this answer, stored "
                                      "nowhere (the registry keeps hashes)")


class ErrorOut(BaseModel):
    detail: str


# ---- dependencies --------------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="an API token: `fota token create NAME --role read|admin`")


def get_store(request: Request) -> Store:
    """The store of this app (override in tests with app.dependency_overrides)."""
    return request.app.state.store


def current_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                  store: Annotated[Store, Depends(get_store)]) -> ApiToken:
    """The caller's token; 401 when missing, unknown, expired or revoked."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)", headers=challenge)
    try:
        return verify_token(store, credentials.credentials)
    except AuthError as exc:
        log.warning("API request refused: %s", exc)
        raise HTTPException(401, str(exc), headers=challenge) from None


def require_admin(token: Annotated[ApiToken, Depends(current_token)]) -> ApiToken:
    """The caller's token if it is an admin token; 403 otherwise."""
    if token.role != ADMIN:
        log.warning("API request refused: token %s (role %s) is not an admin token", token.name, token.role)
        raise HTTPException(403, f"token {token.name!r} has role {token.role!r}: this needs an admin token")
    return token


StoreDep = Annotated[Store, Depends(get_store)]
AdminDep = Annotated[ApiToken, Depends(require_admin)]
DeviceIdPath = Annotated[str, PathParam(min_length=1, max_length=names.MAX_NAME, pattern=names.DEVICE_ID)]
VersionPath = Annotated[str, PathParam(min_length=1, max_length=names.MAX_NAME, pattern=names.VERSION,
                                       description="release version (or id)")]
CampaignRefPath = Annotated[str, PathParam(min_length=1, max_length=names.MAX_NAME, pattern=names.NAME,
                                           description="campaign name (or id)")]
DeploymentIdPath = Annotated[int, PathParam(ge=1, le=names.MAX_DB_INT)]
NameQuery = Annotated[str | None, Query(min_length=1, max_length=names.MAX_NAME, pattern=names.NAME)]
DeletedQuery = Annotated[bool, Query(description="also deleted releases (their deleted_at set)")]


@contextmanager
def _service_errors(status_code: int) -> Iterator[None]:
    """Errors of the service modules -> status_code; a concurrent duplicate -> 409."""
    try:
        yield
    except (CampaignNotFound, DeploymentNotFound) as exc:
        raise HTTPException(404, str(exc)) from None
    except (CampaignStateError, DeploymentStateError) as exc:
        raise HTTPException(409, str(exc)) from None
    except SERVICE_ERRORS as exc:
        raise HTTPException(status_code, str(exc)) from None
    except IntegrityError:
        raise HTTPException(409, "conflict with a concurrent change; retry") from None


# ---- body size limit -----------------------------------------------------------------------------
class _BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes, before they are parsed.

    A declared Content-Length over the limit is refused at once; a body without one
    (chunked) is counted as it is read.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_json(send, 413, f"request body over {self.limit} bytes")
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _send_json(send, status: int, detail: str) -> None:
    import json
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---- routes --------------------------------------------------------------------------------------
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "missing, invalid, expired or revoked token"}}


def _location(collection: str, ref: str | int) -> str:
    """The Location of a created resource (names are checked ASCII words already; quoted all the same)."""
    return f"{API_PREFIX}/{collection}/{quote(str(ref), safe='+')}"


def _printable(text: str | None, limit: int) -> str | None:
    """``text`` cut to ``limit`` characters, control characters (NUL included) as '?': for the audit log."""
    if text is None:
        return None
    return "".join("?" if ord(ch) < 32 or ord(ch) == 127 else ch for ch in text[:limit])


def _one_or_more(schema: dict[str, Any]) -> None:
    """A repeatable form field's schema: one value, or an array of them.

    A form sends an array of one as a single field, read back as that one value: the schema
    says both, so that a client (or schemathesis) sending one field is schema-valid.
    """
    item = schema.pop("items")
    array = {"type": "array", "items": item, "minItems": schema.pop("minItems", 1)}
    schema.pop("type", None)
    schema["anyOf"] = [item, array]


def _any_bytes(schema: dict[str, Any]) -> None:
    """A file part's schema says ``format: binary`` too (OpenAPI 3.0's spelling of any bytes), so
    that schema checkers know a part sent as the bytes ``false`` is a file, not a boolean."""
    schema["format"] = "binary"


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the OpenAPI schema documents for ``path`` (a path's GET and POST may be two
    routes: the router's own 405 names only the first one's)."""
    templates = getattr(app.state, "path_templates", None)
    if templates is None:  # built once, from the schema the clients read
        templates = app.state.path_templates = [
            (re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)) + "$"),
             sorted(method.upper() for method in operations))
            for template, operations in app.openapi()["paths"].items()]
    return sorted({m for regex, methods in templates if regex.match(path) for m in methods})


async def _http_error(request: Request, exc: StarletteHTTPException):
    """FastAPI's handler, except that a 405's Allow lists every method the path has (as the schema does)."""
    allowed = _allowed_methods(request.app, request.url.path) if exc.status_code == 405 else None
    if allowed:
        return JSONResponse({"detail": "Method Not Allowed"}, 405, headers={"Allow": ", ".join(allowed)})
    return await http_exception_handler(request, exc)


def _trust(request: Request) -> dict | None:
    """The current trust document (read at each request: a rotation takes effect at once)."""
    loader = request.app.state.trust_loader
    return loader() if loader is not None else None


def _router() -> APIRouter:
    # Every route needs a valid token; admin routes add require_admin.
    router = APIRouter(prefix=API_PREFIX, dependencies=[Depends(current_token)], responses=UNAUTHORIZED)
    admin_responses: dict[int | str, dict[str, Any]] = {403: {"model": ErrorOut, "description": "not an admin token"}}
    # What a state change may answer besides 2xx, 401, 403 and 422 (_service_errors, _BodyLimit)
    change_responses = {**admin_responses,
                        400: {"model": ErrorOut, "description": "refused by a rule on stored data (see detail)"},
                        409: {"model": ErrorOut, "description": "conflict with a concurrent change, or the "
                                                                "state does not allow it"},
                        413: {"model": ErrorOut, "description": "request body too large"}}

    @router.get("/devices", response_model=list[DeviceOut], tags=["devices"])
    def devices(store: StoreDep, tag: NameQuery = None, hardware: NameQuery = None):
        """The fleet, by device id; optionally only devices with a tag and/or hardware type."""
        return list_devices(store, tag=tag, hardware=hardware)

    @router.get("/devices/{device_id}", response_model=DeviceDetail, tags=["devices"],
                responses={404: {"model": ErrorOut}})
    def device(device_id: DeviceIdPath, store: StoreDep):
        """One device, with its last inventory."""
        with _service_errors(404):
            return get_device(store, device_id)

    @router.get("/devices/{device_id}/history", response_model=HistoryPageOut, tags=["devices"],
                responses={404: {"model": ErrorOut}})
    def history(device_id: DeviceIdPath, store: StoreDep,
                limit: Annotated[int, Query(ge=1, le=HISTORY_MAX_LIMIT,
                                            description="statuses per page")] = HISTORY_LIMIT,
                # int, not int | None: a query parameter is absent or a number (no null in the schema)
                cursor: Annotated[int, Query(ge=0, le=2**63 - 1,
                                             description="`next_cursor` of the previous page")] = None,
                order: Annotated[Literal["asc", "desc"], Query(description="asc: oldest first; desc: newest "
                                                                            "first")] = "asc",
                ignored: Annotated[bool, Query(description="also the statuses that did not take effect "
                                                           "(marked with why)")] = False):
        """The statuses the device reported that took effect (those the retention policy keeps), a
        page at a time in the order stored; `next_cursor` gets the next page."""
        with _service_errors(404):
            get_device(store, device_id)
        rows, next_cursor = history_page(store, device_id, limit, cursor, newest_first=order == "desc",
                                         include_ignored=ignored)
        return {"statuses": rows, "next_cursor": next_cursor}

    def _account_change(request: Request, device_id: str, action: str, store: Store, token: ApiToken):
        sync = request.app.state.broker_sync
        with _service_errors(404):
            return change_account(store, device_id, action, token.name,
                                  sync if sync is not None else lambda _store: no_home_report())

    @router.post("/devices/{device_id}/rekey", response_model=DeviceRekeyOut, tags=["devices"],
                 responses={**change_responses, 404: {"model": ErrorOut}})
    def device_rekey(request: Request, device_id: DeviceIdPath, store: StoreDep, token: AdminDep):
        """A new broker password for a device (admin; audited as device.rekey), in this answer only:
        put it in the board's config.json (broker.password). The broker's accounts are rewritten
        from the registry and reloaded where the API's process can (`broker`): its old password is
        refused from then on. Its registry entry, payload key and history stay."""
        return _account_change(request, device_id, "rekey", store, token)

    @router.post("/devices/{device_id}/revoke", response_model=DeviceAccountOut, tags=["devices"],
                 responses={**change_responses, 404: {"model": ErrorOut}})
    def device_revoke(request: Request, device_id: DeviceIdPath, store: StoreDep, token: AdminDep):
        """Remove a device's broker account (admin; audited as device.revoke): rewritten from the
        registry and reloaded where the API's process can (`broker`), the broker refuses it from
        then on. Its registry entry, payload key and history stay; a rekey gives it a new account."""
        return _account_change(request, device_id, "revoke", store, token)

    @router.get("/releases", response_model=list[ReleaseOut], tags=["releases"])
    def releases(store: StoreDep, deleted: DeletedQuery = False):
        """Every release, oldest first; deleted ones only with deleted=true."""
        return list_releases(store, deleted=deleted)

    @router.get("/releases/{version}", response_model=ReleaseOut, tags=["releases"],
                responses={404: {"model": ErrorOut}})
    def release(version: VersionPath, store: StoreDep, deleted: DeletedQuery = False):
        """One release, by version (or id); a deleted one is 404 unless deleted=true."""
        with _service_errors(404):
            return get_release(store, version, deleted=deleted)

    @router.delete("/releases/{version}", response_model=ReleaseDeletedOut, tags=["releases"],
                   responses={**admin_responses, 404: {"model": ErrorOut},
                              409: {"model": ErrorOut, "description": "a deployment or campaign that has not "
                                                                      "finished uses it (named in detail)"}})
    def release_delete(request: Request, version: VersionPath, store: StoreDep, token: AdminDep):
        """Delete a release (admin): its image and the cached patches from or to it leave the blobs
        directory and object storage; the release is then listed only with deleted=true and refused for
        deployments and campaigns. 404: no such release (or deleted already); 409: in use."""
        try:
            return delete_release(store, request.app.state.blobs_dir, version, request.app.state.objects,
                                  actor=token.name)
        except ReleaseNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except ReleaseInUse as exc:
            raise HTTPException(409, str(exc)) from None
        except IntegrityError:
            raise HTTPException(409, "conflict with a concurrent change; retry") from None

    # Not /releases/prune: "prune" is a valid release version (/releases/{version}).
    @router.post("/release-prune", response_model=ReleasePruneOut, tags=["releases"],
                 responses=change_responses)
    def release_prune(request: Request, body: ReleasePruneIn, store: StoreDep, token: AdminDep):
        """Release retention (admin): per hardware type and kind the `keep` newest releases by
        version order stay, so do those a registered device runs and those a deployment or campaign
        that has not finished uses; the others are deleted as DELETE /releases/{version} deletes
        (audited as release.delete each, and release.prune); then the blobs nothing names any more
        go, as POST /release-gc removes them (`gc`). dry_run: only the lists."""
        try:
            return prune_releases(store, request.app.state.blobs_dir, body.keep, request.app.state.objects,
                                  actor=token.name, dry_run=body.dry_run, grace=body.grace)
        except IntegrityError:
            raise HTTPException(409, "conflict with a concurrent change; retry") from None

    # Not /releases/gc either ("gc" is a valid release version).
    @router.post("/release-gc", response_model=BlobGcOut, tags=["releases"], responses=change_responses)
    def release_gc(request: Request, body: BlobGcIn, store: StoreDep, token: AdminDep):
        """Garbage collection of blobs (admin): removes from this API's blobs directory and object
        storage the blobs (images, patches) that no live release and no patch names and that are at
        least `grace` seconds old: what a delete whose removal failed left behind (audited as
        release.gc). Other hosts' blobs directories: `fota release gc` there. dry_run: only the list."""
        return collect_garbage(store, request.app.state.blobs_dir, request.app.state.objects, grace=body.grace,
                               dry_run=body.dry_run, actor=token.name)

    @router.post("/releases", response_model=ReleaseOut, status_code=201, tags=["releases"],
                 responses={**change_responses, 503: {"model": ErrorOut}})
    def new_release(request: Request, response: Response, store: StoreDep, token: AdminDep,
                    file: Annotated[UploadFile, File(json_schema_extra=_any_bytes,
                                                     description="an image (.bin/.img; an ESP32 firmware: the .app-bin "
                                                                 "of an OTA build) or an app bundle file")],
                    version: Annotated[str, Form(min_length=1, max_length=names.MAX_NAME, pattern=names.VERSION,
                                                 description="release version, e.g. 1.1.0: "
                                                             + names.describe(names.VERSION))],
                    hardware: Annotated[list[Annotated[str, Field(max_length=1024, pattern=HARDWARE_FIELD)]],
                                        Form(min_length=1, json_schema_extra=_one_or_more,
                                             description="hardware type (repeat the field, "
                                                         "or separate with commas)")],
                    # not "| None": a form cannot send null; leaving the field out is the default
                    kind: Annotated[Literal[KINDS], Form(description=f"{' or '.join(KINDS)} "
                                                                     "(default: from the file)")] = None,
                    counter: Annotated[int, Form(ge=0, le=names.MAX_DB_INT,
                                                 description="security counter: devices refuse releases below "
                                                             "the highest counter they installed")] = 0,
                    encrypt: Annotated[bool, Form(description="encrypt the bundle (AES-256-CBC, key wrapped per "
                                                              "device); needs the home's key-encryption key")] = False,
                    min_version: Annotated[str, Form(min_length=1, max_length=names.MAX_NAME,
                                                     pattern=names.VERSION,
                                                     description="campaigns send it only to devices running at "
                                                                 "least this version")] = None):
        """Sign an uploaded image or bundle with the operator's key and store it (admin): the key
        stays on the server (`fota release create` in remote mode uploads here)."""
        limit = request.app.state.max_upload_bytes
        data = file.file.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(413, f"the file is over {limit} bytes")
        if kind is None and Path(file.filename or "").suffix.lower() in IMAGE_SUFFIXES:
            kind = "image"
        hw = [h for field in hardware for h in field.split(",")]
        try:
            key: ec.EllipticCurvePrivateKey = request.app.state.signing_key_loader()
        except Exception as exc:  # missing / unreadable key: the server's problem, not the request's
            log.error("signing key unavailable: %s", exc)
            raise HTTPException(503, f"the signing key is unavailable: {exc}") from None
        kek = None
        if encrypt and request.app.state.kek_loader is not None:
            try:
                kek = request.app.state.kek_loader()
            except Exception as exc:  # KekError: keys/kek lost while the database holds keys it wrapped
                log.error("key-encryption key unavailable: %s", exc)
                raise HTTPException(503, f"the key-encryption key is unavailable: {exc}") from None
        with _service_errors(400), audit.transaction(store) as tx:
            rel = create_release(tx, request.app.state.blobs_dir, key, data, version, hw, kind=kind,
                                 counter=counter, encrypt=encrypt, min_version=min_version, kek=kek,
                                 remote=request.app.state.objects)
            tx.flush()  # rel.id
            tx.record(token.name, "release.create", f"release:{rel.version}",
                      {"id": rel.id, "kind": rel.kind, "size": rel.size, "sha256": rel.sha256,
                       "hardware": list(rel.hardware), "key_id": rel.key_id,
                       "filename": _printable(file.filename, MAX_FILENAME)})
        response.headers["Location"] = _location("releases", rel.version)
        return rel

    @router.get("/deployments/{deployment_id}", response_model=DeploymentOut, tags=["deployments"],
                responses={404: {"model": ErrorOut}})
    def deployment(deployment_id: DeploymentIdPath, store: StoreDep):
        """A deployment: state, per-state counts, mean progress and every job."""
        with _service_errors(404):
            return deployment_summary(store, deployment_id)

    @router.post("/deployments", response_model=DeploymentOut, status_code=201, tags=["deployments"],
                 responses=change_responses)
    def new_deployment(request: Request, body: DeploymentIn, response: Response, store: StoreDep, token: AdminDep):
        """Deploy a release to devices or to a tag (admin); the control center sends the commands."""
        with _service_errors(400), audit.transaction(store) as tx:
            rel = get_release(tx, body.release)
            trust = _trust(request)
            if trust is not None:
                check_release_key(rel, trust)
            dep = create_deployment(tx, rel, device_ids=body.devices, tag=body.tag,
                                    min_battery=body.min_battery, timeout=body.timeout, transport=body.transport)
            tx.record(token.name, "deployment.create", f"deployment:{dep.id}",
                      {"release": rel.version, "target": dep.target,
                       "devices": [job.device_id for job in dep.jobs]})
        response.headers["Location"] = _location("deployments", dep.id)
        return deployment_summary(store, dep.id)

    @router.post("/deployments/{deployment_id}/cancel", response_model=DeploymentCancelOut, tags=["deployments"],
                 responses={**change_responses, 404: {"model": ErrorOut}})
    def deployment_cancel(deployment_id: DeploymentIdPath, store: StoreDep, token: AdminDep):
        """Stop a deployment (admin): pending jobs are not sent, downloads get a cancel command,
        devices past their download finish. A campaign's deployment: 409 (abort the campaign)."""
        with _service_errors(400), audit.transaction(store) as tx:
            with tx.session() as s:
                outcome = cancel_deployment(s, deployment_id, utcnow())
            tx.record(token.name, "deployment.cancel", f"deployment:{deployment_id}", outcome)
        return {**deployment_summary(store, deployment_id), **outcome}

    @router.get("/campaigns", response_model=list[CampaignOut], tags=["campaigns"])
    def campaigns(store: StoreDep):
        """Every campaign, oldest first: state, per-wave counts, progress (no per-device rows)."""
        return [campaign_summary(store, c.id, devices=False) for c in list_campaigns(store)]

    @router.get("/campaigns/{ref}", response_model=CampaignOut, tags=["campaigns"],
                responses={404: {"model": ErrorOut}})
    def campaign(ref: CampaignRefPath, store: StoreDep, devices: bool = True,
                 state: Annotated[list[DeviceStateName] | None,
                                  Query(description="only devices in this state (repeatable)")] = None,
                 wave: Annotated[int | None, Query(ge=1, le=names.MAX_DB_INT,
                                                   description="only devices of this wave")] = None,
                 offset: Annotated[int, Query(ge=0, le=names.MAX_DB_INT, description="skip this many devices")] = 0,
                 limit: Annotated[int | None, Query(ge=1, le=names.MAX_DB_INT,
                                                    description="at most this many devices")] = None):
        """A campaign by name or id: waves and (filterable, pageable) per-device states."""
        with _service_errors(404):
            summary = campaign_summary(store, ref, devices=devices, device_states=state, device_wave=wave)
        if devices:
            summary["devices"] = summary["devices"][offset:None if limit is None else offset + limit]
        return summary

    @router.post("/campaign-previews", response_model=CampaignPreviewOut, tags=["campaigns"],
                 responses={400: {"model": ErrorOut}})
    def campaign_preview(request: Request, body: CampaignPreviewIn, store: StoreDep):
        """What creating and starting this campaign now would do, without creating it (any token):
        the same checks as POST /campaigns (400 as there), then how many devices it targets, how
        many it skips and why, each wave's size."""
        with _service_errors(400):
            return preview_campaign(store, body.name, body.release, body.spec, trust=_trust(request))

    @router.post("/campaigns", response_model=CampaignOut, status_code=201, tags=["campaigns"],
                 responses=change_responses)
    def new_campaign(request: Request, body: CampaignIn, response: Response, store: StoreDep, token: AdminDep):
        """Create a draft campaign (admin); nothing is sent before it is started."""
        with _service_errors(400), audit.transaction(store) as tx:
            c = create_campaign(tx, body.name, body.release, body.spec, trust=_trust(request))
            tx.record(token.name, "campaign.create", f"campaign:{c.name}",
                      {"id": c.id, "release": body.release, "spec": c.spec})
        response.headers["Location"] = _location("campaigns", c.name)
        return campaign_summary(store, c.id)

    actions = {"start": start_campaign, "pause": pause_campaign, "resume": resume_campaign,
               "abort": abort_campaign}

    def _action(name: str):
        def act(request: Request, ref: CampaignRefPath, store: StoreDep, token: AdminDep):
            trust = _trust(request) if name in ("start", "resume") else None
            with _service_errors(400), audit.transaction(store) as tx:
                if trust is not None:  # they send the release: its signing key must be trusted
                    check_campaign_key(tx, ref, trust)
                c = actions[name](tx, ref)
                tx.record(token.name, f"campaign.{name}", f"campaign:{c.name}", {"id": c.id, "state": c.state})
            return campaign_summary(store, c.id, devices=False)
        act.__name__ = f"campaign_{name}"
        act.__doc__ = {"start": "Start a draft campaign: target the devices over the waves (admin).",
                       "pause": "No new device starts; devices in flight finish (admin).",
                       "resume": "Continue a paused campaign, or approve a waiting campaign's next wave (admin).",
                       "abort": "Stop: downloads are cancelled, devices past their download finish (admin).",
                       }[name]
        return act

    for name in actions:
        router.add_api_route(f"/campaigns/{{ref}}/{name}", _action(name), methods=["POST"],
                             response_model=CampaignOut, tags=["campaigns"],
                             responses={**change_responses, 404: {"model": ErrorOut}})

    @router.get("/whoami", response_model=WhoamiOut, tags=["tokens"])
    def whoami(token: Annotated[ApiToken, Depends(current_token)]):
        """The caller's token: its name, role and expiry (`fota login` checks a token with it)."""
        return {"name": token.name, "role": token.role, "expires_at": token.expires_at}

    @router.get("/deployments", response_model=list[DeploymentBriefOut], tags=["deployments"])
    def deployments(store: StoreDep,
                    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many")] = 20):
        """The newest deployments, newest first (`fota status` without --deployment shows the first)."""
        return recent_deployments(store, limit)

    def _token_out(token: ApiToken) -> dict[str, Any]:
        return {"name": token.name, "role": token.role, "state": token_state(token),
                "created_at": token.created_at, "expires_at": token.expires_at,
                "last_used_at": token.last_used_at}

    @router.get("/tokens", response_model=list[TokenOut], tags=["tokens"], responses=admin_responses)
    def tokens(store: StoreDep, _: AdminDep):
        """Every API token, oldest first, never their secrets (admin)."""
        return [_token_out(t) for t in list_tokens(store)]

    @router.post("/tokens", response_model=TokenCreatedOut, status_code=201, tags=["tokens"],
                 responses=change_responses)
    def new_token(body: TokenIn, response: Response, store: StoreDep, token: AdminDep):
        """Create an API token (admin); its secret is in this answer only (the store keeps its SHA-256).
        A name in use (revoked tokens included): 400."""
        try:
            created, secret = create_token(store, body.name, body.role, body.ttl, actor=token.name)
        except AuthError as exc:
            raise HTTPException(400, str(exc)) from None
        response.headers["Location"] = _location("tokens", created.name)
        return {**_token_out(created), "secret": secret}

    @router.post("/tokens/{name}/revoke", response_model=TokenOut, tags=["tokens"],
                 responses={**change_responses, 404: {"model": ErrorOut}})
    def token_revoke(name: Annotated[str, PathParam(pattern=TOKEN_NAME)], store: StoreDep, token: AdminDep):
        """Revoke an API token for good (admin): 404 if there is none of that name, 409 if revoked already."""
        if not any(t.name == name for t in list_tokens(store)):
            raise HTTPException(404, f"no token named {name!r}")
        try:
            return _token_out(revoke_token(store, name, actor=token.name))
        except AuthError as exc:
            raise HTTPException(409, str(exc)) from None

    @router.get("/audit", response_model=list[AuditEventOut], tags=["audit"], responses=admin_responses)
    def audit_log(store: StoreDep, _: AdminDep,
                  limit: Annotated[int, Query(ge=1, le=audit.MAX_LIMIT)] = audit.DEFAULT_LIMIT,
                  actor: Annotated[str | None, Query(max_length=128, pattern=AUDIT_FILTER)] = None,
                  action: Annotated[str | None, Query(max_length=128, pattern=AUDIT_FILTER)] = None):
        """The audit log, newest first (admin)."""
        return audit.list_events(store, limit, actor=actor, action=action)

    return router


def create_app(store: Store, blobs_dir: str | os.PathLike,
               signing_key_loader: Callable[[], ec.EllipticCurvePrivateKey], *,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               trust_loader: Callable[[], dict] | None = None,
               kek_loader: Callable[[], Any] | None = None,
               url_key: bytes | Callable[[], bytes] | None = None, objects: Any = None,
               broker_sync: Callable[[Store], dict[str, Any]] | None = None) -> FastAPI:
    """The API app on ``store``; releases go to ``blobs_dir``, signed with signing_key_loader()'s key.

    trust_loader: the keyring's current trust document; given, deployments and campaigns of a
    release signed by a key devices refuse (revoked, not certified) are refused with 400.
    kek_loader: the home's key-encryption key (Home.kek); without it an encrypted release is
    refused with 400.
    url_key: the key of transport http's signed payload URLs (fota.server.kek.Kek.url_key), or what
    loads it at the first blob request; given, the app also serves release and delta blobs to
    devices at /v1/blobs/ (fota.server.blobhttp).
    objects: object storage (fota.server.objectstore.S3Payloads, Home.object_store), the blobs'
    source of truth: a release's image is written there when it is created, and the blob route
    reads a blob missing from blobs_dir from there.
    broker_sync: rewrites the broker's accounts from the store after a device's account changed and
    says what it did (``lambda store: fota.server.accounts.broker_sync(home, store)``, as `fota api`
    passes); None: not rewritten, and the answers say so.

    The key is loaded for each release created (never kept in memory between requests).
    """
    app = FastAPI(title="fota control center", version="1",
                  description="Signed firmware updates over MQTT: the operators' API. "
                              "Authenticate with `Authorization: Bearer <token>`.")
    app.state.store = store
    app.state.blobs_dir = Path(blobs_dir)
    app.state.signing_key_loader = signing_key_loader
    app.state.trust_loader = trust_loader
    app.state.kek_loader = kek_loader
    app.state.objects = objects
    app.state.broker_sync = broker_sync
    app.state.max_upload_bytes = max_upload_bytes
    app.include_router(_router())
    app.add_exception_handler(StarletteHTTPException, _http_error)

    @app.get("/metrics", tags=["metrics"], dependencies=[Depends(current_token)],
             response_class=Response, responses={200: {"content": {"text/plain": {}}}, **UNAUTHORIZED})
    def prometheus_metrics(store: StoreDep):
        """Prometheus exposition (needs a token: a read token in the scrape config's authorization)."""
        return Response(metrics.render(store), media_type=metrics.CONTENT_TYPE_LATEST)
    if url_key is not None:
        from fota.server import blobhttp
        blobhttp.mount(app, store, blobs_dir, url_key, remote=objects)
    from fota.server.dashboard import mount
    mount(app)  # the web dashboard under /ui (docs/dashboard.md): same store, same tokens
    app.add_middleware(_BodyLimit, limit=max_upload_bytes + MULTIPART_OVERHEAD)
    return app
