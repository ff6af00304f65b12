"""`fota campaign …`: create, start, pause, resume, abort and watch staged rollouts."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from fota.cli_common import HomeOpt, console, fail, open_store
from fota.server.home import Home

campaign_app = typer.Typer(no_args_is_help=True, help="Staged rollouts: waves, thresholds, pacing.")

FINISHED = ("done", "aborted")
KEY_CHECKED_ACTIONS = ("start", "resume")  # they send the release: its signing key must be trusted


def _spec_from_options(spec_file: Optional[Path], options: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if spec_file is not None:
        try:
            spec = json.loads(spec_file.read_text())
        except (OSError, ValueError) as e:
            fail(f"cannot read the spec file {spec_file}: {e}")
        if not isinstance(spec, dict):
            fail("the spec file must hold a JSON object")
    filt = dict(spec.get("filter") or {})
    for key in ("hardware", "tags", "versions", "devices"):
        if options[key]:
            filt[key] = list(options[key])
    if options["online"] is not None:
        filt["online"] = options["online"]
    for item in options["where"]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--where needs KEY=VALUE, not {item!r}")
        try:
            filt.setdefault("inventory", {})[key] = json.loads(value)
        except ValueError:
            filt.setdefault("inventory", {})[key] = value
    if filt:
        spec["filter"] = filt
    if options["waves"]:
        try:
            spec["waves"] = [float(p) for p in options["waves"].split(",")]
        except ValueError:
            fail(f"--waves needs percentages like 1,10,50,100, not {options['waves']!r}")
    if options["approval"]:
        spec["waves"] = [dict(w if isinstance(w, dict) else {"percent": w}, approval=True)
                         for w in spec.get("waves", [1, 10, 50, 100])]
    for key in ("success", "failure", "on_failure", "max_in_flight", "rate", "rate_growth", "max_rate",
                "retries", "backoff", "probation"):
        if options[key] is not None:
            spec[key] = options[key]
    if options["dynamic"]:
        spec["dynamic"] = True
    if options["window_cron"]:
        spec["window"] = {"cron": options["window_cron"], "minutes": options["window_minutes"],
                          "tz": options["window_tz"]}
    timeouts = {k: options[f"timeout_{k}"] for k in ("download", "install", "confirm")
                if options[f"timeout_{k}"] is not None}
    if timeouts:
        spec["timeouts"] = dict(spec.get("timeouts") or {}, **timeouts)
    return spec


@campaign_app.command("create")
def create(name: str = typer.Argument(..., help="campaign name"),
           release: str = typer.Option(..., "--release", help="release version or id"),
           spec_file: Optional[Path] = typer.Option(None, "--spec", help="JSON file with the whole spec "
                                                                          "(options below override it)"),
           hardware: List[str] = typer.Option([], "--hardware", help="filter: hardware type (repeatable)"),
           tag: List[str] = typer.Option([], "--tag", help="filter: the device has this tag (repeatable)"),
           version: List[str] = typer.Option([], "--running", help="filter: running version (repeatable)"),
           device: List[str] = typer.Option([], "--device", help="filter: device id (repeatable)"),
           online: Optional[bool] = typer.Option(None, "--online/--offline", help="filter: online state"),
           where: List[str] = typer.Option([], "--where", help="filter: inventory KEY=VALUE (repeatable)"),
           waves: Optional[str] = typer.Option(None, "--waves", help="cumulative percentages, e.g. 1,10,50,100"),
           approval: bool = typer.Option(False, "--approval", help="wait for 'resume' after every wave"),
           success: Optional[float] = typer.Option(None, "--success", help="% of a wave that must succeed"),
           failure: Optional[float] = typer.Option(None, "--failure", help="more than this % failed: on-failure"),
           on_failure: Optional[str] = typer.Option(None, "--on-failure", help="pause | abort"),
           max_in_flight: Optional[int] = typer.Option(None, "--max-in-flight"),
           rate: Optional[float] = typer.Option(None, "--rate", help="device starts per minute"),
           rate_growth: Optional[float] = typer.Option(None, "--rate-growth",
                                                       help="rate factor per minute while none fails"),
           max_rate: Optional[float] = typer.Option(None, "--max-rate"),
           window_cron: Optional[str] = typer.Option(None, "--window-cron",
                                                     help="maintenance window start, cron, e.g. '0 2 * * *'"),
           window_minutes: int = typer.Option(120, "--window-minutes", help="how long the window stays open"),
           window_tz: str = typer.Option("UTC", "--window-tz", help="time zone of the cron, e.g. Europe/Berlin"),
           probation: Optional[int] = typer.Option(None, "--probation", help="seconds healthy after confirming"),
           retries: Optional[int] = typer.Option(None, "--retries"),
           backoff: Optional[int] = typer.Option(None, "--backoff", help="seconds before the first retry"),
           timeout_download: Optional[int] = typer.Option(None, "--timeout-download"),
           timeout_install: Optional[int] = typer.Option(None, "--timeout-install"),
           timeout_confirm: Optional[int] = typer.Option(None, "--timeout-confirm"),
           dynamic: bool = typer.Option(False, "--dynamic", help="devices matching later join while it runs"),
           home: Optional[Path] = HomeOpt):
    """Create a draft campaign (nothing is sent before 'fota campaign start')."""
    from fota.server import audit
    from fota.server.campaigns import CampaignError, create_campaign
    options = dict(locals())
    options.update(tags=tag, versions=version, devices=device)
    spec = _spec_from_options(spec_file, options)
    h = Home.locate(home)
    store = open_store(h)
    try:
        with audit.transaction(store) as tx:
            c = create_campaign(tx, name, release, spec, trust=h.keyring.trust())
            tx.record(audit.cli_actor(), "campaign.create", f"campaign:{c.name}",
                      {"id": c.id, "release": release, "spec": c.spec})
    except CampaignError as e:
        fail(str(e))
    console.print(f"campaign {c.name} (id {c.id}): release {release}, {len(c.spec['waves'])} wave(s), draft")


def _act(action: str, name: str, home: Optional[Path]) -> None:
    from fota.server import audit
    from fota.server.campaigns import (CampaignError, abort_campaign, check_campaign_key, pause_campaign,
                                       resume_campaign, start_campaign)
    fn = {"start": start_campaign, "pause": pause_campaign, "resume": resume_campaign,
          "abort": abort_campaign}[action]
    h = Home.locate(home)
    store = open_store(h)
    try:
        if action in KEY_CHECKED_ACTIONS:
            check_campaign_key(store, name, h.keyring.trust())
        with audit.transaction(store) as tx:
            c = fn(tx, name)
            tx.record(audit.cli_actor(), f"campaign.{action}", f"campaign:{c.name}", {"id": c.id, "state": c.state})
    except CampaignError as e:
        fail(str(e))
    console.print(f"campaign {c.name}: {c.state}" + (f" ({c.reason})" if c.reason else ""))


def _state_command(action: str, help_text: str) -> None:
    """Register `fota campaign <action> NAME`: one audited state change (see _act)."""
    def command(name: str, home: Optional[Path] = HomeOpt):
        _act(action, name, home)
    command.__name__ = action
    command.__doc__ = help_text
    campaign_app.command(action)(command)


for _action, _help in (
        ("start", "Target the devices over the waves; the running control center starts them, paced."),
        ("pause", "No new device starts; devices in flight finish."),
        ("resume", "Continue a paused campaign, or approve the next wave of a waiting one."),
        ("abort", "Stop: downloads are cancelled, devices past their download finish; none is left half-installed.")):
    _state_command(_action, _help)


@campaign_app.command("list")
def list_(home: Optional[Path] = HomeOpt):
    """Every campaign with its state and progress."""
    from fota.server.campaigns import campaign_summary, list_campaigns
    store = open_store(Home.locate(home))
    t = Table("id", "name", "release", "state", "wave", "succeeded", "progress")
    for c in list_campaigns(store):
        s = campaign_summary(store, c.id, devices=False)
        t.add_row(str(s["id"]), s["name"], s["release"], s["state"], f"{s['wave']}/{s['waves_total']}",
                  f"{s['counts'].get('succeeded', 0)}/{s['total']}", f"{s['progress']:.0%}")
    console.print(t)


def render(summary: dict[str, Any], devices: bool) -> Group:
    """Rich view of a campaign: a header, one progress bar per wave, optionally every device."""
    head = (f"campaign [bold]{summary['name']}[/bold] (release {summary['release']}): {summary['state']}, "
            f"wave {summary['wave']}/{summary['waves_total']}, {summary['counts'].get('succeeded', 0)}/"
            f"{summary['total']} succeeded" + ("" if summary["window_open"] else
               f", outside its window (opens {summary['window_opens_at']:%Y-%m-%d %H:%M %Z})")
            + (f"\n{summary['reason']}" if summary["reason"] else ""))
    bars = Progress(TextColumn("{task.description:<8}"), BarColumn(), TextColumn("{task.completed:>5.0f}/{task.total:<5.0f}"),
                    TextColumn("{task.fields[counts]}"), auto_refresh=False)
    for w in summary["waves"]:
        label = f"wave {w['wave']}" + ("*" if w["current"] else "")
        counts = ", ".join(f"{n} {st}" for st, n in sorted(w["counts"].items()))
        bars.add_task(label, total=max(w["total"], 1), completed=w["counts"].get("succeeded", 0), counts=counts)
    parts: list[Any] = [head, bars]
    if devices:
        t = Table("device", "wave", "state", "attempts", "job", "job state", "code / reason")
        for d in summary["devices"]:
            detail = " ".join(x for x in (d["code"], d["reason"]) if x)
            t.add_row(d["device"], str(d["wave"]), d["state"], str(d["attempts"]), str(d["job"] or ""),
                      d["job_state"] or "", detail)
        parts.append(t)
    return Group(*parts)


@campaign_app.command("status")
def status(name: Optional[str] = typer.Argument(None, help="campaign name or id (default: the latest)"),
           devices: bool = typer.Option(False, "--devices", help="also list every device"),
           watch: bool = typer.Option(False, "--watch", help="follow live until the campaign is done or aborted"),
           interval: float = typer.Option(1.0, "--interval", help="seconds between refreshes with --watch"),
           home: Optional[Path] = HomeOpt):
    """Per-wave progress (and per-device states with --devices)."""
    from fota.server.campaigns import CampaignError, campaign_summary, list_campaigns
    store = open_store(Home.locate(home))
    if name is None:
        campaigns = list_campaigns(store)
        if not campaigns:
            fail("no campaigns")
        name = str(campaigns[-1].id)
    try:
        summary = campaign_summary(store, name, devices=devices)
    except CampaignError as e:
        fail(str(e))
    if not watch:
        console.print(render(summary, devices))
        return
    with Live(render(summary, devices), console=console, refresh_per_second=4) as live:
        while summary["state"] not in FINISHED:
            time.sleep(interval)
            summary = campaign_summary(store, name, devices=devices)
            live.update(render(summary, devices))
    if summary["state"] != "done":
        raise typer.Exit(1)
