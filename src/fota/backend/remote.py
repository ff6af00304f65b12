"""The remote backend: the control center's HTTP API (fota.server.api), with an API token.

The server does the work with its own keys (it signs uploaded releases) and records state
changes in the audit log under the token's name; the token's role decides what is allowed.
Answers are returned as the local backend returns them (datetimes parsed); every failure
becomes one line for the operator (CLIError), never a traceback.
"""
from __future__ import annotations

import ssl
from datetime import datetime
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import httpx

from fota.backend.login import API_PREFIX, TOKEN_ENV, Remote
from fota.cli_common import fail

TIMEOUT = httpx.Timeout(30.0, connect=10.0)


def _parse_times(value: Any, key: str = "") -> Any:
    """The API's JSON with its time stamps (keys *_at, last_seen, eta) as aware datetimes."""
    if isinstance(value, dict):
        return {k: _parse_times(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_parse_times(v, key) for v in value]
    if isinstance(value, str) and (key.endswith("_at") or key in ("last_seen", "eta", "now")):
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value


def _detail(response: httpx.Response) -> str | None:
    """The error's text: the API's {"detail": ...} (a 422's list of problems in one line); None
    when the answer is not of fota's API (another server at that URL, a proxy's error page)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return None
    if detail is None:
        return None
    if isinstance(detail, list):  # FastAPI's validation errors
        return "invalid request: " + "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', [])[1:]) or 'request'}: {d.get('msg')}"
            + (f" (got {d['input']!r})" if "input" in d and not isinstance(d["input"], (dict, list)) else "")
            for d in detail if isinstance(d, dict))
    return str(detail)


class RemoteBackend:
    mode = "remote"

    def __init__(self, remote: Remote):
        self.remote = remote
        self.url = remote.url
        verify: Any = True
        if remote.ca:
            if not Path(remote.ca).is_file():
                fail(f"the CA file {remote.ca} does not exist")
            try:
                verify = ssl.create_default_context(cafile=remote.ca)
            except (ssl.SSLError, ValueError) as e:
                fail(f"the CA file {remote.ca} is not a PEM certificate: {e}")
        self.client = httpx.Client(base_url=remote.url + API_PREFIX, verify=verify, timeout=TIMEOUT,
                                   headers={"Authorization": f"Bearer {remote.token}"})

    # ---- HTTP -----------------------------------------------------------------------------------
    def call(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.ConnectError as e:
            text = str(e)
            if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
                fail(f"the control center at {self.url} has a certificate this machine does not trust ({text}): "
                     "for a private CA give its certificate with --ca (fota login) or FOTA_CA")
            fail(f"cannot reach the control center at {self.url}: {text or type(e).__name__}")
        except httpx.TimeoutException:
            fail(f"the control center at {self.url} did not answer in time")
        except httpx.HTTPError as e:
            fail(f"talking to the control center at {self.url} failed: {e or type(e).__name__}")
        status = response.status_code
        detail = _detail(response) if status >= 400 else None
        if status >= 400 and detail is None:
            fail(f"{self.url} answered {status} {response.reason_phrase} to {method} {API_PREFIX}{path}, "
                 "not as fota's API does: is it the control center's URL?")
        if status == 401:
            again = (f"check {TOKEN_ENV}" if self.remote.source == "environment"
                     else f"log in again with a valid token (fota login {self.url})")
            fail(f"the control center at {self.url} refused the token ({detail}): {again}")
        if status >= 400:
            fail(detail if status < 500 or status == 503
                 else f"the control center at {self.url} answered {status}: {detail}")
        try:
            return _parse_times(response.json())
        except ValueError:
            fail(f"{self.url} answered {method} {API_PREFIX}{path} with something other than fota's API's JSON: "
                 "is it the control center's URL?")

    def get(self, path: str, **params) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Optional[dict] = None, **kwargs) -> Any:
        return self.call("POST", path, json=body, **kwargs) if body is not None else self.call("POST", path, **kwargs)

    # ---- identity -------------------------------------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        return self.get("/whoami")

    # ---- releases -------------------------------------------------------------------------------
    def releases(self, deleted: bool = False) -> list[dict[str, Any]]:
        return self.get("/releases", deleted="true" if deleted else None)

    def delete_release(self, version: str) -> dict[str, Any]:
        return self.call("DELETE", f"/releases/{quote(version, safe='')}")

    def prune_releases(self, keep: int, dry_run: bool, grace: int) -> dict[str, Any]:
        return self.post("/release-prune", {"keep": keep, "dry_run": dry_run, "grace": grace})

    def collect_garbage(self, grace: int, dry_run: bool) -> dict[str, Any]:
        return self.post("/release-gc", {"grace": grace, "dry_run": dry_run})

    def create_release(self, path: Path, version: str, hardware: list[str], *, counter: int, encrypt: bool,
                       min_version: Optional[str]) -> dict[str, Any]:
        """Upload the image, or the bundle packed here from an app directory; the server signs it."""
        from fota.tools import bundle
        if path.is_dir():
            try:
                data, kind, filename = bundle.pack_dir(path), "bundle", f"{path.name}.bundle"
            except bundle.BundleError as e:
                fail(f"{path}: {e}")
        else:
            data, kind, filename = path.read_bytes(), None, path.name
        form: dict[str, Any] = {"version": version, "hardware": list(hardware), "counter": str(counter),
                                "encrypt": "true" if encrypt else "false"}
        if kind:
            form["kind"] = kind
        if min_version is not None:
            form["min_version"] = min_version
        return self.call("POST", "/releases", data=form, files={"file": (filename, data)})

    # ---- devices --------------------------------------------------------------------------------
    def devices(self, tag: Optional[str]) -> list[dict[str, Any]]:
        return self.get("/devices", tag=tag)

    def history(self, device_id: str, limit: int, cursor: Optional[int], newest: bool,
                ignored: bool) -> tuple[list[dict[str, Any]], Optional[int]]:
        page = self.get(f"/devices/{quote(device_id, safe='')}/history", limit=limit, cursor=cursor,
                        order="desc" if newest else "asc", ignored="true" if ignored else None)
        return page["statuses"], page["next_cursor"]

    def change_account(self, action: str, device_id: str) -> dict[str, Any]:
        """rekey or revoke: the server changes the account and rewrites its broker's accounts."""
        return self.post(f"/devices/{quote(device_id, safe='')}/{action}")

    # ---- deployments ----------------------------------------------------------------------------
    def deploy(self, release: str, devices: Optional[list[str]], tag: Optional[str], *,
               min_battery: Optional[int], timeout: Optional[int], transport: str = "mqtt") -> dict[str, Any]:
        body: dict[str, Any] = {"release": release, "transport": transport}
        body.update({k: v for k, v in (("devices", devices), ("tag", tag), ("min_battery", min_battery),
                                       ("timeout", timeout)) if v is not None})
        return self.post("/deployments", body)

    def deployment(self, deployment_id: Optional[int]) -> dict[str, Any]:
        if deployment_id is None:
            latest = self.get("/deployments", limit=1)
            if not latest:
                fail("no deployments")
            deployment_id = latest[0]["id"]
        return self.get(f"/deployments/{deployment_id}")

    def cancel_deployment(self, deployment_id: int) -> dict[str, Any]:
        return self.post(f"/deployments/{deployment_id}/cancel")

    # ---- API tokens -----------------------------------------------------------------------------
    def tokens(self) -> list[dict[str, Any]]:
        return self.get("/tokens")

    def create_token(self, name: str, role: str, ttl: Optional[int]) -> tuple[dict[str, Any], str]:
        created = self.post("/tokens", {"name": name, "role": role, **({"ttl": ttl} if ttl is not None else {})})
        return created, created.pop("secret")

    def revoke_token(self, name: str) -> None:
        self.post(f"/tokens/{quote(name, safe='')}/revoke")

    # ---- campaigns ------------------------------------------------------------------------------
    def campaign_preview(self, name: str, release: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.post("/campaign-previews", {"name": name, "release": release, "spec": spec})

    def campaign_create(self, name: str, release: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.post("/campaigns", {"name": name, "release": release, "spec": spec})

    def campaign_act(self, action: str, name: str) -> dict[str, Any]:
        return self.post(f"/campaigns/{quote(name, safe='')}/{action}")

    def campaigns(self) -> list[dict[str, Any]]:
        return self.get("/campaigns")

    def latest_campaign(self) -> Optional[str]:
        campaigns = self.campaigns()
        return str(campaigns[-1]["id"]) if campaigns else None

    def campaign(self, ref: str, devices: bool, states: Optional[list[str]] = None,
                 wave: Optional[int] = None) -> dict[str, Any]:
        return self.get(f"/campaigns/{quote(ref, safe='')}", devices="true" if devices else "false",
                        state=states or None, wave=wave)
