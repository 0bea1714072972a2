"""What the dashboard tests need to know about Grafana dashboard JSON and its template variables."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import promql_parser

Json = dict[str, Any]

# $var, ${var}, ${var:format} and the deprecated [[var]].
VARIABLE_REFERENCE = re.compile(r"\$\{(\w+)(?::[\w-]+)?\}|\$(\w+)|\[\[(\w+)(?::[\w-]+)?\]\]")

# Grafana built-ins a Prometheus query may use; each gets a value when a query is made concrete.
BUILTIN_VARIABLES = frozenset(
    {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
)

# Series Prometheus itself adds for every scrape target: not exported, yet real.
PROMETHEUS_TARGET_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def referenced_variables(text: str) -> set[str]:
    return {next(group for group in match.groups() if group) for match in VARIABLE_REFERENCE.finditer(text)}


def substitute(text: str, values: Mapping[str, str]) -> str:
    """Replace every variable reference as Grafana would; KeyError for an unknown variable."""

    def replacement(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return values[name]

    return VARIABLE_REFERENCE.sub(replacement, text)


def grafana_regex(*values: str) -> str:
    """A multi-value selection as Grafana's Prometheus data source writes it into `label=~"..."`:
    regex-escaped, backslashes doubled for the PromQL string, alternatives in a group."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}-])", r"\\\\\1", value) for value in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def all_panels(board: Json) -> Iterator[Json]:
    """Every panel including rows and the panels kept inside collapsed rows."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def visual_panels(board: Json) -> Iterator[Json]:
    return (panel for panel in all_panels(board) if panel["type"] != "row")


@dataclass(frozen=True)
class Target:
    dashboard: str  # uid
    panel: str  # title
    ref_id: str
    expr: str
    instant: bool

    @property
    def name(self) -> str:
        return f"{self.dashboard}/{self.panel}/{self.ref_id}"


def targets(board: Json) -> Iterator[Target]:
    for panel in visual_panels(board):
        for target in panel["targets"]:
            yield Target(
                board["uid"], panel["title"], target["refId"], target["expr"], bool(target["instant"])
            )


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)


MATCH_OPERATORS = (
    (promql_parser.MatchOp.Equal, "="),
    (promql_parser.MatchOp.NotEqual, "!="),
    (promql_parser.MatchOp.Re, "=~"),
    (promql_parser.MatchOp.NotRe, "!~"),
)


def operator(op: promql_parser.MatchOp) -> str:
    # MatchOp values compare equal but are not hashable.
    return next(text for known, text in MATCH_OPERATORS if known == op)


def selectors(expr: promql_parser.Expr) -> list[Selector]:
    found: list[Selector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name: {node}"
            matchers = tuple(
                (m.name, operator(m.op), m.value) for m in node.matchers.matchers if m.name != "__name__"
            )
            found.append(Selector(node.name, matchers))

    promql_parser.walk(expr, visit)
    return found


def calls(expr: promql_parser.Expr) -> list[promql_parser.Call]:
    found: list[promql_parser.Call] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.Call):
            found.append(node)

    promql_parser.walk(expr, visit)
    return found


def matrix_selectors(expr: promql_parser.Expr) -> list[promql_parser.MatrixSelector]:
    found: list[promql_parser.MatrixSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.MatrixSelector):
            found.append(node)

    promql_parser.walk(expr, visit)
    return found


def rectangles_overlap(a: Json, b: Json) -> bool:
    return bool(
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def expanded_layout(board: Json) -> list[tuple[str, Json]]:
    """(title, gridPos) of every panel as laid out with every collapsed row expanded.

    Expanding a row puts its panels right below it and pushes everything further down by their
    height, which is what Grafana does."""
    layout: list[tuple[str, Json]] = [(panel["title"], dict(panel["gridPos"])) for panel in board["panels"]]
    for row in board["panels"]:
        nested = row.get("panels", [])
        if not nested:
            continue
        row_y = row["gridPos"]["y"]
        top = min(panel["gridPos"]["y"] for panel in nested)
        height = max(panel["gridPos"]["y"] + panel["gridPos"]["h"] for panel in nested) - top
        for _title, position in layout:
            if position["y"] > row_y:
                position["y"] += height
        for panel in nested:
            position = dict(panel["gridPos"])
            position["y"] = row_y + 1 + (position["y"] - top)
            layout.append((panel["title"], position))
    return layout


def overlaps(board: Json) -> list[str]:
    """Pairs of panels that overlap, with collapsed rows closed and with every row expanded."""
    found: list[str] = []
    closed = [(panel["title"], panel["gridPos"]) for panel in board["panels"]]
    for layout, state in ((closed, "collapsed"), (expanded_layout(board), "expanded")):
        for index, (title, position) in enumerate(layout):
            for other_title, other in layout[index + 1 :]:
                if rectangles_overlap(position, other):
                    found.append(f"{title!r} overlaps {other_title!r} (rows {state})")
    return found


def used_variables(board: Json) -> set[str]:
    """Variables referenced by panels (queries, titles, repeats, data sources) and by variable queries."""
    used = referenced_variables(json.dumps(board["panels"]))
    used |= {panel["repeat"] for panel in all_panels(board) if panel.get("repeat")}
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            used |= referenced_variables(json.dumps(variable["datasource"]) + variable["query"])
    return used


def variable_problems(board: Json) -> list[str]:
    defined = {variable["name"] for variable in board["templating"]["list"]}
    used = used_variables(board)
    problems = [f"undefined variable ${name}" for name in sorted(used - defined - BUILTIN_VARIABLES)]
    problems += [f"unused variable ${name}" for name in sorted(defined - used)]
    return problems
