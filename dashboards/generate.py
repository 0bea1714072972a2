"""Generate the Grafana dashboards of intune-provisioning-exporter as plain JSON.

    python -m dashboards.generate           rewrite dashboards/*.json and the panel list in docs/dashboards.md
    python -m dashboards.generate --check   exit 1 when a committed file differs from what this script builds

The dashboards target Grafana 10/11 (schemaVersion 39) and a Prometheus data source chosen through the
``datasource`` variable. Every query is scoped by the ``job``, ``instance`` and (where the metric has the
label) ``estate`` variables, so the three dashboards can share one variable selection through their links.

Stage and reason names, the order of each pipeline's chain and the admin's next step for each reason come
from ``exporter.pipelines.definitions``; only the stages' display titles live here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.pipelines.definitions import PIPELINE_NAMES, PIPELINES, all_stages

Json = dict[str, Any]

DASHBOARD_DIR = Path(__file__).resolve().parent
DOCS_FILE = DASHBOARD_DIR.parent / "docs" / "dashboards.md"
DOCS_BEGIN = "<!-- BEGIN GENERATED PANEL LIST (python -m dashboards.generate) -->"
DOCS_END = "<!-- END GENERATED PANEL LIST -->"

SCHEMA_VERSION = 39
GRID_WIDTH = 24
LINK_TAG = "intune-provisioning-exporter"
TAGS = ["intune", LINK_TAG]
DATASOURCE: Json = {"type": "prometheus", "uid": "${datasource}"}

PROVISIONING_UID = "intune-provisioning-overview"
LICENSES_UID = "intune-licenses"
HEALTH_UID = "intune-exporter-health"

# How each stage reads in legends. The stages themselves (names, order, pipelines) come from the
# pipeline definitions; a stage added there without a title here stops the generator.
STAGE_TITLES = {
    "ad_created": "AD account created",
    "entra_synced": "Synced to Entra ID",
    "cm_discovered": "Discovered by ConfigMgr",
    "in_intune_collection": "In an Intune collection",
    "connector_synced": "CloudUserID set",
    "intune_enabled": "Intune enabled",
    "intune_licensed": "Intune licence assigned",
    "device_enrolled": "Device enrolled",
    "device_compliant": "Compliant device",
}


def pipelines_with(stage: str) -> tuple[str, ...]:
    return tuple(name for name, definition in PIPELINES.items() if stage in definition.stages)


def stage_label(stage: str) -> str:
    """'3 Discovered by ConfigMgr': the stage's step number in its chain keeps legends in chain order.
    Stages shared by both chains sit at the same step in each."""
    if stage not in STAGE_TITLES:
        raise ValueError(f"stage {stage} of exporter/pipelines/definitions.py has no title in STAGE_TITLES")
    steps = {PIPELINES[name].stages.index(stage) + 1 for name in pipelines_with(stage)}
    return f"{steps.pop()} {STAGE_TITLES[stage]}" if len(steps) == 1 else STAGE_TITLES[stage]


# Every stage of both chains, in chain order (hybrid_mdm's, then the stages only cloud has). A query
# per stage returns nothing for an estate on the other chain, so each estate shows its own chain.
STAGES: tuple[tuple[str, str], ...] = tuple((stage, stage_label(stage)) for stage in all_stages())
FINAL_STAGES = tuple(definition.final_stage for definition in PIPELINES.values())
WAITING_STAGES = tuple((stage, label) for stage, label in STAGES if stage not in FINAL_STAGES)

# Threshold steps: (colour, lower bound); the first step has no bound.
Steps = Sequence[tuple[str, float | None]]
ALWAYS_GREEN: Steps = (("green", None),)
RED_FROM_ONE: Steps = (("green", None), ("red", 1))
ORANGE_FROM_ONE: Steps = (("green", None), ("orange", 1))

UP_DOWN = ((0, "Down", "red"), (1, "Up", "green"))


# --------------------------------------------------------------------------------------------------
# Query helpers


def sel(metric: str, *matchers: str, estate: bool = True) -> str:
    """A selector scoped by the dashboard variables; `estate` is False for metrics without that label."""
    scope = ['job=~"$job"', 'instance=~"$instance"']
    if estate:
        scope.append('estate=~"$estate"')
    return f"{metric}{{{', '.join([*scope, *matchers])}}}"


def matcher(label: str, value: str, op: str = "=") -> str:
    return f'{label}{op}"{value}"'


def stage_matcher(stage: str) -> str:
    return matcher("provisioning_stage", stage)


def per_minute(counter_selector: str, by: str) -> str:
    """Rate of a counter, expressed per minute: the exporter refreshes every few minutes, so per-second
    values would be tiny fractions."""
    return f"sum by ({by}) (rate({counter_selector}[$__rate_interval])) * 60"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False  # tables: one value per series at the end of the time range
    table: bool = False
    # Not part of the JSON; what the tests expect of the query against the demo exporter. pipelines:
    # the estates whose pipeline is listed have data for it. sparse: the query keeps only some
    # rows (a `> 0` filter, errors that only some estates have), so not every such estate shows.
    pipelines: tuple[str, ...] = PIPELINE_NAMES
    sparse: bool = False

    def to_json(self, ref_id: str) -> Json:
        target: Json = {
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": self.expr,
            "instant": self.instant,
            "legendFormat": self.legend or "__auto",
            "range": not self.instant,
            "refId": ref_id,
        }
        if self.table:
            target["format"] = "table"
        return target


def ref_id(index: int) -> str:
    return chr(ord("A") + index)


# --------------------------------------------------------------------------------------------------
# Field configuration helpers


def thresholds(steps: Steps) -> Json:
    return {"mode": "absolute", "steps": [{"color": color, "value": bound} for color, bound in steps]}


def value_mappings(entries: Sequence[tuple[int, str, str]]) -> list[Json]:
    options = {
        str(value): {"color": color, "index": index, "text": text}
        for index, (value, text, color) in enumerate(entries)
    }
    return [{"options": options, "type": "value"}]


def override(matcher_id: str, matched: str, properties: dict[str, Any]) -> Json:
    return {
        "matcher": {"id": matcher_id, "options": matched},
        "properties": [{"id": key, "value": value} for key, value in properties.items()],
    }


REDUCE_LAST: Json = {"calcs": ["lastNotNull"], "fields": "", "values": False}


@dataclass
class Panel:
    """One visualisation; its id and grid position are given when it is placed on a grid."""

    kind: str
    title: str
    description: str
    queries: Sequence[Query]
    unit: str
    options: Json
    custom: Json = field(default_factory=dict)
    steps: Steps = ALWAYS_GREEN
    mappings: list[Json] = field(default_factory=list)
    color: Json = field(default_factory=lambda: {"mode": "thresholds"})
    overrides: list[Json] = field(default_factory=list)
    transformations: list[Json] = field(default_factory=list)
    extra_defaults: Json = field(default_factory=dict)
    extra: Json = field(default_factory=dict)

    def to_json(self) -> Json:
        defaults: Json = {
            "color": self.color,
            "custom": self.custom,
            "mappings": self.mappings,
            "thresholds": thresholds(self.steps),
            "unit": self.unit,
            **self.extra_defaults,
        }
        panel: Json = {
            "type": self.kind,
            "title": self.title,
            "description": self.description,
            "datasource": DATASOURCE,
            "fieldConfig": {"defaults": defaults, "overrides": self.overrides},
            "options": self.options,
            "targets": [query.to_json(ref_id(index)) for index, query in enumerate(self.queries)],
        }
        if self.transformations:
            panel["transformations"] = self.transformations
        panel.update(self.extra)
        return panel


def timeseries(
    title: str,
    description: str,
    queries: Sequence[Query],
    unit: str,
    *,
    stacked: bool = False,
    bars: bool = False,
    steps: Steps = ALWAYS_GREEN,
) -> Panel:
    custom: Json = {
        "axisSoftMin": 0,
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else 10,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stacked else "none"},
    }
    options: Json = {
        "legend": {
            "calcs": ["lastNotNull", "max"],
            "displayMode": "table",
            "placement": "bottom",
            "showLegend": True,
        },
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return Panel(
        "timeseries",
        title,
        description,
        queries,
        unit,
        options,
        custom=custom,
        steps=steps,
        color={"mode": "palette-classic"},
    )


def stat(
    title: str,
    description: str,
    queries: Sequence[Query],
    unit: str,
    *,
    steps: Steps = ALWAYS_GREEN,
    mappings: Sequence[tuple[int, str, str]] = (),
    fixed_color: str | None = None,
    text_mode: str = "auto",
    graph: bool = False,
) -> Panel:
    options: Json = {
        "colorMode": "value" if fixed_color else "background",
        "graphMode": "area" if graph else "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "reduceOptions": REDUCE_LAST,
        "textMode": text_mode,
    }
    color: Json = {"fixedColor": fixed_color, "mode": "fixed"} if fixed_color else {"mode": "thresholds"}
    return Panel(
        "stat",
        title,
        description,
        queries,
        unit,
        options,
        steps=steps,
        mappings=value_mappings(mappings) if mappings else [],
        color=color,
    )


def bargauge(
    title: str,
    description: str,
    queries: Sequence[Query],
    unit: str,
    *,
    steps: Steps = ALWAYS_GREEN,
    minimum: float | None = 0,
    maximum: float | None = None,
    fixed_color: str | None = None,
    overrides: Sequence[Json] = (),
    extra: Json | None = None,
) -> Panel:
    options: Json = {
        "displayMode": "gradient",
        "namePlacement": "auto",
        "orientation": "horizontal",
        "reduceOptions": REDUCE_LAST,
        "showUnfilled": True,
        "valueMode": "color",
    }
    limits: Json = {key: value for key, value in (("min", minimum), ("max", maximum)) if value is not None}
    color: Json = {"fixedColor": fixed_color, "mode": "fixed"} if fixed_color else {"mode": "thresholds"}
    return Panel(
        "bargauge",
        title,
        description,
        queries,
        unit,
        options,
        steps=steps,
        color=color,
        overrides=list(overrides),
        extra_defaults=limits,
        extra=extra or {},
    )


def state_timeline(
    title: str, description: str, queries: Sequence[Query], mappings: Sequence[tuple[int, str, str]]
) -> Panel:
    options: Json = {
        "alignValue": "center",
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
        "mergeValues": True,
        "rowHeight": 0.8,
        "showValue": "auto",
        "tooltip": {"mode": "single", "sort": "none"},
    }
    return Panel(
        "state-timeline",
        title,
        description,
        queries,
        "none",
        options,
        custom={"fillOpacity": 80, "lineWidth": 0},
        mappings=value_mappings(mappings),
    )


def table(
    title: str,
    description: str,
    queries: Sequence[Query],
    unit: str,
    *,
    transformations: Sequence[Json],
    sort_by: str,
    descending: bool = False,
    steps: Steps = ALWAYS_GREEN,
    overrides: Sequence[Json] = (),
    decimals: int | None = None,
) -> Panel:
    options: Json = {
        "cellHeight": "sm",
        "footer": {"countRows": False, "fields": "", "reducer": ["sum"], "show": False},
        "showHeader": True,
        "sortBy": [{"desc": descending, "displayName": sort_by}],
    }
    custom: Json = {"align": "auto", "cellOptions": {"type": "auto"}, "filterable": True, "inspect": False}
    return Panel(
        "table",
        title,
        description,
        queries,
        unit,
        options,
        custom=custom,
        steps=steps,
        overrides=list(overrides),
        transformations=list(transformations),
        extra_defaults={} if decimals is None else {"decimals": decimals},
    )


def organize(exclude: Sequence[str], rename: dict[str, str]) -> Json:
    """Hide technical columns and give the others readable names, in the order of `rename`."""
    return {
        "id": "organize",
        "options": {
            "excludeByName": {name: True for name in exclude},
            "indexByName": {name: index for index, name in enumerate(rename)},
            "renameByName": rename,
        },
    }


# --------------------------------------------------------------------------------------------------
# Layout


class Grid:
    """Places panels left to right in lines of 24 columns, under rows.

    Panels after a collapsed row are stored inside that row (as Grafana does), positioned as they
    will be once the row is expanded; the main grid continues right below the collapsed row.
    """

    def __init__(self) -> None:
        self.panels: list[Json] = []
        # (panel title, refId) -> the query it was built from, with what the tests expect of it.
        self.queries: dict[tuple[str, str], Query] = {}
        self._y = 0
        self._x = 0
        self._line_height = 0
        self._next_id = 1
        self._collapsed_row: Json | None = None

    def row(self, title: str, *, collapsed: bool = False) -> None:
        self._end_line()
        if self._collapsed_row is not None:
            self._y = self._collapsed_row["gridPos"]["y"] + 1
        row: Json = {
            "id": self._take_id(),
            "type": "row",
            "title": title,
            "collapsed": collapsed,
            "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": self._y},
            "panels": [],
        }
        self.panels.append(row)
        self._y += 1
        self._collapsed_row = row if collapsed else None

    def add(self, panel: Panel, width: int, height: int) -> None:
        if self._x + width > GRID_WIDTH:
            self._end_line()
        placed: Json = {
            "id": self._take_id(),
            "gridPos": {"h": height, "w": width, "x": self._x, "y": self._y},
            **panel.to_json(),
        }
        container = self._collapsed_row["panels"] if self._collapsed_row is not None else self.panels
        container.append(placed)
        for index, query in enumerate(panel.queries):
            self.queries[(panel.title, ref_id(index))] = query
        self._x += width
        self._line_height = max(self._line_height, height)

    def _end_line(self) -> None:
        self._y += self._line_height
        self._x = 0
        self._line_height = 0

    def _take_id(self) -> int:
        panel_id = self._next_id
        self._next_id += 1
        return panel_id


# --------------------------------------------------------------------------------------------------
# Dashboard frame: variables, links, metadata

PANEL_NAMES = {
    "bargauge": "Bar gauge",
    "stat": "Stat",
    "state-timeline": "State timeline",
    "table": "Table",
    "timeseries": "Time series",
}


def query_variable(name: str, label: str, query: str, description: str) -> Json:
    return {
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "datasource": DATASOURCE,
        "definition": query,
        "description": description,
        "hide": 0,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "options": [],
        "query": query,
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
        "type": "query",
    }


def variables() -> list[Json]:
    datasource: Json = {
        "current": {},
        "description": "Prometheus that scrapes intune-provisioning-exporter",
        "hide": 0,
        "includeAll": False,
        "label": "Data source",
        "multi": False,
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
        "type": "datasource",
    }
    return [
        datasource,
        query_variable(
            "job",
            "Job",
            "label_values(intune_exporter_build_info, job)",
            "Prometheus scrape job(s) of the exporter",
        ),
        query_variable(
            "instance",
            "Instance",
            'label_values(intune_exporter_build_info{job=~"$job"}, instance)',
            "Exporter instance(s)",
        ),
        query_variable(
            "estate",
            "Estate",
            'label_values(intune_exporter_source_up{job=~"$job", instance=~"$instance"}, estate)',
            "Estates (AD forest + Entra tenant + ConfigMgr site) named in the exporter config",
        ),
    ]


def links() -> list[Json]:
    # One link by tag: every dashboard of the exporter, carrying the time range and the variables.
    return [
        {
            "asDropdown": False,
            "icon": "external link",
            "includeVars": True,
            "keepTime": True,
            "tags": [LINK_TAG],
            "targetBlank": False,
            "title": "Intune dashboards",
            "tooltip": "",
            "type": "dashboards",
            "url": "",
        }
    ]


def panel_types(panels: Sequence[Json]) -> list[str]:
    found: set[str] = set()
    for panel in panels:
        found.add(panel["type"])
        found.update(child["type"] for child in panel.get("panels", []))
    return sorted(found - {"row"})


def requires(panels: Sequence[Json]) -> list[Json]:
    needed: list[Json] = [
        {"id": "grafana", "name": "Grafana", "type": "grafana", "version": "10.0.0"},
        {"id": "prometheus", "name": "Prometheus", "type": "datasource", "version": "1.0.0"},
    ]
    needed += [
        {"id": kind, "name": PANEL_NAMES[kind], "type": "panel", "version": ""}
        for kind in panel_types(panels)
    ]
    return needed


# uid -> the queries of its panels, filled as the dashboards are built (see queries_by_target).
_BUILT_QUERIES: dict[str, dict[tuple[str, str], Query]] = {}


def dashboard(uid: str, title: str, description: str, grid: Grid) -> Json:
    _BUILT_QUERIES[uid] = dict(grid.queries)
    return {
        "__requires": requires(grid.panels),
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": links(),
        "panels": grid.panels,
        "refresh": "1m",
        "schemaVersion": SCHEMA_VERSION,
        "tags": list(TAGS),
        "templating": {"list": variables()},
        "time": {"from": "now-24h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


# --------------------------------------------------------------------------------------------------
# Provisioning overview

USERS = "intune_provisioning_users"
STUCK = "intune_provisioning_stuck_users"
STUCK_REASON = "intune_provisioning_stuck_reason_users"
OLDEST = "intune_provisioning_stage_oldest_entry_timestamp_seconds"
STUCK_INFO = "intune_provisioning_stuck_user_info"
PIPELINE_INFO = "intune_provisioning_pipeline_info"
MISSING_CLOUD_ID = "intune_provisioning_users_missing_cloud_user_id"
MISMATCH = "intune_provisioning_cloud_user_id_mismatch_users"
ORPHANS = "intune_provisioning_orphan_users"
UNLICENSED = "intune_provisioning_enabled_users_without_intune_license"
LAST_SYNC = "intune_entra_connect_last_sync_timestamp_seconds"
DEVICES = "intune_devices"

HYBRID_ONLY = ("hybrid_mdm",)
COMPLIANCE_COLOURS = (("compliant", "green"), ("noncompliant", "red"), ("inGracePeriod", "orange"))
CLOUD_ONLY = ("cloud",)


def chain_help(name: str) -> str:
    definition = PIPELINES[name]
    steps = ", ".join(stage_label(stage) for stage in definition.stages)
    return f"{name}: {steps}."


STAGE_HELP = (
    "A user counts at the last stage of its estate's chain that it has reached without gaps. "
    + " ".join(chain_help(name) for name in PIPELINES)
)

# A (stage, reason) pair as one label value, which the value mappings below turn into the action.
ACTION_LABEL = "action"


def with_action(expr: str) -> str:
    """The series with an extra label `action` = "<stage>:<reason>"; the table shows it as the admin's
    next step through value mappings (PromQL cannot carry the text itself)."""
    return f'label_join({expr}, "{ACTION_LABEL}", ":", "provisioning_stage", "reason")'


def action_mappings() -> list[Json]:
    """ "stage:reason" -> the action of exporter/pipelines/definitions.py, for every pair of both chains."""
    options: Json = {}
    for definition in PIPELINES.values():
        for reason in definition.reasons:
            options.setdefault(
                f"{reason.stage}:{reason.name}", {"index": len(options), "text": reason.action}
            )
    return [{"options": options, "type": "value"}]


def action_column(name: str) -> Json:
    return override(
        "byName", name, {"mappings": action_mappings(), "custom.width": 620, "custom.inspect": True}
    )


def final_stage_matcher(op: str) -> str:
    return matcher("provisioning_stage", "|".join(FINAL_STAGES), op)


def provisioning_summary(grid: Grid) -> None:
    grid.row("Summary")
    grid.add(
        stat(
            "Users still in the pipeline",
            "AD users in scope that have not reached the last stage of their chain (Intune enabled, or a "
            "compliant device in a cloud estate), summed over the selected estates. Includes users still "
            "within their normal waiting time.",
            [Query(f"sum({sel(USERS, final_stage_matcher('!~'))})", "in the pipeline")],
            "short",
            fixed_color="blue",
            graph=True,
        ),
        4,
        4,
    )
    grid.add(
        stat(
            "Stuck users",
            "Users who have been at their current stage for longer than the estate's stuck_after for "
            "that stage. Each one needs a look: see 'Why users are stuck' and 'Currently stuck users'.",
            [Query(f"sum({sel(STUCK)})", "stuck")],
            "short",
            steps=RED_FROM_ONE,
            graph=True,
        ),
        4,
        4,
    )
    grid.add(
        stat(
            "Users at the end of the chain",
            "Users at the last stage of their estate's chain: intune_enabled (hybrid_mdm: the ConfigMgr "
            "CloudUserID equals the Entra object id) or device_compliant (cloud: a compliant device that "
            "checks in).",
            [Query(f"sum({sel(USERS, final_stage_matcher('=~'))})", "done")],
            "short",
            fixed_color="green",
            graph=True,
        ),
        4,
        4,
    )
    grid.add(
        stat(
            "Missing CloudUserID (in collection)",
            "ConfigMgr user records that are members of an Intune collection but have no CloudUserID: "
            "the Intune connector has not synced them yet. Should fall back to 0 within a sync cycle "
            "(hybrid_mdm estates).",
            [
                Query(
                    f"sum({sel(MISSING_CLOUD_ID, matcher('in_intune_collection', 'true'))})",
                    "missing",
                    pipelines=HYBRID_ONLY,
                )
            ],
            "short",
            steps=ORANGE_FROM_ONE,
            graph=True,
        ),
        4,
        4,
    )
    grid.add(
        stat(
            "CloudUserID mismatches",
            "Users whose ConfigMgr CloudUserID is set but is not their Entra object id (for example a "
            "user deleted and recreated in Entra ID). They cannot reach stage 6 until ConfigMgr re-syncs "
            "(hybrid_mdm estates).",
            [Query(f"sum({sel(MISMATCH)})", "mismatched", pipelines=HYBRID_ONLY)],
            "short",
            steps=RED_FROM_ONE,
            graph=True,
        ),
        4,
        4,
    )
    grid.add(
        stat(
            "Orphan records",
            "Synced Entra users and ConfigMgr user records that match no AD user in scope (deleted, "
            "disabled or moved out of the search bases).",
            [Query(f"sum({sel(ORPHANS)})", "orphans", pipelines=HYBRID_ONLY)],
            "short",
            steps=ORANGE_FROM_ONE,
            graph=True,
        ),
        4,
        4,
    )


def stage_query(expr: str, stage: str, legend: str) -> Query:
    return Query(expr, legend, pipelines=pipelines_with(stage))


def provisioning_pipeline(grid: Grid) -> None:
    grid.row("Provisioning pipeline")
    grid.add(
        stat(
            "Pipeline per estate",
            "The chain each selected estate runs (its `pipeline` in the exporter config): hybrid_mdm "
            "(ConfigMgr and its Intune connector) or cloud (Intune licence, enrolled and compliant device). "
            "The panels below show each estate its own chain's stages.",
            [Query(f"max by (estate, pipeline) ({sel(PIPELINE_INFO)})", "{{estate}}: {{pipeline}}")],
            "none",
            fixed_color="blue",
            text_mode="name",
        ),
        24,
        3,
    )
    final_refs = [ref_id(index) for index, (stage, _) in enumerate(STAGES) if stage in FINAL_STAGES]
    grid.add(
        bargauge(
            "Provisioning funnel: $estate",
            "Users per provisioning stage in chain order; one panel per selected estate, showing the "
            "stages of that estate's pipeline (the last one in green). " + STAGE_HELP,
            [stage_query(f"sum({sel(USERS, stage_matcher(stage))})", stage, name) for stage, name in STAGES],
            "short",
            fixed_color="blue",
            overrides=[
                override("byFrameRefID", ref, {"color": {"fixedColor": "green", "mode": "fixed"}})
                for ref in final_refs
            ],
            extra={"maxPerRow": 4, "repeat": "estate", "repeatDirection": "h"},
        ),
        24,
        8,
    )
    grid.add(
        timeseries(
            "Stuck users per stage",
            "Users over their stage's stuck_after, per estate and stage, over time. Where to look when a "
            "line keeps growing: 'Why users are stuck' below names the reasons and what to do; the "
            "runbooks (docs/runbooks.md) walk through each stage of both chains.",
            [
                stage_query(
                    f"sum by (estate) ({sel(STUCK, stage_matcher(stage))})", stage, f"{{{{estate}}}} · {name}"
                )
                for stage, name in WAITING_STAGES
            ],
            "short",
        ),
        12,
        9,
    )
    grid.add(
        bargauge(
            "Longest wait per stage",
            "How long the user who has waited longest at each stage has been there (now minus "
            "intune_provisioning_stage_oldest_entry_timestamp_seconds). A stage with nobody in it exports 0 "
            "and is left out. Compare with stuck_after in the exporter config; orange after 1 hour, red "
            "after 4 hours.",
            [
                stage_query(
                    f"time() - min by (estate) ({sel(OLDEST, stage_matcher(stage))} > 0)",
                    stage,
                    f"{{{{estate}}}} · {name}",
                )
                for stage, name in WAITING_STAGES
            ],
            "s",
            steps=(("green", None), ("orange", 3600), ("red", 4 * 3600)),
        ),
        12,
        9,
    )


def provisioning_reasons(grid: Grid) -> None:
    grid.row("Why users are stuck")
    reasons = f"sum by (estate, provisioning_stage, reason) ({sel(STUCK_REASON)}) > 0"
    grid.add(
        timeseries(
            "Stuck users by reason",
            "Stuck users per estate, stage and reason over time (reasons with nobody stuck are left out). "
            "Each stuck user has exactly one reason: the first row of its stage in the reason table "
            "(docs/runbooks.md) that holds, so per stage the reasons add up to 'Stuck users per stage'.",
            [Query(reasons, "{{estate}} · {{provisioning_stage}} · {{reason}}")],
            "short",
            stacked=True,
        ),
        24,
        9,
    )
    grid.add(
        table(
            "Why users are stuck now",
            "Stuck users per estate, stage and reason right now, the most frequent first, with what the "
            "admin does about each reason.",
            [Query(with_action(f"({reasons})"), instant=True, table=True)],
            "short",
            transformations=[
                organize(
                    exclude=["Time"],
                    rename={
                        "estate": "Estate",
                        "provisioning_stage": "Stage",
                        "reason": "Reason",
                        "Value": "Stuck users",
                        ACTION_LABEL: "What to do",
                    },
                )
            ],
            sort_by="Stuck users",
            descending=True,
            overrides=[action_column("What to do")],
        ),
        24,
        9,
    )
    grid.add(
        table(
            "Currently stuck users",
            "One row per stuck user as listed by the exporter, with its reason and what to do: the "
            "longest-waiting first, at most stuck_users_listed of them; empty when user_label is none. The "
            "exporter's /stuck endpoint returns the same list as JSON with the evidence, /trace one user.",
            [
                Query(
                    with_action(f"max by (estate, provisioning_stage, reason, user) ({sel(STUCK_INFO)})"),
                    instant=True,
                    table=True,
                )
            ],
            "none",
            transformations=[
                organize(
                    exclude=["Time", "Value"],
                    rename={
                        "estate": "Estate",
                        "provisioning_stage": "Stage",
                        "user": "User",
                        "reason": "Reason",
                        ACTION_LABEL: "What to do",
                    },
                )
            ],
            sort_by="Stage",
            overrides=[action_column("What to do")],
        ),
        24,
        10,
    )


def provisioning_identifiers(grid: Grid) -> None:
    grid.row("CloudUserID and orphans (hybrid_mdm)")
    grid.add(
        timeseries(
            "Users without CloudUserID",
            "ConfigMgr user records with an empty CloudUserID. In an Intune collection: the Intune connector "
            "(SMS_CLOUD_USERSYNC) should fill it within a sync cycle; if the line stays up, read "
            "cloudusersync.log and the ConfigMgr component status below. Outside the collections it is "
            "expected: those users are not meant for Intune.",
            [
                Query(
                    f"sum by (estate) ({sel(MISSING_CLOUD_ID, matcher('in_intune_collection', 'true'))})",
                    "{{estate}} · in an Intune collection",
                    pipelines=HYBRID_ONLY,
                ),
                Query(
                    f"sum by (estate) ({sel(MISSING_CLOUD_ID, matcher('in_intune_collection', 'false'))})",
                    "{{estate}} · not in an Intune collection",
                    pipelines=HYBRID_ONLY,
                ),
            ],
            "short",
        ),
        8,
        8,
    )
    grid.add(
        timeseries(
            "CloudUserID mismatches per estate",
            "Users whose CloudUserID is set but differs from the object id of their Entra user. Usual "
            "cause: the Entra user was deleted and recreated, and ConfigMgr still holds the old id.",
            [Query(f"sum by (estate) ({sel(MISMATCH)})", "{{estate}}", pipelines=HYBRID_ONLY)],
            "short",
        ),
        8,
        8,
    )
    grid.add(
        timeseries(
            "Orphan records per source",
            "Records that match no AD user in scope: synced Entra users (source entra) and ConfigMgr user "
            "records (source configmgr). Usually leftovers of deleted or moved accounts.",
            [
                Query(
                    f"sum by (estate, source) ({sel(ORPHANS)})",
                    "{{estate}} · {{source}}",
                    pipelines=HYBRID_ONLY,
                )
            ],
            "short",
        ),
        8,
        8,
    )
    grid.add(
        stat(
            "Intune-enabled users without an Intune license (informational)",
            "Users at stage 6 whose assigned licenses carry no enabled Intune (INTUNE_A) service plan. "
            "Informational: in hybrid MDM with ConfigMgr the connector enables users without a license "
            "flag in Entra ID, so a non-zero value is expected and not an error.",
            [Query(f"sum by (estate) ({sel(UNLICENSED)})", "{{estate}}", pipelines=HYBRID_ONLY)],
            "short",
            fixed_color="blue",
            graph=True,
        ),
        24,
        6,
    )


def provisioning_devices(grid: Grid) -> None:
    grid.row("Managed devices (cloud)")
    grid.add(
        bargauge(
            "Managed devices by compliance state",
            "Intune managed devices per estate and compliance state (the intune_devices source of cloud "
            "estates). Users whose devices are all noncompliant, in their grace period, of unknown "
            "compliance or stale wait at device_enrolled.",
            [
                Query(
                    f"sum by (estate, compliance_state) ({sel(DEVICES)})",
                    "{{estate}} · {{compliance_state}}",
                    pipelines=CLOUD_ONLY,
                )
            ],
            "short",
            fixed_color="blue",
            overrides=[
                override("byRegexp", f".* · {state}", {"color": {"fixedColor": color, "mode": "fixed"}})
                for state, color in COMPLIANCE_COLOURS
            ],
        ),
        8,
        9,
    )
    grid.add(
        timeseries(
            "Managed devices by operating system",
            "Intune managed devices per estate and operating system over time.",
            [
                Query(
                    f"sum by (estate, operating_system) ({sel(DEVICES)})",
                    "{{estate}} · {{operating_system}}",
                    pipelines=CLOUD_ONLY,
                )
            ],
            "short",
            stacked=True,
        ),
        8,
        9,
    )
    grid.add(
        bargauge(
            "Managed devices by management agent",
            "Intune managed devices per estate and management agent: mdm for devices Intune alone "
            "manages, configurationManagerClientMdm (or ...MdmEas) for devices co-managed with ConfigMgr, "
            "whose compliance may still be ConfigMgr's (compliance state configManager).",
            [
                Query(
                    f"sum by (estate, management_agent) ({sel(DEVICES)})",
                    "{{estate}} · {{management_agent}}",
                    pipelines=CLOUD_ONLY,
                )
            ],
            "short",
            fixed_color="purple",
        ),
        8,
        9,
    )


def provisioning_sync(grid: Grid) -> None:
    grid.row("Entra Connect and ConfigMgr")
    grid.add(
        stat(
            "Entra Connect: time since last sync",
            "Age of the tenant's onPremisesLastSyncDateTime. Entra Connect syncs every 30 minutes by "
            "default; orange after 1 hour, red after 3 hours. While it is stale, new AD users stay at "
            "stage 1.",
            [
                Query(
                    f"time() - max by (estate) ({sel(LAST_SYNC)} > 0)",
                    "{{estate}}",
                )
            ],
            "s",
            steps=(("green", None), ("orange", 3600), ("red", 10800)),
        ),
        12,
        5,
    )
    grid.add(
        stat(
            "Entra Connect: directory sync enabled",
            "The tenant's onPremisesSyncEnabled. Disabled means no AD user can reach stage 2.",
            [Query(f"min by (estate) ({sel('intune_entra_connect_sync_enabled')})", "{{estate}}")],
            "none",
            steps=(("red", None), ("green", 1)),
            mappings=((0, "Disabled", "red"), (1, "Enabled", "green")),
        ),
        12,
        5,
    )
    grid.add(
        timeseries(
            "Entra Connect provisioning errors",
            "Synced Entra users with onPremisesProvisioningErrors, by category (for example PropertyConflict "
            "for a duplicate UPN or proxy address). Fix the conflicting attribute in AD.",
            [
                Query(
                    f"sum by (estate, category) ({sel('intune_entra_provisioning_error_users')})",
                    "{{estate}} · {{category}}",
                    pipelines=HYBRID_ONLY,
                    sparse=True,
                )
            ],
            "short",
        ),
        24,
        8,
    )
    grid.add(
        state_timeline(
            "ConfigMgr component status",
            "Status of the ConfigMgr site components that move users along the pipeline (user discovery, "
            "Azure AD discovery, collection evaluation, cloud user sync / Intune connector): OK, Warning or "
            "Critical as reported by the site.",
            [
                Query(
                    f"max by (estate, site_code, component) ({sel('intune_configmgr_component_status')})",
                    "{{estate}} {{site_code}} · {{component}}",
                    pipelines=HYBRID_ONLY,
                )
            ],
            ((0, "OK", "green"), (1, "Warning", "orange"), (2, "Critical", "red")),
        ),
        24,
        10,
    )


def provisioning_overview() -> Json:
    grid = Grid()
    provisioning_summary(grid)
    provisioning_pipeline(grid)
    provisioning_reasons(grid)
    provisioning_devices(grid)
    provisioning_identifiers(grid)
    provisioning_sync(grid)
    return dashboard(
        PROVISIONING_UID,
        "Intune provisioning overview",
        "User provisioning AD -> Entra ID -> Intune for both chains (hybrid_mdm: ConfigMgr and its Intune "
        "connector; cloud: licence, enrolled and compliant device): where users are, who is stuck, why, "
        "and what to do.",
        grid,
    )


# --------------------------------------------------------------------------------------------------
# Licenses

PREPAID = "intune_license_prepaid_units"
CONSUMED = "intune_license_consumed_units"
EXPIRY = "intune_license_subscription_expiry_timestamp_seconds"
SKU_LABELS = "estate, sku, sku_name"

PURCHASED_EXPR = f"sum by ({SKU_LABELS}) ({sel(PREPAID, matcher('status', 'enabled'))})"
CONSUMED_EXPR = f"sum by ({SKU_LABELS}) ({sel(CONSUMED)})"
AVAILABLE_EXPR = f"{PURCHASED_EXPR} - {CONSUMED_EXPR}"
UTILISATION_EXPR = f"{CONSUMED_EXPR} / ({PURCHASED_EXPR} > 0)"
DAYS_LEFT_EXPR = f"({sel(EXPIRY)} - time()) / 86400"
# The subscription metric has no product name: borrow sku_name from the consumed-units series of the
# same SKU, and keep subscriptions whose SKU has none.
DAYS_LEFT_NAMED_EXPR = (
    f"{DAYS_LEFT_EXPR} * on (job, instance, estate, sku) group_left (sku_name) (0 * {sel(CONSUMED)} + 1)"
    f" or on (job, instance, estate, subscription_id) {DAYS_LEFT_EXPR}"
)


def status_units(status: str) -> str:
    return f"sum by ({SKU_LABELS}) ({sel(PREPAID, matcher('status', status))})"


def licenses_overview(grid: Grid) -> None:
    grid.row("Overview")
    grid.add(
        stat(
            "SKUs with no units left",
            "SKUs whose consumed units have reached or passed the purchased (enabled) units: new "
            "assignments of that SKU fail.",
            [Query(f"count({AVAILABLE_EXPR} <= 0) or vector(0)", "SKUs")],
            "short",
            steps=RED_FROM_ONE,
        ),
        6,
        4,
    )
    grid.add(
        stat(
            "Subscriptions expiring within 30 days",
            "Subscriptions whose next lifecycle date is less than 30 days away (or already past).",
            [Query(f"count({DAYS_LEFT_EXPR} < 30) or vector(0)", "subscriptions")],
            "short",
            steps=ORANGE_FROM_ONE,
        ),
        6,
        4,
    )
    grid.add(
        stat(
            "Units in warning, suspended or locked out",
            "Purchased units not in the enabled state. Warning units (grace period after expiry) still "
            "work; suspended and locked-out units no longer do.",
            [Query(f"sum({sel(PREPAID, matcher('status', 'warning|suspended|locked_out', '=~'))})", "units")],
            "short",
            steps=ORANGE_FROM_ONE,
        ),
        6,
        4,
    )
    grid.add(
        stat(
            "Trial subscriptions",
            "Subscriptions marked as trial. They end at their expiry date unless converted.",
            [Query(f"count({sel(EXPIRY, matcher('trial', 'true'))}) or vector(0)", "trials")],
            "short",
            fixed_color="blue",
        ),
        6,
        4,
    )


def licenses_per_sku(grid: Grid) -> None:
    grid.row("Per SKU")
    columns = {
        "estate": "Estate",
        "sku_name": "Product",
        "sku": "SKU",
        "Value #A": "Purchased (enabled)",
        "Value #B": "Consumed",
        "Value #C": "Available",
        "Value #D": "Utilisation",
        "Value #E": "Warning",
        "Value #F": "Suspended",
        "Value #G": "Locked out",
    }
    grid.add(
        table(
            "Units per SKU",
            "Purchased units in the enabled state, consumed (assigned) units, what is left (negative when "
            "more units are assigned than enabled) and units in the warning, suspended and locked-out "
            "states, per estate and SKU.",
            [
                Query(expr, instant=True, table=True)
                for expr in (
                    PURCHASED_EXPR,
                    CONSUMED_EXPR,
                    AVAILABLE_EXPR,
                    UTILISATION_EXPR,
                    status_units("warning"),
                    status_units("suspended"),
                    status_units("locked_out"),
                )
            ],
            "short",
            transformations=[{"id": "merge", "options": {}}, organize(exclude=["Time"], rename=columns)],
            sort_by="Utilisation",
            descending=True,
            overrides=[
                override(
                    "byName",
                    "Utilisation",
                    {
                        "unit": "percentunit",
                        "max": 1,
                        "min": 0,
                        "custom.cellOptions": {"mode": "basic", "type": "gauge"},
                        "thresholds": thresholds((("green", None), ("orange", 0.9), ("red", 1))),
                    },
                ),
                override(
                    "byName",
                    "Available",
                    {
                        "custom.cellOptions": {"type": "color-text"},
                        "thresholds": thresholds((("red", None), ("orange", 0), ("green", 1))),
                    },
                ),
            ],
        ),
        24,
        9,
    )
    grid.add(
        bargauge(
            "Utilisation per SKU",
            "Consumed units divided by purchased (enabled) units. Above 100 % more units are assigned than "
            "are enabled (warning-state units still cover them for a while). Orange from 90 %, red from "
            "100 %.",
            [Query(UTILISATION_EXPR, "{{estate}} · {{sku_name}}")],
            "percentunit",
            maximum=1,
            steps=(("green", None), ("orange", 0.9), ("red", 1)),
        ),
        12,
        9,
    )
    grid.add(
        bargauge(
            "Available units per SKU",
            "Purchased (enabled) minus consumed units. Negative: more units assigned than enabled. Red below "
            "0, orange at 0.",
            [Query(AVAILABLE_EXPR, "{{estate}} · {{sku_name}}")],
            "short",
            minimum=None,
            steps=(("red", None), ("orange", 0), ("green", 1)),
        ),
        12,
        9,
    )
    grid.add(
        timeseries(
            "Consumed units over time",
            "Assigned (consumed) units per SKU over time: how fast each SKU fills up.",
            [Query(f"sum by (estate, sku_name) ({sel(CONSUMED)})", "{{estate}} · {{sku_name}}")],
            "short",
        ),
        12,
        8,
    )
    grid.add(
        timeseries(
            "Utilisation over time",
            "Consumed divided by purchased (enabled) units per SKU.",
            [Query(UTILISATION_EXPR, "{{estate}} · {{sku_name}}")],
            "percentunit",
        ),
        12,
        8,
    )


def licenses_subscriptions(grid: Grid) -> None:
    grid.row("Subscriptions")
    grid.add(
        table(
            "Days to subscription expiry",
            "Days until each subscription's next lifecycle date (expiry, or the end of the warning or "
            "suspended period), soonest first. Red below 7 days, orange below 30.",
            [Query(DAYS_LEFT_NAMED_EXPR, instant=True, table=True)],
            "suffix:days",
            transformations=[
                organize(
                    exclude=["Time", "job", "instance"],
                    rename={
                        "estate": "Estate",
                        "sku_name": "Product",
                        "sku": "SKU",
                        "subscription_id": "Subscription",
                        "status": "Status",
                        "trial": "Trial",
                        "Value": "Days to expiry",
                    },
                )
            ],
            sort_by="Days to expiry",
            steps=(("red", None), ("orange", 7), ("green", 30)),
            decimals=1,
            overrides=[override("byName", "Days to expiry", {"custom.cellOptions": {"type": "color-text"}})],
        ),
        24,
        9,
    )


ASSIGNMENT_ERRORS = "intune_license_assignment_error_users"


def licenses_assignment_errors(grid: Grid) -> None:
    grid.row("Assignment errors")
    grid.add(
        timeseries(
            "Users with licence assignment errors",
            "Entra users whose licence state for a SKU carries an error (CountViolation: no units left; "
            "ProhibitedInUsageLocationViolation: no or wrong usage location; MutuallyExclusiveViolation, "
            "DependencyViolation: conflicting or missing licences), per estate, SKU and error over time. "
            "Without the licence those users get none of its services; in a cloud estate they wait at "
            "entra_synced.",
            [
                Query(
                    f"sum by (estate, sku, error) ({sel(ASSIGNMENT_ERRORS)})",
                    "{{estate}} · {{sku}} · {{error}}",
                    pipelines=("cloud",),
                    sparse=True,
                )
            ],
            "short",
            stacked=True,
        ),
        12,
        9,
    )
    grid.add(
        table(
            "Licence assignment errors by group",
            "Users with a licence assignment error right now, per estate, SKU, error and where the "
            "assignment comes from (a licensing group, or direct): fix the cause, then reprocess that group "
            "or user in the Entra admin center.",
            [
                Query(
                    f"sum by (estate, sku, error, assigned_by) ({sel(ASSIGNMENT_ERRORS)}) > 0",
                    instant=True,
                    table=True,
                    pipelines=("cloud",),
                    sparse=True,
                )
            ],
            "short",
            transformations=[
                organize(
                    exclude=["Time"],
                    rename={
                        "estate": "Estate",
                        "sku": "SKU",
                        "error": "Error",
                        "assigned_by": "Assigned by",
                        "Value": "Users",
                    },
                )
            ],
            sort_by="Users",
            descending=True,
        ),
        12,
        9,
    )


def licenses() -> Json:
    grid = Grid()
    licenses_overview(grid)
    licenses_per_sku(grid)
    licenses_assignment_errors(grid)
    licenses_subscriptions(grid)
    return dashboard(
        LICENSES_UID,
        "Intune licenses",
        "Microsoft 365 licenses per SKU: purchased vs consumed units, utilisation, users whose assignment "
        "failed, and subscription expiry.",
        grid,
    )


# --------------------------------------------------------------------------------------------------
# Exporter health

LAST_SUCCESS = "intune_exporter_source_last_success_timestamp_seconds"
RETRY_WAIT = "intune_exporter_graph_retry_wait_seconds_total"
TOKEN_REQUESTS = "intune_exporter_graph_token_requests_total"
COLLECTOR_SUCCESS = "intune_exporter_collector_success"
COLLECTOR_DURATION = "intune_exporter_collector_duration_seconds"
SOURCE_HELP = (
    "Sources: ad, entra (users), entra_organization (organization and licenses), configmgr (hybrid_mdm "
    "estates), intune_devices (managed devices, cloud estates)."
)


def health_overview(grid: Grid) -> None:
    grid.row("Exporter")
    grid.add(
        stat(
            "Exporter scrape",
            "Prometheus' own up metric for the exporter's scrape target(s).",
            [Query('up{job=~"$job", instance=~"$instance"}', "{{instance}}")],
            "none",
            steps=(("red", None), ("green", 1)),
            mappings=UP_DOWN,
        ),
        4,
        4,
    )
    grid.add(
        stat(
            "Exporter version",
            "Version reported by intune_exporter_build_info.",
            [Query(f"count by (version) ({sel('intune_exporter_build_info', estate=False)})", "{{version}}")],
            "none",
            fixed_color="blue",
            text_mode="name",
        ),
        4,
        4,
    )
    grid.add(
        stat(
            "Sources up",
            "Whether the last refresh of each source succeeded. While a source is down the exporter keeps "
            "serving the values of its last good read. " + SOURCE_HELP,
            [
                Query(
                    f"min by (estate, source) ({sel('intune_exporter_source_up')})", "{{estate}} · {{source}}"
                )
            ],
            "none",
            steps=(("red", None), ("green", 1)),
            mappings=UP_DOWN,
        ),
        12,
        4,
    )
    grid.add(
        stat(
            "Failed refreshes",
            "Failed source refreshes in the selected time range, all reasons.",
            [
                Query(
                    f"sum(increase({sel('intune_exporter_source_errors_total')}[$__range]))",
                    "failures",
                    instant=True,
                )
            ],
            "short",
            steps=ORANGE_FROM_ONE,
        ),
        4,
        4,
    )


def health_sources(grid: Grid) -> None:
    grid.row("Source refreshes")
    grid.add(
        state_timeline(
            "Source up history",
            "Up/down history of every source. " + SOURCE_HELP,
            [
                Query(
                    f"min by (estate, source) ({sel('intune_exporter_source_up')})", "{{estate}} · {{source}}"
                )
            ],
            UP_DOWN,
        ),
        12,
        8,
    )
    grid.add(
        bargauge(
            "Time since last successful refresh",
            "Age of the data each source contributes. It should stay below refresh_interval (5 minutes by "
            "default) plus one refresh duration; orange after 15 minutes, red after 1 hour.",
            [
                Query(
                    f"time() - max by (estate, source) ({sel(LAST_SUCCESS)})",
                    "{{estate}} · {{source}}",
                )
            ],
            "s",
            steps=(("green", None), ("orange", 900), ("red", 3600)),
        ),
        12,
        8,
    )
    grid.add(
        timeseries(
            "Refresh duration",
            "How long the last refresh of each source took. A refresh that approaches refresh_interval "
            "(or the refresh timeout) will start to fail with reason timeout.",
            [
                Query(
                    f"max by (estate, source) ({sel('intune_exporter_source_refresh_duration_seconds')})",
                    "{{estate}} · {{source}}",
                )
            ],
            "s",
        ),
        12,
        8,
    )
    grid.add(
        timeseries(
            "Records read per source",
            "Records read by the last successful refresh: AD users matching the filter, Entra users returned "
            "by Graph, organization/license records, ConfigMgr user records. A sudden drop usually means a "
            "changed search base, filter or permission.",
            [
                Query(
                    f"max by (estate, source) ({sel('intune_exporter_source_records')})",
                    "{{estate}} · {{source}}",
                )
            ],
            "short",
        ),
        12,
        8,
    )
    errors = sel("intune_exporter_source_errors_total")
    grid.add(
        timeseries(
            "Refresh errors by reason",
            "Failed refreshes per minute, by reason: auth (credentials, certificate, permissions), timeout, "
            "network (DNS, TLS, connection), throttled (Graph 429 after retries), data (unexpected answer), "
            "other.",
            [Query(per_minute(errors, "reason"), "{{reason}}")],
            "suffix:errors/min",
            bars=True,
            stacked=True,
        ),
        12,
        8,
    )
    grid.add(
        timeseries(
            "Refresh errors by source",
            "Failed refreshes per minute, by estate and source. " + SOURCE_HELP,
            [Query(per_minute(errors, "estate, source"), "{{estate}} · {{source}}")],
            "suffix:errors/min",
            bars=True,
            stacked=True,
        ),
        12,
        8,
    )


def health_graph(grid: Grid) -> None:
    grid.row("Microsoft Graph")
    grid.add(
        timeseries(
            "Graph requests by endpoint and status code",
            "HTTP requests to Microsoft Graph and the token endpoint per minute, by endpoint and status "
            "code. 401/403: check the app registration's permissions; 429: throttling; 5xx: service trouble.",
            [
                Query(
                    per_minute(sel("intune_exporter_graph_requests_total"), "estate, endpoint, code"),
                    "{{estate}} · {{endpoint}} · {{code}}",
                )
            ],
            "suffix:req/min",
            stacked=True,
        ),
        12,
        8,
    )
    grid.add(
        timeseries(
            "Throttled responses",
            "Graph responses per minute that asked the exporter to slow down: HTTP 429, or 503 with "
            "Retry-After. The exporter waits and retries within max_retry_wait, then fails the refresh "
            "with reason throttled.",
            [
                Query(
                    per_minute(sel("intune_exporter_graph_throttled_responses_total"), "estate"), "{{estate}}"
                )
            ],
            "suffix:responses/min",
            steps=ORANGE_FROM_ONE,
        ),
        6,
        8,
    )
    grid.add(
        timeseries(
            "Time spent waiting to retry",
            "Share of wall-clock time the exporter spent waiting before retrying throttled or failed Graph "
            "requests (seconds waited per second).",
            [
                Query(
                    f"sum by (estate) (rate({sel(RETRY_WAIT)}[$__rate_interval]))",
                    "{{estate}}",
                )
            ],
            "percentunit",
        ),
        6,
        8,
    )
    grid.add(
        timeseries(
            "Token requests",
            "Access tokens requested from Entra ID per hour. msal caches tokens for about an hour; many more "
            "requests than refreshes per hour point to a token cache problem.",
            [
                Query(
                    f"sum by (estate) (rate({sel(TOKEN_REQUESTS)}[$__rate_interval])) * 3600",
                    "{{estate}}",
                )
            ],
            "suffix:tokens/h",
        ),
        12,
        8,
    )


def health_collectors(grid: Grid) -> None:
    grid.row("Collectors and scrapes", collapsed=True)
    grid.add(
        state_timeline(
            "Collector success",
            "Whether each metric collector of the exporter succeeded at the last scrape. A failed collector "
            "drops its metrics from that scrape; the exporter log has the exception.",
            [
                Query(
                    f"min by (instance, collector) ({sel(COLLECTOR_SUCCESS, estate=False)})",
                    "{{instance}} · {{collector}}",
                )
            ],
            ((0, "Failed", "red"), (1, "OK", "green")),
        ),
        12,
        8,
    )
    grid.add(
        timeseries(
            "Collector duration",
            "Time each collector took at the last scrape. Collectors read the in-memory snapshot, so this "
            "should stay in the milliseconds.",
            [
                Query(
                    f"max by (instance, collector) ({sel(COLLECTOR_DURATION, estate=False)})",
                    "{{instance}} · {{collector}}",
                )
            ],
            "s",
        ),
        12,
        8,
    )
    grid.add(
        timeseries(
            "Scrape duration",
            "Prometheus' scrape_duration_seconds for the exporter target(s).",
            [Query('scrape_duration_seconds{job=~"$job", instance=~"$instance"}', "{{instance}}")],
            "s",
        ),
        12,
        8,
    )
    grid.add(
        timeseries(
            "Samples per scrape",
            "Prometheus' scrape_samples_scraped for the exporter target(s): grows with estates, SKUs, "
            "components and listed stuck users.",
            [Query('scrape_samples_scraped{job=~"$job", instance=~"$instance"}', "{{instance}}")],
            "short",
        ),
        12,
        8,
    )


def exporter_health() -> Json:
    grid = Grid()
    health_overview(grid)
    health_sources(grid)
    health_graph(grid)
    health_collectors(grid)
    return dashboard(
        HEALTH_UID,
        "Intune exporter health",
        "Health of intune-provisioning-exporter: source refreshes, errors, Microsoft Graph traffic and "
        "collectors.",
        grid,
    )


# --------------------------------------------------------------------------------------------------
# Output


def build_dashboards() -> dict[str, Json]:
    """File name -> dashboard."""
    return {
        f"{PROVISIONING_UID}.json": provisioning_overview(),
        f"{LICENSES_UID}.json": licenses(),
        f"{HEALTH_UID}.json": exporter_health(),
    }


def queries_by_target() -> dict[tuple[str, str, str], Query]:
    """(dashboard uid, panel title, refId) -> the Query behind that target of the generated JSON."""
    build_dashboards()
    return {
        (uid, title, ref): query
        for uid, queries in _BUILT_QUERIES.items()
        for (title, ref), query in queries.items()
    }


def render(board: Json) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def iter_panels(board: Json) -> list[Json]:
    """Every panel, rows included, with the panels of collapsed rows after their row."""
    flat: list[Json] = []
    for panel in board["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))
    return flat


def first_sentence(panel: Json) -> str:
    return str(panel["description"]).split(". ")[0].rstrip(".") + "."


def panel_list_markdown(boards: dict[str, Json]) -> str:
    lines: list[str] = []
    for name, board in boards.items():
        lines += [f"### {board['title']}", "", f"uid `{board['uid']}`, file `dashboards/{name}`."]
        for panel in iter_panels(board):
            if panel["type"] == "row":
                lines += ["", f"**{panel['title']}**{' (collapsed)' if panel['collapsed'] else ''}", ""]
            else:
                lines.append(f"- *{panel['title']}* ({PANEL_NAMES[panel['type']]}): {first_sentence(panel)}")
        lines.append("")
    return "\n".join(lines).strip() + "\n"


def docs_with_panel_list(current: str, boards: dict[str, Json]) -> str:
    """`current` with the text between the generated-section markers replaced."""
    start = current.index(DOCS_BEGIN) + len(DOCS_BEGIN)
    end = current.index(DOCS_END)
    return current[:start] + "\n\n" + panel_list_markdown(boards) + "\n" + current[end:]


def expected_files() -> dict[Path, str]:
    boards = build_dashboards()
    files = {DASHBOARD_DIR / name: render(board) for name, board in boards.items()}
    files[DOCS_FILE] = docs_with_panel_list(DOCS_FILE.read_text(encoding="utf-8"), boards)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate the Grafana dashboards of intune-provisioning-exporter"
    )
    parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
