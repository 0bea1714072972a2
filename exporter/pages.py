"""What the HTTP endpoints show: the landing page and the /stuck document, from one snapshot."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

import exporter
from exporter.engine import EstateSnapshot, Snapshot
from exporter.model import STAGES, WAITING_STAGES
from exporter.stages import user_label_value


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def stuck_document(snapshot: Snapshot, user_label: str) -> dict[str, Any]:
    """The /stuck JSON: stuck users per estate and stage, longest-waiting first."""
    now = snapshot.taken_at
    estates = []
    for estate in snapshot.estates:
        view = estate.view
        entry: dict[str, Any] = {
            "estate": estate.name,
            "evaluated_at": _iso(view.evaluated_at if view else None),
        }
        stages: dict[str, Any] = {}
        for stage in WAITING_STAGES:
            stuck = [s for s in view.stuck_users if s.stage == stage] if view else []
            item: dict[str, Any] = {
                "stuck_after_seconds": estate.stuck_after.get(stage),
                "count": len(stuck),
            }
            if user_label != "none":
                item["users"] = [
                    {
                        "user": user_label_value(
                            user_label, s.sam_account_name, s.user_principal_name, s.user_key
                        ),
                        "entered_stage_at": _iso(s.entered),
                        "waiting_seconds": round(max(0.0, now - s.entered), 1),
                    }
                    for s in stuck
                ]
            stages[stage] = item
        entry["available"] = view is not None
        entry["stages"] = stages
        estates.append(entry)
    return {"generated_at": _iso(now), "estates": estates}


def landing_page(snapshot: Snapshot, title: str) -> str:
    rows = []
    for estate in snapshot.estates:
        for kind, status in estate.sources.items():
            state = "up" if status.up else ("down" if status.refreshed else "waiting")
            rows.append(
                "<tr>"
                + "".join(
                    f"<td>{html.escape(str(cell))}</td>"
                    for cell in (
                        estate.name,
                        kind,
                        status.description,
                        state,
                        _iso(status.last_success) or "never",
                        "" if status.records is None else status.records,
                        status.last_error or "",
                    )
                )
                + "</tr>"
            )
    ready = "ready" if snapshot.ready else "not ready yet (waiting for the first refresh)"
    pipeline = "".join(_pipeline_table(estate) for estate in snapshot.estates)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Version {html.escape(exporter.__version__)}; {html.escape(ready)};
snapshot taken {_iso(snapshot.taken_at)}.</p>
<ul><li><a href="metrics">Metrics</a></li><li><a href="stuck">Stuck users (JSON)</a></li>
<li><a href="-/healthy">Health</a></li><li><a href="-/ready">Readiness</a></li></ul>
{pipeline}
<h2>Sources</h2>
<table><tr><th>Estate</th><th>Source</th><th>Reads from</th><th>State</th><th>Last success</th>
<th>Records</th><th>Last error</th></tr>
{"".join(rows)}
</table></body></html>
"""


def _pipeline_table(estate: EstateSnapshot) -> str:
    view = estate.view
    if view is None:
        return ""
    cells = "".join(
        f"<tr><td>{stage}</td><td>{view.users[stage]}</td><td>{view.stuck[stage]}</td></tr>"
        for stage in STAGES
    )
    return (
        f"<h2>Pipeline: {html.escape(estate.name)}</h2>"
        "<table><tr><th>Stage</th><th>Users</th><th>Stuck</th></tr>"
        f"{cells}</table>"
    )
