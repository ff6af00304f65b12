"""Rich views of one deployment's progress: a bar per device and a summary line (`fota status`,
the demo)."""
from __future__ import annotations

from rich.progress import BarColumn, Progress, TextColumn

from fota.cli_common import console
from fota.device import protocol as P


def render_status(store, deployment_id: int | None = None):
    """The jobs of one deployment (the latest by default): (deployment, rows, summary line)."""
    from fota.server.deployments import FINAL_STATES
    from fota.server.store import Deployment, Job
    with store.session() as s:
        q = s.query(Deployment)
        dep = q.get(deployment_id) if deployment_id else q.order_by(Deployment.id.desc()).first()
        if dep is None:
            return None, None, "no deployments"
        jobs = s.query(Job).filter(Job.deployment_id == dep.id, Job.kind == "update").order_by(Job.device_id).all()
        version = dep.release.version
        rows = [(j.device_id, j.state, j.progress or 0.0, j.code, j.reason) for j in jobs]
    counts: dict[str, int] = {}
    for _, state, *_ in rows:
        counts[state] = counts.get(state, 0) + 1
    in_progress = sum(n for st, n in counts.items() if st not in FINAL_STATES)
    summary = (f"deployment {dep.id} (release {version}): " +
               ", ".join(f"{counts.get(st, 0)} {st}" for st in FINAL_STATES if counts.get(st)) +
               (", " if counts.keys() - set(FINAL_STATES) and any(counts.get(st) for st in FINAL_STATES) else "") +
               (f"{in_progress} in progress" if in_progress else ""))
    return dep, rows, summary


def progress_view(rows) -> Progress:
    prog = Progress(TextColumn("{task.fields[device]:<12}"), BarColumn(),
                    TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[state]:<11}"),
                    TextColumn("{task.fields[detail]}"), console=console, auto_refresh=False)
    for dev, state, progress, code, reason in rows:
        pct = 100.0 if state == P.CONFIRMED else progress * 100
        detail = f"{code}: {reason}" if code else ""
        prog.add_task("", total=100, completed=pct, device=dev, state=state, detail=detail)
    return prog


def refresh_live(live, store, deployment_id: int):
    """Redraw a Live view of one deployment; returns (rows, summary, every device finished)."""
    from rich.console import Group
    from fota.server.deployments import TERMINAL_STATES  # device states and timed_out
    _, rows, summary = render_status(store, deployment_id)
    live.update(Group(progress_view(rows), summary))
    return rows, summary, all(r[1] in TERMINAL_STATES for r in rows)
