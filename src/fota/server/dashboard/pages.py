"""The dashboard's HTML: server-rendered pages, every value escaped (``e``).

A page is a layout around sections; the sections that change while an operator watches are
"live": each is a fragment function of the page's view, and the events stream
(routes.events) sends the fragments again, by element id, whenever they change. No inline
script or style (the Content-Security-Policy forbids them): bars are <progress> elements and
inline SVG, the behaviour is static/dash.js.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

__all__ = ["Ctx", "e", "layout", "login_page"]

ACTIONS_BY_STATE = {"draft": ("start", "abort"), "running": ("pause", "abort"), "paused": ("resume", "abort"),
                    "waiting": ("approve", "pause", "abort")}
CONFIRM = {"start": "Start campaign {name}? Devices begin to download {release}.",
           "pause": "Pause campaign {name}? No new device starts; devices in flight finish.",
           "resume": "Resume campaign {name}?",
           "approve": "Approve the next wave of campaign {name}?",
           "abort": "Abort campaign {name}? Downloads are cancelled; devices past their download finish.",
           "cancel": "Cancel deployment {name}? Pending jobs are withdrawn, downloads cancelled."}


@dataclass
class Ctx:
    """Who is looking: the token's name and role, and the session's CSRF token."""
    name: str
    role: str
    csrf: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def e(value: Any) -> str:
    """HTML-escaped text of value (None: an em dash)."""
    return "—" if value is None else escape(str(value), quote=True)


def when(value: datetime | None) -> str:
    return "—" if value is None else f'<time datetime="{e(value.isoformat())}">{e(value.strftime("%Y-%m-%d %H:%M:%S"))}</time>'


def seconds(value: float | None) -> str:
    if value is None:
        return "—"
    value = int(round(value))
    return f"{value // 3600}h {value % 3600 // 60:02d}m" if value >= 3600 else f"{value // 60}m {value % 60:02d}s"


def bar(bar_id: str, value: float, label: str) -> str:
    """A progress bar (0..1) with its percentage; its id lets tests and scripts read it."""
    value = max(0.0, min(1.0, value or 0.0))
    return (f'<span class="bar"><progress id="{e(bar_id)}" value="{value:.4f}" max="1" '
            f'aria-label="{e(label)}"></progress> <span class="pct">{value * 100:.0f}%</span></span>')


def chart(title: str, rows: list[tuple[str, int]], link: str | None = None) -> str:
    """A horizontal bar chart in inline SVG: one bar per (label, count)."""
    if not rows:
        return f"<figure class=chart><figcaption>{e(title)}</figcaption><p class=muted>none</p></figure>"
    top = max(n for _, n in rows) or 1
    height, width, label_w = 22, 200, 120
    rows = rows[:20]
    total_w = label_w + width + 60
    parts = [f'<figure class=chart><figcaption>{e(title)}</figcaption>'
             f'<svg role="img" aria-label="{e(title)}" width="{total_w}" height="{height * len(rows)}" '
             f'viewBox="0 0 {total_w} {height * len(rows)}">']
    for i, (label, n) in enumerate(rows):
        y = i * height
        w = max(2, int(width * n / top))
        text = f'<text x="0" y="{y + 15}">{e(label[:18])}</text>'
        if link:
            text = f'<a href="{e(link + quote(label))}">{text}</a>'
        parts.append(f'{text}<rect x="{label_w}" y="{y + 3}" width="{w}" height="{height - 8}" class="b"></rect>'
                     f'<text x="{label_w + w + 6}" y="{y + 15}">{n}</text>')
    parts.append("</svg></figure>")
    return "".join(parts)


def state(value: str | None) -> str:
    return f'<span class="st st-{e(value)}">{e(value)}</span>'


def live(section_id: str, html: str) -> str:
    return f'<section id="{e(section_id)}" data-live>{html}</section>'


def layout(title: str, body: str, ctx: Ctx | None, current: str = "", live_url: str | None = None) -> str:
    nav = ""
    if ctx is not None:
        links = [("fleet", "/ui/", "Fleet"), ("devices", "/ui/devices", "Devices"),
                 ("releases", "/ui/releases", "Releases"), ("campaigns", "/ui/campaigns", "Campaigns and deployments")]
        items = "".join(f'<a href="{href}"{" class=on" if key == current else ""}>{label}</a>'
                        for key, href, label in links)
        nav = (f'<nav>{items}<span class="who">{e(ctx.name)} ({e(ctx.role)})</span>'
               f'<form method="post" action="/ui/logout" class="inline">{csrf_field(ctx)}'
               f'<button type="submit" class="link">Sign out</button></form></nav>')
    live_attr = f' data-events="{e(live_url)}"' if live_url else ""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>{e(title)} · fota</title><link rel=stylesheet href=/ui/static/dash.css>"
            "<script src=/ui/static/dash.js defer></script></head>"
            f"<body{live_attr}><header><strong>fota</strong> control center</header>{nav}"
            f"<main><h1>{e(title)}</h1>{body}</main></body></html>")


def csrf_field(ctx: Ctx) -> str:
    return f'<input type="hidden" name="csrf" value="{e(ctx.csrf)}">'


def login_page(nonce: str, error: str | None = None) -> str:
    message = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    body = (f'{message}<form method="post" action="/ui/login" class="login">'
            f'<input type="hidden" name="login_nonce" value="{e(nonce)}">'
            '<label>API token <input type="password" name="token" autocomplete="off" required '
            'placeholder="fota_..."></label> <button type="submit">Sign in</button></form>'
            '<p class="muted">A read token shows the fleet; an admin token can also pause, resume, abort '
            'and approve campaigns. Tokens: <code>fota token create NAME --role read|admin</code>.</p>')
    return layout("Sign in", body, None)


# ---- fleet ---------------------------------------------------------------------------------------
def fleet_fragments(view: dict[str, Any], ctx: Ctx) -> dict[str, str]:
    total = view["online"] + view["offline"]
    counts = (f'<p class="big"><a href="/ui/devices?online=1">{view["online"]} online</a> · '
              f'<a href="/ui/devices?online=0">{view["offline"]} offline</a> · '
              f'<a href="/ui/devices">{total} devices</a></p>'
              f'<div class="charts">{chart("by version", view["versions"], "/ui/devices?version=")}'
              f'{chart("by hardware", view["hardware"], "/ui/devices?hardware=")}'
              f'{chart("by tag", view["tags"], "/ui/devices?tag=")}</div>')
    return {"fleet-counts": counts, "fleet-rollouts": rollouts(view["campaigns"], view["deployments"],
                                                               "in progress")}


def rollouts(campaigns: list[dict[str, Any]], deployments: list[dict[str, Any]], what: str) -> str:
    rows = []
    for c in campaigns:
        rows.append(f'<tr><td><a href="/ui/campaigns/{quote(c["name"])}">campaign {e(c["name"])}</a></td>'
                    f'<td>{e(c["release"])}</td><td>{state(c["state"])}</td>'
                    f'<td>wave {c["wave"]}/{c["waves_total"]}</td>'
                    f'<td>{bar("campaign-%d-progress" % c["id"], c["progress"], "devices succeeded")} '
                    f'{c["counts"].get("succeeded", 0)}/{c["total"]} succeeded</td></tr>')
    for d in deployments:
        done = sum(n for st, n in d["counts"].items() if st in ("confirmed",))
        rows.append(f'<tr><td><a href="/ui/deployments/{d["id"]}">deployment {d["id"]}</a></td>'
                    f'<td>{e(d["release"])}</td><td>{state(d["state"])}</td><td>{d["total"]} devices</td>'
                    f'<td>{bar("deployment-%d-progress" % d["id"], d["progress"], "mean job progress")} '
                    f'{done}/{d["total"]} confirmed</td></tr>')
    if not rows:
        return f'<h2>Campaigns and deployments {e(what)}</h2><p class="muted">none</p>'
    return (f'<h2>Campaigns and deployments {e(what)}</h2><table><thead><tr><th>rollout</th><th>release</th>'
            f'<th>state</th><th>scope</th><th>progress</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


# ---- devices -------------------------------------------------------------------------------------
def devices_filters(params: dict[str, str], hardware: list[str], versions: list[str]) -> str:
    def options(name, values, labels=None):
        chosen = params.get(name) or ""
        out = [f'<option value=""{" selected" if not chosen else ""}>any</option>']
        for v in values:
            label = (labels or {}).get(v, v)
            out.append(f'<option value="{e(v)}"{" selected" if v == chosen else ""}>{e(label)}</option>')
        return f'<select name="{name}">{"".join(out)}</select>'
    from fota.server.dashboard.queries import SORTS
    job_states = ["pending", "sent", "downloading", "verifying", "installing", "rebooting", "trial", "confirmed",
                  "failed", "reverted", "cancelled", "postponed", "timed_out"]
    return ('<form method="get" action="/ui/devices" class="filters">'
            f'<label>id starts with <input name="q" value="{e(params.get("q") or "")}" size="14"></label>'
            f'<label>tag <input name="tag" value="{e(params.get("tag") or "")}" size="10"></label>'
            f'<label>hardware {options("hardware", hardware)}</label>'
            f'<label>version {options("version", versions)}</label>'
            f'<label>job state {options("state", job_states)}</label>'
            f'<label>online {options("online", ["1", "0"], {"1": "online", "0": "offline"})}</label>'
            f'<label>sort {options("sort", list(SORTS))}</label>'
            f'<label><input type="checkbox" name="desc" value="1"{" checked" if params.get("desc") else ""}> '
            'descending</label> <button type="submit">Show</button></form>')


def devices_fragments(view: dict[str, Any], ctx: Ctx) -> dict[str, str]:
    rows = []
    for d in view["devices"]:
        job = d["job"]
        job_cell = "—"
        if job:
            job_cell = f'{state(job["state"])}'
            if job["state"] not in ("confirmed", "failed", "reverted", "cancelled", "timed_out"):
                job_cell += " " + bar(f'job-{job["id"]}-progress', job["progress"], "download")
            if job["code"]:
                job_cell += f' <abbr title="{e(job["meaning"])}">{e(job["code"])}</abbr>'
        rows.append(f'<tr><td><a href="/ui/devices/{quote(d["id"])}">{e(d["id"])}</a></td>'
                    f'<td>{"online" if d["online"] else "offline"}</td><td>{e(d["hardware"])}</td>'
                    f'<td>{e(d["version"])}</td><td>{e(", ".join(d["tags"]))}</td>'
                    f'<td>{e(d["battery"])}{"%" if d["battery"] is not None else ""}</td>'
                    f'<td>{when(d["last_seen"])}</td><td>{job_cell}</td></tr>')
    table = ('<table id="devices"><thead><tr><th>device</th><th>online</th><th>hardware</th><th>version</th>'
             '<th>tags</th><th>battery</th><th>last seen</th><th>newest job</th></tr></thead><tbody>'
             + ("".join(rows) or '<tr><td colspan="8" class="muted">no device matches</td></tr>')
             + "</tbody></table>")
    params = {k: v for k, v in view["params"].items() if v and k != "after"}
    pager = [f'<a href="/ui/devices?{e(urlencode(params))}">first page</a>']
    if view["next"]:
        pager.append(f'<a rel="next" href="/ui/devices?{e(urlencode({**params, "after": view["next"]}))}">next page</a>')
    return {"devices-table": table + f'<p class="pager">{" · ".join(pager)}</p>'}


# ---- one device ----------------------------------------------------------------------------------
def device_fragments(d: dict[str, Any], ctx: Ctx) -> dict[str, str]:
    health = d["health"]
    health_text = "no report yet" if health is None else (
        f'{"healthy" if health["ok"] else "unhealthy"}{": " + e(health["reason"]) if health["reason"] else ""} '
        f'(on {e(health["version"])}, {when(health["at"])})')
    battery = "not measured" if d["battery"] is None else f'{e(d["battery"])}%'
    if d["external"]:
        battery += " (external power)"
    summary = ('<dl class="facts">'
               f'<dt>state</dt><dd>{"online" if d["online"] else "offline"}, last seen {when(d["last_seen"])}</dd>'
               f'<dt>running</dt><dd id="device-running">{e(d["running"])}</dd>'
               f'<dt>previous</dt><dd>{e(d["previous"])}</dd>'
               f'<dt>hardware</dt><dd>{e(d["hardware"])}</dd><dt>tags</dt><dd>{e(", ".join(d["tags"]) or None)}</dd>'
               f'<dt>health</dt><dd>{health_text}</dd><dt>battery</dt><dd>{battery}</dd>'
               f'<dt>agent</dt><dd>{e(d["agent_state"])}</dd></dl>')
    job = d["job"]
    if job is None:
        job_html = '<p class="muted">no job yet</p>'
    else:
        job_html = (f'<p>job {job["id"]} of <a href="/ui/deployments/{job["deployment"]}">deployment '
                    f'{job["deployment"]}</a>: {state(job["state"])} '
                    f'{bar("device-job-progress", job["progress"], "current job")}</p>')
        if job["code"]:
            job_html += (f'<p class="error"><code>{e(job["code"])}</code>: {e(job["meaning"])}'
                         f'{" — " + e(job["reason"]) if job["reason"] else ""}</p>')
    items = []
    for ev in d["timeline"]:
        extra = ""
        if ev["code"]:
            extra += (f'<div class="code"><code>{e(ev["code"])}</code> <span class="meaning">{e(ev["meaning"])}'
                      f'</span></div>')
        if ev["reason"]:
            extra += f'<div class="reason">{e(ev["reason"])}</div>'
        detail = []
        if ev["progress"] is not None and ev["state"] == "downloading":
            detail.append(f'{ev["progress"] * 100:.0f}%')
        if ev["version"]:
            detail.append(f'version {e(ev["version"])}')
        if ev["job"] is not None:
            detail.append(f'job {ev["job"]}')
        if ev["ignored"]:
            detail.append(f'ignored: {e(ev["ignored"])}')
        items.append(f'<li class="ev ev-{e(ev["state"])}">{when(ev["at"])} {state(ev["state"])} '
                     f'<span class="muted">{" · ".join(detail)}</span>{extra}</li>')
    timeline = ('<h2>History</h2><ol class="timeline" id="timeline">' + "".join(items) + "</ol>") if items else \
        '<h2>History</h2><p class="muted">no status reported yet</p>'
    audit_rows = "".join(f'<tr><td>{when(a["at"])}</td><td>{e(a["actor"])}</td><td>{e(a["action"])}</td>'
                         f'<td>{e(a["target"])}</td></tr>' for a in d["audit"])
    audit = ('<h2>Audit</h2>' + (f'<table><thead><tr><th>when</th><th>who</th><th>what</th><th>on</th></tr></thead>'
                                 f'<tbody>{audit_rows}</tbody></table>' if audit_rows
                                 else '<p class="muted">no operator action concerned this device</p>'))
    return {"device-summary": summary, "device-job": "<h2>Current job</h2>" + job_html,
            "device-timeline": timeline, "device-audit": audit}


# ---- releases ------------------------------------------------------------------------------------
def releases_body(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        trust = {True: "trusted", False: "not trusted", None: "—"}[r["trusted"]]
        trust_html = f'<span class="{"ok" if r["trusted"] else "bad"}" title="{e(r["why"])}">{trust}</span>'
        out.append(f'<tr><td>{e(r["version"])}</td><td>{e(r["kind"])}{" (encrypted)" if r["encrypted"] else ""}</td>'
                   f'<td>{e(", ".join(r["hardware"]))}</td><td>{r["size"]:,} B</td><td>{r["counter"]}</td>'
                   f'<td><code>{e(r["key_id"])}</code> {trust_html}</td><td>{r["deltas"]}</td>'
                   f'<td><a href="/ui/devices?version={quote(r["version"])}">{r["devices"]} devices</a>, '
                   f'{r["deployments"]} deployments</td><td>{when(r["created_at"])}</td></tr>')
    if not out:
        return '<p class="muted">no release yet</p>'
    return ('<table id="releases"><thead><tr><th>version</th><th>kind</th><th>hardware</th><th>size</th>'
            '<th>counter</th><th>signing key</th><th>deltas</th><th>deployed</th><th>created</th></tr></thead>'
            f'<tbody>{"".join(out)}</tbody></table>')


# ---- campaigns and deployments -------------------------------------------------------------------
def action_forms(kind: str, ref: str, label: str, release: str, actions: tuple[str, ...], ctx: Ctx) -> str:
    """The buttons an admin token sees (each asks for confirmation: dash.js); none for a read token."""
    if not ctx.admin:
        return ""
    forms = []
    for action in actions:
        question = CONFIRM[action].format(name=label, release=release)
        forms.append(f'<form method="post" action="/ui/{kind}/{quote(ref)}/{action}" class="inline" '
                     f'data-confirm="{e(question)}">{csrf_field(ctx)}'
                     f'<button type="submit" name="action" value="{action}" class="act act-{action}">'
                     f'{action.capitalize()}</button></form>')
    return '<div class="actions">' + "".join(forms) + "</div>"


def campaigns_fragments(view: dict[str, Any], ctx: Ctx) -> dict[str, str]:
    return {"campaigns-list": rollouts(view["campaigns"], view["deployments"], "")}


def campaign_fragments(c: dict[str, Any], ctx: Ctx) -> dict[str, str]:
    actions = ACTIONS_BY_STATE.get(c["state"], ())
    pace = "no limit" if c["rate"] is None else "%.1f starts/min" % c["rate"]
    window = f' · window closed, opens {when(c["window_opens_at"])}' if c["window_opens_at"] else ""
    eta = "—" if c["eta"] is None else f'{when(c["eta"])} (in {seconds((c["eta"] - c["now"]).total_seconds())})'
    extra = ""
    if c["skipped"]:
        extra += ("<p>skipped: " + "; ".join(f'{g["devices"]} {e(g["reason"])}' for g in c["skipped"]) + "</p>")
    if c["preview"]:
        p = c["preview"]
        extra += (f'<p>if started now: {p["targeted"]} devices ({p["offline"]} offline now), by wave '
                  f'{e(", ".join(str(w["devices"]) for w in p["waves"]))}'
                  + "".join(f'; skipped {g["devices"]} {e(g["reason"])}' for g in p["skipped"])
                  + (f'; no device has yet {e(", ".join(p["unknown"]))}' if p["unknown"] else "") + "</p>")
    head = (f'<p>release {e(c["release"])} · {state(c["state"])}{" — " + e(c["reason"]) if c["reason"] else ""}'
            f' · wave {c["wave"]} of {c["waves_total"]}{window}</p>'
            f'<p>{bar("campaign-progress", c["progress"], "devices succeeded")} '
            f'{c["counts"].get("succeeded", 0)} of {c["total"]} devices succeeded · '
            f'{c["counts"].get("failed", 0)} failed · {c["in_flight"]} in flight or on probation</p>{extra}'
            f'<p>downloads {bar("campaign-jobs-progress", c["job_progress"], "downloads of the targeted devices")} '
            f'· <a href="/ui/deployments/{c["deployment"]}">its deployment</a></p>'
            f'<p>started {when(c["started_at"])} · finished {when(c["finished_at"])} · '
            f'ETA <span id="campaign-eta">{eta}</span> · '
            f'pace {pace} · '
            f'at most {c["thresholds"]["max_in_flight"]} in flight · on failure: {e(c["thresholds"]["on_failure"])}'
            f'</p>{action_forms("campaigns", c["name"], c["name"], c["release"], actions, ctx)}')
    waves = []
    for w in c["waves"]:
        total = w["total"] or 0
        ok = w["counts"].get("succeeded", 0)
        bad = w["counts"].get("failed", 0)
        scope = (f'{w["percent"]:g}% of the targeted devices' if w["percent"] is not None
                 else f'tag {e(w["tag"])}' if w["tag"] else f'{len(w["devices"] or [])} named devices')
        waves.append(f'<tr{" class=current" if w["current"] else ""}><td>{w["wave"]}</td><td>{scope}</td>'
                     f'<td>{bar("wave-%d-progress" % w["wave"], ok / total if total else 0.0, "wave succeeded")}</td>'
                     f'<td>{ok}/{total}, needs {w["success"]:g}%</td>'
                     f'<td>{bad}/{total}, allowed {w["failure"]:g}%</td>'
                     f'<td>{"yes" if w["approval"] else "no"}</td><td>{when(w["probation_ends_at"])}</td>'
                     f'<td>{e(", ".join(f"{k} {n}" for k, n in sorted(w["counts"].items())))}</td></tr>')
    waves_html = ('<h2>Waves</h2><table id="waves"><thead><tr><th>wave</th><th>devices</th><th>progress</th>'
                  '<th>succeeded</th><th>failed</th><th>approval</th><th>probation ends</th><th>states</th></tr></thead>'
                  f'<tbody>{"".join(waves)}</tbody></table>')
    clocks = "".join(f'<li><a href="/ui/devices/{quote(k["device"])}">{e(k["device"])}</a>: '
                     f'{seconds(k["left"])} of {seconds(c["probation"])} left</li>' for k in c["clocks"])
    clocks_html = (f'<h2>Probation ({seconds(c["probation"])})</h2>'
                   + (f'<ul id="clocks">{clocks}</ul>' if clocks else '<p class="muted">no device on probation</p>'))
    failed = "".join(f'<tr><td><a href="/ui/devices/{quote(f["device"])}">{e(f["device"])}</a></td>'
                     f'<td>{f["wave"]}</td><td><code>{e(f["code"])}</code></td><td>{e(f["meaning"])}</td>'
                     f'<td>{e(f["reason"])}</td></tr>' for f in c["failed"])
    if c["failed_more"]:
        failed += f'<tr><td colspan="5" class="muted">and {c["failed_more"]} more</td></tr>'
    failed_html = ('<h2>Failed devices</h2>' + (
        '<table id="failed"><thead><tr><th>device</th><th>wave</th><th>code</th><th>meaning</th><th>reason</th>'
        f'</tr></thead><tbody>{failed}</tbody></table>' if failed else '<p class="muted">none</p>'))
    return {"campaign-head": head, "campaign-waves": waves_html, "campaign-clocks": clocks_html,
            "campaign-failed": failed_html}


def error_cell(job: dict[str, Any]) -> str:
    return f'<code>{e(job["code"])}</code> {e(job["meaning"])}' if job["code"] else "—"


def deployment_fragments(d: dict[str, Any], ctx: Ctx) -> dict[str, str]:
    counts = ", ".join(f"{k} {n}" for k, n in sorted(d["counts"].items()))
    owner = (f' · part of <a href="/ui/campaigns/{quote(d["campaign"])}">campaign {e(d["campaign"])}</a>'
             if d["campaign"] else "")
    actions = ("cancel",) if d["state"] == "active" and not d["campaign"] else ()
    head = (f'<p>release {e(d["release"])} · {state(d["state"])}{owner} · created {when(d["created_at"])}</p>'
            f'<p>{bar("deployment-progress", d["progress"], "mean job progress")} {e(counts)}</p>'
            f'{action_forms("deployments", str(d["id"]), str(d["id"]), d["release"], actions, ctx)}')
    rows = "".join(f'<tr><td><a href="/ui/devices/{quote(j["device"])}">{e(j["device"])}</a></td>'
                   f'<td>{j["id"]}</td><td>{state(j["state"])}</td>'
                   f'<td>{bar("job-%d-progress" % j["id"], j["progress"], "job")}</td>'
                   f'<td>{error_cell(j)}</td>'
                   f'<td>{e(j["reason"])}</td></tr>' for j in d["jobs"])
    jobs = ('<h2>Devices</h2><table id="jobs"><thead><tr><th>device</th><th>job</th><th>state</th><th>progress</th>'
            f'<th>error</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>')
    return {"deployment-head": head, "deployment-jobs": jobs}
