"""What the HTTP endpoints show: the landing page, /stuck and /trace, rendered from one snapshot.

The landing page is the page an administrator keeps open: per estate the funnel of its pipeline,
why users are stuck (reason, count, what to do), the longest-waiting stuck users, each source's
state, and a search box that explains one user (/trace). Server-rendered HTML with inline CSS and
no external assets, so it works offline, behind strict proxies and on a phone. With
``user_label: none`` no page names a user.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable
from importlib.resources import files
from typing import Any

import exporter
from exporter.durations import human_duration
from exporter.pipelines.explain import explain, find_rows, iso
from exporter.snapshot import EstateSnapshot, Snapshot, SourceStatus

LISTED_ON_PAGE = 25
# Inline (no external assets): the page works offline, behind strict proxies, on a phone.
_CSS = (files("exporter") / "data" / "pages.css").read_text(encoding="utf-8")


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _page(title: str, body: str) -> str:
    head = (
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<title>{_e(title)}</title><link rel="icon" href="data:,"><style>{_CSS}</style></head>'
    )
    banner = (
        '<header><h1><a href="./" class="home">intune-provisioning-exporter</a></h1>'
        '<nav><a href="metrics">metrics</a> · <a href="stuck">stuck (JSON)</a> · '
        '<a href="-/ready">ready</a></nav>'
        "</header>"
    )
    return f"<!DOCTYPE html>\n{head}\n<body>{banner}\n<main>{body}</main></body></html>\n"


def _waited(seconds: float) -> str:
    return human_duration(seconds) if seconds >= 1 else "just now"


# ============================================================================ landing page
def landing_page(snapshot: Snapshot, title: str = "intune-provisioning-exporter") -> str:
    ready = (
        '<span class="ok">ready</span>'
        if snapshot.ready
        else '<span class="warn">not ready yet (waiting for the first refresh of every source)</span>'
    )
    estates = [e.name for e in snapshot.estates]
    options = "".join(f"<option>{_e(n)}</option>" for n in estates)
    choose = (
        f'<select name="estate" aria-label="estate"><option value="">all estates</option>{options}</select>'
        if len(estates) > 1
        else ""
    )
    search = (
        '<section><h2>What happened to a user?</h2><form class="search" action="trace" method="get">'
        '<input type="text" name="user" required aria-label="user" '
        'placeholder="UPN, sAMAccountName, DOMAIN\\sam, objectGUID or Entra object id">'
        f'{choose}<button type="submit">Trace</button></form>'
        f'<p class="muted">Version {_e(exporter.__version__)}; {ready}; '
        f"snapshot taken {_e(iso(snapshot.taken_at))}.</p></section>"
    )
    body = search + "".join(_estate_section(snapshot, estate) for estate in snapshot.estates)
    return _page(title, body)


def _estate_section(snapshot: Snapshot, estate: EstateSnapshot) -> str:
    parts = [
        f'<section id="estate-{_e(estate.name)}"><h2>{_e(estate.name)} '
        f'<span class="pill">{_e(estate.pipeline)}</span></h2>'
    ]
    evaluation = estate.evaluation
    if evaluation is None:
        parts.append(
            '<p class="muted">No pipeline view yet: waiting for the first data of every source it needs.</p>'
        )
    else:
        summary = evaluation.summary(snapshot.taken_at)
        parts.append(_funnel(estate, summary.users, summary.stuck))
        parts.append(_reasons(estate, summary.stuck_reasons))
        parts.append(_stuck_users(snapshot, estate, [int(r) for r in summary.stuck_rows[:LISTED_ON_PAGE]]))
    parts.append(_sources(estate))
    parts.append("</section>")
    return "".join(parts)


def _funnel(estate: EstateSnapshot, users: dict[str, int] | Any, stuck: dict[str, int] | Any) -> str:
    # Log-scaled bars: the final stage usually holds almost everyone, and a linear scale would
    # shrink the stages where users wait to invisible slivers. The red part is the stuck share.
    largest = math.log1p(max(users.values(), default=0)) or 1.0
    rows = []
    for stage in estate.settings.definition.stages:
        count, stuck_count = users[stage], stuck[stage]
        width = 100.0 * math.log1p(count) / largest
        stuck_share = 100.0 * stuck_count / count if count else 0.0
        rows.append(
            f"<tr><td>{_e(stage)}</td><td class='num'>{count}</td>"
            f"<td class='num {'bad' if stuck_count else 'muted'}'>{stuck_count}</td>"
            f"<td class='barcell hide-narrow'><div class='track' style='width:{width:.1f}%'>"
            f"<div class='bar' style='width:100%;display:flex;justify-content:flex-end'>"
            f"<div class='bar stuck' style='width:{stuck_share:.1f}%'></div></div></div></td></tr>"
        )
    return (
        "<h3>Pipeline</h3><div class='scroll'><table class='funnel'>"
        "<tr><th>Stage</th><th class='num'>Users</th>"
        "<th class='num'>Stuck</th><th class='hide-narrow muted'>users (log scale), stuck in red</th></tr>"
        + "".join(rows)
        + "</table></div>"
    )


def _reasons(estate: EstateSnapshot, counts: Any) -> str:
    definition = estate.settings.definition
    rows = [
        f"<tr><td>{_e(reason.stage)}</td><td><code>{_e(reason.name)}</code></td>"
        f"<td class='num bad'>{counts[(reason.stage, reason.name)]}</td><td>{_e(reason.action)}</td></tr>"
        for reason in definition.reasons
        if counts.get((reason.stage, reason.name), 0)
    ]
    if not rows:
        return "<h3>Why users are stuck</h3><p class='ok'>Nobody is stuck.</p>"
    rows.sort(key=lambda row: 0)  # keep the contract's order (stage, then precedence)
    return (
        "<h3>Why users are stuck</h3><div class='scroll'><table class='reasons'>"
        "<tr><th>Stage</th><th>Reason</th>"
        "<th class='num'>Stuck</th><th>What to do</th></tr>" + "".join(rows) + "</table></div>"
    )


def _stuck_users(snapshot: Snapshot, estate: EstateSnapshot, rows: Iterable[int]) -> str:
    evaluation = estate.evaluation
    assert evaluation is not None
    labeler = snapshot.labeler
    listed = list(rows)
    if not listed:
        return ""
    if not labeler.names_users:
        return f"<p class='muted'>{len(listed)}+ stuck users (names hidden: user_label is none).</p>"
    ad = evaluation.ad
    items = []
    for row in listed:
        name = (
            labeler.label(
                ad.text("sam", row) or "", ad.text("upn", row), bytes(ad.array("guid")[row].tobytes())
            )
            or ""
        )
        waited = snapshot.taken_at - float(evaluation.entered[row])
        link = f"trace?user={_e(_query(name))}&amp;estate={_e(_query(estate.name))}"
        traceable = labeler.mode != "hash"
        who = f"<a href='{link}'>{_e(name)}</a>" if traceable else f"<code>{_e(name)}</code>"
        items.append(
            f"<tr><td>{who}</td><td>{_e(evaluation.stage_name(row))}</td>"
            f"<td><code>{_e(evaluation.reason_name(row))}</code></td>"
            f"<td class='num'>{_e(_waited(waited))}</td></tr>"
        )
    return (
        "<h3>Longest-waiting stuck users</h3><div class='scroll'><table class='stuck'><tr><th>User</th>"
        "<th>Stage</th><th>Reason</th><th class='num'>Waiting</th></tr>" + "".join(items) + "</table></div>"
    )


def _query(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="@")


def _source_state(status: SourceStatus) -> str:
    if status.up:
        return "<span class='ok'>up</span>"
    return "<span class='bad'>down</span>" if status.refreshed else "<span class='muted'>waiting</span>"


def _sources(estate: EstateSnapshot) -> str:
    rows = []
    for kind, status in estate.sources.items():
        notes = " ".join(
            note
            for note in (
                f"<span class='bad'>{_e(status.last_error)}</span>" if status.last_error else "",
                f"<span class='warn'>{_e(status.warning)}</span>" if status.warning else "",
            )
            if note
        )
        rows.append(
            f"<tr><td>{_e(kind)}</td><td class='hide-narrow'>{_e(status.description)}</td>"
            f"<td>{_source_state(status)}</td>"
            f"<td>{_e(iso(status.last_success) or 'never')}</td>"
            f"<td class='num'>{'' if status.records is None else status.records}</td><td>{notes}</td></tr>"
        )
    return (
        "<h3>Sources</h3><div class='scroll'><table class='sources'><tr><th>Source</th>"
        "<th class='hide-narrow'>Reads from</th><th>State</th><th>Last success</th>"
        "<th class='num'>Records</th>"
        "<th>Last error / warning</th></tr>" + "".join(rows) + "</table></div>"
    )


# ============================================================================ /stuck
def stuck_document(snapshot: Snapshot, user_label: str | None = None) -> dict[str, Any]:
    """The /stuck JSON: stuck users per estate and stage, longest-waiting first, with reasons."""
    now = snapshot.taken_at
    labeler = snapshot.labeler
    estates = []
    for estate in snapshot.estates:
        evaluation = estate.evaluation
        entry: dict[str, Any] = {
            "estate": estate.name,
            "pipeline": estate.pipeline,
            "evaluated_at": iso(evaluation.evaluated_at) if evaluation else None,
            "available": evaluation is not None,
        }
        stages: dict[str, Any] = {}
        rows_by_stage: dict[str, list[int]] = {s: [] for s in estate.settings.definition.waiting_stages}
        if evaluation is not None:
            for row in evaluation.summary(now).stuck_rows:
                rows_by_stage[evaluation.stage_name(int(row))].append(int(row))
        for stage, rows in rows_by_stage.items():
            item: dict[str, Any] = {"stuck_after_seconds": estate.stuck_after.get(stage), "count": len(rows)}
            if labeler.names_users and evaluation is not None:
                item["users"] = [_stuck_user(snapshot, estate, row, now) for row in rows]
            else:
                item["reasons"] = _reason_counts(estate, stage, rows)
            stages[stage] = item
        entry["stages"] = stages
        estates.append(entry)
    return {"generated_at": iso(now), "estates": estates}


def _stuck_user(snapshot: Snapshot, estate: EstateSnapshot, row: int, now: float) -> dict[str, Any]:
    evaluation = estate.evaluation
    assert evaluation is not None
    explained = explain(evaluation, row, now, estate.name)
    ad = evaluation.ad
    return {
        "user": snapshot.labeler.label(explained.sam, explained.upn, bytes(ad.array("guid")[row].tobytes())),
        "entered_stage_at": iso(explained.entered),
        "waiting_seconds": round(max(0.0, explained.waiting), 1),
        "reason": explained.reason,
        "detail": explained.detail if snapshot.labeler.mode in ("upn", "sam") else None,
        "action": explained.action,
    }


def _reason_counts(estate: EstateSnapshot, stage: str, rows: list[int]) -> dict[str, int]:
    evaluation = estate.evaluation
    counts = {r.name: 0 for r in estate.settings.definition.reasons_of(stage)}
    if evaluation is not None:
        for row in rows:
            name = evaluation.reason_name(row)
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
    return counts


# ============================================================================ /trace
class TraceNotFound(LookupError):
    pass


def trace_documents(snapshot: Snapshot, user: str, estate_name: str | None = None) -> list[dict[str, Any]]:
    """The trace JSON of every in-scope user matching ``user`` (in one estate, or in all)."""
    found = []
    for estate in snapshot.estates:
        if estate_name and estate.name != estate_name:
            continue
        evaluation = estate.evaluation
        if evaluation is None:
            continue
        for row in find_rows(evaluation, user):
            found.append(explain(evaluation, row, snapshot.taken_at, estate.name).document())
    if not found:
        raise TraceNotFound(user)
    return found


def trace_page(snapshot: Snapshot, user: str, estate_name: str | None = None) -> tuple[int, str]:
    """(status, HTML) for /trace."""
    try:
        documents = trace_documents(snapshot, user, estate_name)
    except TraceNotFound:
        body = (
            f"<section><h2>No in-scope user matches <code>{_e(user)}</code></h2>"
            "<p>Search by UPN, sAMAccountName, DOMAIN\\sam, objectGUID or Entra object id. A user outside "
            "the AD search bases or filtered out by user_filter is not in scope.</p>"
            "<p><a href='./'>Back</a></p></section>"
        )
        return 404, _page(f"{user}: not found", body)
    return 200, _page(f"Trace {user}", "".join(_trace_section(d) for d in documents))


def _trace_section(document: dict[str, Any]) -> str:
    user = document["user"]
    steps = "".join(
        f"<li><span class='tick {'ok' if step['done'] else 'bad'}'>{'✓' if step['done'] else '✗'}</span>"
        f"<b>{_e(step['stage'])}</b> — {_e(step['evidence'])}</li>"
        for step in document["steps"]
    )
    if document["reason"] is None:
        verdict = f"<p class='ok'>At <b>{_e(document['stage'])}</b>: this user has completed the chain.</p>"
    else:
        state = "<span class='bad'>stuck</span>" if document["stuck"] else "<span class='warn'>waiting</span>"
        waited = _waited(float(document.get("waiting_seconds") or 0))
        verdict = (
            f"<p>{state} at <b>{_e(document['stage'])}</b> for {_e(waited)} "
            f"(since {_e(document['entered_stage_at'])})</p>"
            f"<p>Reason: <code>{_e(document['reason'])}</code> — {_e(document['detail'])}</p>"
            f"<p><b>What to do:</b> {_e(document['action'])}</p>"
        )
    return (
        f"<section class='trace'><h2>{_e(user['upn'] or user['sam'])} "
        f"<span class='pill'>{_e(document['estate'])}</span> "
        f"<span class='pill'>{_e(document['pipeline'])}</span></h2>"
        f"<p class='muted'>sAMAccountName {_e(user['sam'])} · "
        f"objectGUID <code>{_e(user['object_guid'])}</code> · "
        f"objectSid <code>{_e(user['object_sid'])}</code></p>{verdict}"
        f"<h3>Steps</h3><ul class='steps'>{steps}</ul></section>"
    )


def render_time() -> float:
    return time.time()
