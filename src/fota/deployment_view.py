"""Rich views of one deployment's progress: a bar per device and a summary line (`fota status`,
the demo). The deployment comes as plain data (fota.backend: the home's store, or the HTTP API)."""
from __future__ import annotations

from typing import Any, Callable

from rich.progress import BarColumn, Progress, TextColumn

from fota.cli_common import console
from fota.device import protocol as P

# The final states in display order (fota.server.deployments.FINAL_STATES: device states and timed_out)
FINAL_STATES = tuple(P.TERMINAL_STATES) + ("timed_out",)


def local_deployment(store, deployment_id: int | None = None) -> dict[str, Any] | None:
    """One deployment (the latest by default) from a store: id, release version and its update
    jobs (device, state, progress, code, reason); None when there is none."""
    from fota.server.deployments import DeploymentError, deployment_summary, recent_deployments
    if deployment_id is None:
        latest = recent_deployments(store, 1)
        if not latest:
            return None
        deployment_id = latest[0]["id"]
    try:
        return deployment_summary(store, deployment_id)
    except DeploymentError:
        return None


def summarize(dep: dict[str, Any]) -> tuple[list[tuple], str]:
    """(rows, summary line) of a deployment as fota.backend returns it."""
    rows = sorted((j["device"], j["state"], j["progress"] or 0.0, j["code"], j["reason"]) for j in dep["jobs"])
    counts: dict[str, int] = {}
    for _, state, *_ in rows:
        counts[state] = counts.get(state, 0) + 1
    in_progress = sum(n for st, n in counts.items() if st not in FINAL_STATES)
    summary = (f"deployment {dep['id']} (release {dep['release']}): " +
               ", ".join(f"{counts.get(st, 0)} {st}" for st in FINAL_STATES if counts.get(st)) +
               (", " if counts.keys() - set(FINAL_STATES) and any(counts.get(st) for st in FINAL_STATES) else "") +
               (f"{in_progress} in progress" if in_progress else ""))
    return rows, summary


def progress_view(rows) -> Progress:
    prog = Progress(TextColumn("{task.fields[device]:<12}"), BarColumn(),
                    TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[state]:<11}"),
                    TextColumn("{task.fields[detail]}"), console=console, auto_refresh=False)
    for dev, state, progress, code, reason in rows:
        pct = 100.0 if state == P.CONFIRMED else progress * 100
        detail = f"{code}: {reason}" if code else ""
        prog.add_task("", total=100, completed=pct, device=dev, state=state, detail=detail)
    return prog


def refresh_live(live, load: Callable[[int], dict[str, Any]], deployment_id: int):
    """Redraw a Live view of one deployment (load(id): its plain data); returns (rows, summary,
    every device finished)."""
    from rich.console import Group
    rows, summary = summarize(load(deployment_id))
    live.update(Group(progress_view(rows), summary))
    return rows, summary, all(r[1] in FINAL_STATES for r in rows)
