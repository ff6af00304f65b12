"""`fota campaign …`: create, start, pause, resume, abort and watch staged rollouts."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from fota.backend import open_backend
from fota.cli_common import HomeOpt, console, fail

campaign_app = typer.Typer(no_args_is_help=True, help="Staged rollouts: waves, thresholds, pacing.")

FINISHED = ("done", "aborted")
# A device's states in a campaign (fota.server.campaigns.states.DEVICE_STATES, not imported: see HELP_DEFAULTS)
DEVICE_STATES = ("queued", "in_flight", "probation", "retry", "succeeded", "failed", "skipped", "cancelled")


# The spec's defaults (CampaignSpec in fota.server.campaigns.spec), for the help: importing that
# package would load SQLAlchemy for `fota --help`. tests/test_cli_campaigns.py checks they agree.
HELP_DEFAULTS = {"failure": 0, "on_failure": "pause", "max_in_flight": 10, "rate_growth": 1, "probation": 300,
                 "retries": 2, "backoff": 60, "download": 900, "install": 300, "confirm": 300}
DEFAULT_WINDOW_MINUTES = 120


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
        spec["window"] = {"cron": options["window_cron"],
                          "minutes": options["window_minutes"] or DEFAULT_WINDOW_MINUTES,
                          "tz": options["window_tz"] or "UTC"}
    else:
        # Dropping them would leave a campaign without the window the operator meant.
        given = [flag for flag, key in (("--window-minutes", "window_minutes"), ("--window-tz", "window_tz"))
                 if options[key] is not None]
        if given:
            fail(f"{' and '.join(given)} need(s) --window-cron (when the window opens)")
    timeouts = {k: options[f"timeout_{k}"] for k in ("download", "install", "confirm")
                if options[f"timeout_{k}"] is not None}
    if timeouts:
        spec["timeouts"] = dict(spec.get("timeouts") or {}, **timeouts)
    return spec


def render_preview(preview: dict[str, Any]) -> str:
    """A campaign's preview in lines: targeted, per wave, skipped by reason, unknown names."""
    sizes = ", ".join(str(w["devices"]) for w in preview["waves"])
    lines = [f"targets {preview['targeted']} device(s)"
             + (f" ({preview['offline']} offline now: they start once online)" if preview["offline"] else "")
             + f"; waves: {sizes}"]
    skipped = sum(g["devices"] for g in preview["skipped"])
    if skipped:
        lines.append(f"skips {skipped} device(s) matching the filter:")
        lines += [f"  {g['devices']} {g['reason']}" for g in preview["skipped"]]
    if preview["unknown"]:
        lines.append("not in the fleet yet (the dynamic campaign waits for them): " + "; ".join(preview["unknown"]))
    if not preview["targeted"]:
        lines.append("warning: no device would be updated if it started now")
    return "\n".join(lines)


def _thresholds(spec: dict[str, Any]) -> str:
    """The thresholds of a created campaign in words (per wave when they differ)."""
    pairs = {(w["success"], w["failure"]) for w in spec["waves"]}
    if len(pairs) > 1:
        return "thresholds differ per wave (campaign status shows them)"
    success, failure = pairs.pop()
    return (f"a wave goes on once {success:g}% of its devices succeeded; more than {failure:g}% failed: "
            f"{spec['on_failure']}")


@campaign_app.command("create")
def create(name: str = typer.Argument(..., help="campaign name"),
           release: str = typer.Option(..., "--release", help="release version or id"),
           spec_file: Optional[Path] = typer.Option(None, "--spec", help="JSON file with the whole spec "
                                                                          "(options below override it)"),
           hardware: List[str] = typer.Option([], "--hardware", help="filter: hardware type (repeatable); "
                                              "devices of types the release is not built for are skipped"),
           tag: List[str] = typer.Option([], "--tag", help="filter: the device has this tag (repeatable)"),
           version: List[str] = typer.Option([], "--running", help="filter: running version (repeatable)"),
           device: List[str] = typer.Option([], "--device", help="filter: device id (repeatable)"),
           online: Optional[bool] = typer.Option(None, "--online/--offline", help="filter: online state"),
           where: List[str] = typer.Option([], "--where", help="filter: inventory KEY=VALUE (repeatable)"),
           waves: Optional[str] = typer.Option(None, "--waves", help="cumulative percentages "
                                               "(default: 1,10,50,100)"),
           approval: bool = typer.Option(False, "--approval", help="wait for 'resume' after every wave"),
           success: Optional[float] = typer.Option(
               None, "--success", help="% of a wave that must have succeeded before the next wave starts "
                                       "(default: 100 - --failure, so 100)"),
           failure: Optional[float] = typer.Option(
               None, "--failure", help="more than this % of a wave failed: --on-failure happens "
                                       f"(default: {HELP_DEFAULTS['failure']}: the first failure)"),
           on_failure: Optional[str] = typer.Option(None, "--on-failure",
                                                    help=f"pause | abort (default: {HELP_DEFAULTS['on_failure']})"),
           max_in_flight: Optional[int] = typer.Option(
               None, "--max-in-flight", help=f"devices with an update job out at once (default: {HELP_DEFAULTS['max_in_flight']})"),
           rate: Optional[float] = typer.Option(None, "--rate", help="device starts per minute (default: no limit)"),
           rate_growth: Optional[float] = typer.Option(
               None, "--rate-growth", help="rate factor per minute while none fails "
                                           f"(default: {HELP_DEFAULTS['rate_growth']}, no growth)"),
           max_rate: Optional[float] = typer.Option(None, "--max-rate", help="ceiling of the growing rate, starts "
                                                                             "per minute (default: none)"),
           window_cron: Optional[str] = typer.Option(
               None, "--window-cron", help="maintenance window opening, 5-field cron (minute hour day month "
                                           "weekday), e.g. '0 2 * * *' (default: no window, always open)"),
           window_minutes: Optional[int] = typer.Option(
               None, "--window-minutes", help=f"how long the window stays open (default: {DEFAULT_WINDOW_MINUTES}; "
                                              "needs --window-cron)"),
           window_tz: Optional[str] = typer.Option(
               None, "--window-tz", help="time zone of the cron, e.g. Europe/Berlin (default: UTC; "
                                         "needs --window-cron)"),
           probation: Optional[int] = typer.Option(
               None, "--probation", help="seconds a confirmed device must stay healthy to count as succeeded "
                                         f"(default: {HELP_DEFAULTS['probation']})"),
           retries: Optional[int] = typer.Option(
               None, "--retries", help=f"further attempts after a failed or timed-out one (default: {HELP_DEFAULTS['retries']})"),
           backoff: Optional[int] = typer.Option(
               None, "--backoff", help=f"seconds before the first retry, doubling (default: {HELP_DEFAULTS['backoff']})"),
           timeout_download: Optional[int] = typer.Option(
               None, "--timeout-download", help="seconds a device may stay downloading; then cancelled and retried "
                                                f"(default: {HELP_DEFAULTS['download']})"),
           timeout_install: Optional[int] = typer.Option(
               None, "--timeout-install", help="seconds a device may stay verifying/installing; then failed "
                                               f"(default: {HELP_DEFAULTS['install']})"),
           timeout_confirm: Optional[int] = typer.Option(
               None, "--timeout-confirm", help="seconds a device may stay rebooting/on trial; then failed "
                                               f"(default: {HELP_DEFAULTS['confirm']})"),
           dynamic: bool = typer.Option(False, "--dynamic", help="devices matching later join while it runs"),
           dry_run: bool = typer.Option(False, "--dry-run", help="check and preview (devices targeted, skipped "
                                                                 "and why, wave sizes); create nothing"),
           home: Optional[Path] = HomeOpt):
    """Create a draft campaign (nothing is sent before 'fota campaign start').

    A device id or tag no device has is refused (unless --dynamic). Printed: what starting it now
    would target (also with --dry-run, which creates nothing) and the thresholds in words.
    """
    options = dict(locals())
    options.update(tags=tag, versions=version, devices=device)
    spec = _spec_from_options(spec_file, options)
    backend = open_backend(home)
    if dry_run:
        preview = backend.campaign_preview(name, release, spec)
        console.print(f"campaign {name} (dry run, nothing created): release {release}", markup=False)
        console.print(render_preview(preview), markup=False)
        return
    c = backend.campaign_create(name, release, spec)
    console.print(f"campaign {c['name']} (id {c['id']}): release {release}, {len(c['spec']['waves'])} wave(s), "
                  "draft", markup=False)
    console.print(_thresholds(c["spec"]), markup=False)
    console.print(render_preview(c["preview"]), markup=False)


def _act(action: str, name: str, home: Optional[Path]) -> None:
    c = open_backend(home).campaign_act(action, name)
    console.print(f"campaign {c['name']}: {c['state']}" + (f" ({c['reason']})" if c["reason"] else ""), markup=False)


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
    t = Table("id", "name", "release", "state", "wave", "succeeded", "progress")
    for s in open_backend(home).campaigns():
        t.add_row(str(s["id"]), s["name"], s["release"], s["state"], f"{s['wave']}/{s['waves_total']}",
                  f"{s['counts'].get('succeeded', 0)}/{s['total']}", f"{s['progress']:.0%}")
    console.print(t)


def _when(at: Optional[datetime], now: datetime) -> str:
    """A time stamp for a person: UTC, with how far it is from now."""
    if at is None:
        return "-"
    seconds = (at - now).total_seconds()  # not truncated first: 0.4 s ahead is "in 0s", not "0s ago"
    span = _duration(abs(seconds))
    return f"{at:%Y-%m-%d %H:%M:%S} UTC ({'in ' + span if seconds > 0 else span + ' ago'})"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render(summary: dict[str, Any], devices: bool, now: Optional[datetime] = None) -> Group:
    """Rich view of a campaign: a header, one progress bar per wave, optionally every device.

    Spans ("in 9m59s", "3s ago") are measured from the center's clock when it made the summary
    (summary["now"]), not this machine's: an ETA a second ahead must not read "0s ago" because
    the answer took a moment to arrive over HTTP, or because the clocks differ."""
    now = now or summary.get("now") or datetime.now(timezone.utc)
    s = summary
    lines = [f"campaign [bold]{escape(s['name'])}[/bold] (release {escape(s['release'])}): {s['state']}, "
             f"wave {s['wave']}/{s['waves_total']}, {s['counts'].get('succeeded', 0)}/{s['total']} succeeded"]
    if s["reason"]:
        lines.append(escape(s["reason"]))
    lines.append(f"created {_when(s['created_at'], now)}, started {_when(s['started_at'], now)}, "
                 f"finished {_when(s['finished_at'], now)}")
    if s["window_open"] is False:
        lines.append(f"outside its window (opens {_when(s['window_opens_at'], now)})")
    on_probation = s["counts"].get("probation", 0)
    if on_probation:
        lines.append(f"{on_probation} device(s) on probation, the last until {_when(s['probation_ends_at'], now)}")
    if s["eta"] is not None:
        lines.append(f"ETA {_when(s['eta'], now)} at the pace so far (windows and approvals not foreseen)")
    if s["skipped"]:
        lines.append("skipped: " + "; ".join(f"{g['devices']} {escape(g['reason'])}" for g in s["skipped"]))
    if s["preview"] is not None:
        lines.append("if started now: " + escape(render_preview(s["preview"])))
    bars = Progress(TextColumn("{task.description:<8}"), BarColumn(),
                    TextColumn("{task.completed:>5.0f}/{task.fields[of]:<5}"),
                    TextColumn("{task.fields[counts]}"), auto_refresh=False)
    # a draft has no devices yet: its waves' sizes are the preview's
    sizes = [p["devices"] for p in s["preview"]["waves"]] if s["preview"] else [w["total"] for w in s["waves"]]
    for w, size in zip(s["waves"], sizes):
        label = f"wave {w['wave']}" + ("*" if w["current"] else "")
        counts = ", ".join(f"{n} {st}" for st, n in sorted(w["counts"].items()))
        rule = f"needs {w['success']:g}% ok, >{w['failure']:g}% failed: {s['spec'].get('on_failure', 'pause')}"
        bars.add_task(label, total=max(size, 1), completed=w["counts"].get("succeeded", 0), of=size,
                      counts=f"{counts} ({rule})" if counts else f"({rule})")
    parts: list[Any] = ["\n".join(lines), bars]
    if devices:
        t = Table("device", "wave", "state", "attempts", "job", "job state", "probation left", "code / reason")
        for d in s["devices"]:
            detail = " ".join(x for x in (d["code"], d["reason"]) if x)
            left = d["probation_ends_at"]
            t.add_row(d["device"], str(d["wave"]), d["state"], str(d["attempts"]), str(d["job"] or ""),
                      d["job_state"] or "", _duration(max(0.0, (left - now).total_seconds())) if left else "",
                      escape(detail))
        parts.append(t)
    return Group(*parts)


@campaign_app.command("status")
def status(name: Optional[str] = typer.Argument(None, help="campaign name or id (default: the latest)"),
           devices: bool = typer.Option(False, "--devices", help="also list the devices (all, or those --state "
                                                                 "and --wave select)"),
           state: List[str] = typer.Option([], "--state", help="with --devices: only devices in this state "
                                           f"(repeatable): {', '.join(DEVICE_STATES)}"),
           wave: Optional[int] = typer.Option(None, "--wave", min=1, help="with --devices: only this wave's "
                                                                           "devices (1-based)"),
           watch: bool = typer.Option(False, "--watch", help="follow live until the campaign is done or aborted"),
           interval: float = typer.Option(1.0, "--interval", help="seconds between refreshes with --watch"),
           home: Optional[Path] = HomeOpt):
    """Per-wave progress against the thresholds, time stamps, probation and ETA (and the devices
    with --devices, filtered by --state and --wave)."""
    unknown = [st for st in state if st not in DEVICE_STATES]
    if unknown:
        fail(f"unknown device state(s) {', '.join(unknown)}: use {', '.join(DEVICE_STATES)}")
    devices = devices or bool(state) or wave is not None
    backend = open_backend(home)
    if name is None:
        name = backend.latest_campaign()
        if name is None:
            fail("no campaigns")

    def summary_now() -> dict[str, Any]:
        return backend.campaign(name, devices, state or None, wave)

    summary = summary_now()
    if not watch:
        console.print(render(summary, devices))
        return
    with Live(render(summary, devices), console=console, refresh_per_second=4) as live:
        while summary["state"] not in FINISHED:
            time.sleep(interval)
            summary = summary_now()
            live.update(render(summary, devices))
    if summary["state"] != "done":
        raise typer.Exit(1)
