"""The local backend: today's code on the control center's home (its store, keys and blobs).

Every method returns plain data of the same form as fota.backend.remote's (the API's JSON with
datetimes parsed), raises CLIError (fota.cli_common.fail) for the operator, and records state
changes in the audit log as "cli:<os user>".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from fota.cli_common import audit, fail, open_store, signing_key
from fota.server.home import Home


class LocalBackend:
    mode = "local"

    def __init__(self, home: Optional[Path]):
        self.home = Home.locate(home)
        self._store = None

    @property
    def store(self):
        if self._store is None:
            self._store = open_store(self.home)
        return self._store

    # ---- releases -----------------------------------------------------------------------------
    def releases(self, deleted: bool = False) -> list[dict[str, Any]]:
        from fota.server.releases import list_releases
        return [_release(r) for r in list_releases(self.store, deleted=deleted)]

    def delete_release(self, version: str) -> dict[str, Any]:
        from fota.server.audit import cli_actor
        from fota.server.release_delete import delete_release
        from fota.server.releases import ReleaseError
        try:
            return delete_release(self.store, self.home.blobs, version, self.home.object_store(), actor=cli_actor())
        except ReleaseError as e:
            fail(str(e))

    def prune_releases(self, keep: int, dry_run: bool, grace: int) -> dict[str, Any]:
        from fota.server.audit import cli_actor
        from fota.server.release_prune import prune_releases
        from fota.server.releases import ReleaseError
        try:
            return prune_releases(self.store, self.home.blobs, keep, self.home.object_store(), actor=cli_actor(),
                                  dry_run=dry_run, grace=grace)
        except ReleaseError as e:
            fail(str(e))

    def collect_garbage(self, grace: int, dry_run: bool) -> dict[str, Any]:
        from fota.server.audit import cli_actor
        from fota.server.blob_gc import collect_garbage
        return collect_garbage(self.store, self.home.blobs, self.home.object_store(), grace=grace, dry_run=dry_run,
                               actor=cli_actor())

    def create_release(self, path: Path, version: str, hardware: list[str], *, counter: int, encrypt: bool,
                       min_version: Optional[str]) -> dict[str, Any]:
        from fota.server.releases import ReleaseError, create_release
        key = signing_key(self.home)
        h = self.home
        try:
            rel = create_release(self.store, h.blobs, key, path, version, hardware, counter=counter,
                                 encrypt=encrypt, min_version=min_version, kek=h.kek() if encrypt else None,
                                 remote=h.object_store())
        except (ReleaseError, ValueError) as e:
            fail(str(e))
        audit(self.store, "release.create", f"release:{rel.version}",
              {"id": rel.id, "kind": rel.kind, "size": rel.size, "sha256": rel.sha256,
               "hardware": list(rel.hardware), "key_id": rel.key_id})
        return _release(rel)

    # ---- devices ------------------------------------------------------------------------------
    def devices(self, tag: Optional[str]) -> list[dict[str, Any]]:
        from fota.server.fleet import list_devices
        return [{"id": d.id, "hardware": d.hardware, "version": d.version, "online": d.online,
                 "tags": list(d.tags or []), "last_seen": d.last_seen} for d in list_devices(self.store, tag=tag)]

    def history(self, device_id: str, limit: int, cursor: Optional[int], newest: bool,
                ignored: bool) -> tuple[list[dict[str, Any]], Optional[int]]:
        from fota.server.deployments import history_page
        from fota.server.fleet import FleetError, get_device
        try:
            get_device(self.store, device_id)  # an unknown device is an error, as through the API
        except FleetError as e:
            fail(str(e))
        rows, cursor = history_page(self.store, device_id, limit, cursor, newest_first=newest,
                                    include_ignored=ignored)
        return [{"received_at": e.received_at, "job_id": e.job_id, "state": e.state, "code": e.code,
                 "reason": e.reason, "version": e.version, "ignored": e.ignored} for e in rows], cursor

    def change_account(self, action: str, device_id: str) -> dict[str, Any]:
        """rekey or revoke a device's broker account, then rewrite the home's broker accounts
        (fota.server.accounts: {"device", "broker"[, "password"]})."""
        from fota.server.accounts import broker_sync, change_account
        from fota.server.audit import cli_actor
        from fota.server.fleet import FleetError
        try:
            return change_account(self.store, device_id, action, cli_actor(),
                                  lambda store: broker_sync(self.home, store))
        except FleetError as e:
            fail(str(e))

    # ---- deployments --------------------------------------------------------------------------
    def deploy(self, release: str, devices: Optional[list[str]], tag: Optional[str], *,
               min_battery: Optional[int], timeout: Optional[int], transport: str = "mqtt") -> dict[str, Any]:
        from fota.server.deployments import DeploymentError, create_deployment, deployment_summary
        from fota.server.releases import ReleaseError, check_release_key, get_release
        store = self.store
        try:
            rel = get_release(store, release)
            check_release_key(rel, self.home.keyring.trust())
            dep = create_deployment(store, rel, device_ids=devices, tag=tag, min_battery=min_battery,
                                    timeout=timeout, transport=transport)
        except (DeploymentError, ReleaseError, LookupError) as e:
            fail(str(e))
        audit(store, "deployment.create", f"deployment:{dep.id}",
              {"release": rel.version, "target": dep.target, "devices": [j.device_id for j in dep.jobs],
               "min_battery": min_battery, "timeout": timeout, "transport": transport})
        return deployment_summary(store, dep.id)

    def deployment(self, deployment_id: Optional[int]) -> dict[str, Any]:
        from fota.deployment_view import local_deployment
        dep = local_deployment(self.store, deployment_id)
        if dep is None:
            fail("no deployments" if deployment_id is None else f"no deployment {deployment_id}")
        return dep

    def cancel_deployment(self, deployment_id: int) -> dict[str, Any]:
        from fota.server import audit as audit_log
        from fota.server.deployments import DeploymentError, cancel_deployment
        from fota.server.store import utcnow
        try:
            with audit_log.transaction(self.store) as tx:
                with tx.session() as s:
                    outcome = cancel_deployment(s, deployment_id, utcnow())
                tx.record(audit_log.cli_actor(), "deployment.cancel", f"deployment:{deployment_id}", outcome)
        except DeploymentError as e:
            fail(str(e))
        return outcome

    # ---- API tokens ---------------------------------------------------------------------------
    def tokens(self) -> list[dict[str, Any]]:
        from fota.server.auth import list_tokens
        return [_token(t) for t in list_tokens(self.store)]

    def create_token(self, name: str, role: str, ttl: Optional[int]) -> tuple[dict[str, Any], str]:
        from fota.server.audit import cli_actor
        from fota.server.auth import AuthError, create_token
        try:
            token, secret = create_token(self.store, name, role, ttl, actor=cli_actor())
        except AuthError as e:
            fail(str(e))
        return _token(token), secret

    def revoke_token(self, name: str) -> None:
        from fota.server.audit import cli_actor
        from fota.server.auth import AuthError, revoke_token
        try:
            revoke_token(self.store, name, actor=cli_actor())
        except AuthError as e:
            fail(str(e))

    # ---- campaigns ----------------------------------------------------------------------------
    def campaign_preview(self, name: str, release: str, spec: dict[str, Any]) -> dict[str, Any]:
        from fota.server.campaigns import CampaignError, preview_campaign
        try:
            return preview_campaign(self.store, name, release, spec, trust=self.home.keyring.trust())
        except CampaignError as e:
            fail(str(e))

    def campaign_create(self, name: str, release: str, spec: dict[str, Any]) -> dict[str, Any]:
        from fota.server import audit as audit_log
        from fota.server.campaigns import CampaignError, campaign_summary, create_campaign
        try:
            with audit_log.transaction(self.store) as tx:
                c = create_campaign(tx, name, release, spec, trust=self.home.keyring.trust())
                tx.record(audit_log.cli_actor(), "campaign.create", f"campaign:{c.name}",
                          {"id": c.id, "release": release, "spec": c.spec})
        except CampaignError as e:
            fail(str(e))
        return campaign_summary(self.store, c.id, devices=False)

    def campaign_act(self, action: str, name: str) -> dict[str, Any]:
        from fota.server import audit as audit_log
        from fota.server.campaigns import (CampaignError, abort_campaign, campaign_summary, check_campaign_key,
                                           pause_campaign, resume_campaign, start_campaign)
        fn = {"start": start_campaign, "pause": pause_campaign, "resume": resume_campaign,
              "abort": abort_campaign}[action]
        try:
            if action in ("start", "resume"):  # they send the release: its signing key must be trusted
                check_campaign_key(self.store, name, self.home.keyring.trust())
            with audit_log.transaction(self.store) as tx:
                c = fn(tx, name)
                tx.record(audit_log.cli_actor(), f"campaign.{action}", f"campaign:{c.name}",
                          {"id": c.id, "state": c.state})
        except CampaignError as e:
            fail(str(e))
        return campaign_summary(self.store, c.id, devices=False)

    def campaigns(self) -> list[dict[str, Any]]:
        from fota.server.campaigns import campaign_summary, list_campaigns
        return [campaign_summary(self.store, c.id, devices=False) for c in list_campaigns(self.store)]

    def latest_campaign(self) -> Optional[str]:
        from fota.server.campaigns import list_campaigns
        campaigns = list_campaigns(self.store)
        return str(campaigns[-1].id) if campaigns else None

    def campaign(self, ref: str, devices: bool, states: Optional[list[str]] = None,
                 wave: Optional[int] = None) -> dict[str, Any]:
        from fota.server.campaigns import CampaignError, campaign_summary
        try:
            return campaign_summary(self.store, ref, devices=devices, device_states=states, device_wave=wave)
        except CampaignError as e:
            fail(str(e))


def _release(r) -> dict[str, Any]:
    return {"id": r.id, "version": r.version, "kind": r.kind, "size": r.size, "hardware": list(r.hardware),
            "sha256": r.sha256, "key_id": r.key_id, "deleted_at": r.deleted_at}


def _token(t) -> dict[str, Any]:
    from fota.server.auth import token_state
    return {"name": t.name, "role": t.role, "state": token_state(t), "created_at": t.created_at,
            "expires_at": t.expires_at, "last_used_at": t.last_used_at}
