"""The checks the dashboard tests rely on must catch broken dashboards: try them on broken ones."""

from __future__ import annotations

import copy
import re
from typing import Any

import promql_parser
import pytest

from tests.dashboards.grafana import (
    expanded_layout,
    grafana_regex,
    overlaps,
    selectors,
    substitute,
    variable_problems,
)

Board = dict[str, Any]


def panel(title: str, x: int, y: int, w: int, h: int, expr: str = "up") -> Board:
    return {
        "type": "timeseries",
        "title": title,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "targets": [{"refId": "A", "expr": expr}],
    }


def row(title: str, y: int, nested: list[Board] | None = None) -> Board:
    return {
        "type": "row",
        "title": title,
        "collapsed": bool(nested),
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": nested or [],
    }


def board(panels: list[Board], variables: list[str]) -> Board:
    listed: list[Board] = [{"name": "datasource", "type": "datasource", "query": "prometheus"}]
    listed += [
        {
            "name": name,
            "type": "query",
            "datasource": {"uid": "${datasource}"},
            "query": "label_values(up, job)",
        }
        for name in variables
    ]
    return {"panels": panels, "templating": {"list": listed}}


GOOD_LAYOUT = [
    row("first", 0),
    panel("a", 0, 1, 12, 8),
    panel("b", 12, 1, 12, 8),
    row("details", 9, [panel("c", 0, 10, 12, 8), panel("d", 12, 10, 12, 8)]),
    row("last", 10),
    panel("e", 0, 11, 24, 8),
]


def test_a_good_layout_has_no_overlaps() -> None:
    assert overlaps(board(GOOD_LAYOUT, [])) == []


def test_overlapping_panels_are_found() -> None:
    broken = copy.deepcopy(GOOD_LAYOUT)
    broken[2]["gridPos"]["x"] = 11
    assert overlaps(board(broken, [])) == [
        "'a' overlaps 'b' (rows collapsed)",
        "'a' overlaps 'b' (rows expanded)",
    ]


def test_overlaps_inside_a_collapsed_row_are_found_once_it_is_expanded() -> None:
    broken = copy.deepcopy(GOOD_LAYOUT)
    broken[3]["panels"][1]["gridPos"]["x"] = 6
    assert overlaps(board(broken, [])) == ["'c' overlaps 'd' (rows expanded)"]


def test_panels_below_a_collapsed_row_are_pushed_down_when_it_expands() -> None:
    taller = copy.deepcopy(GOOD_LAYOUT)
    taller[3]["panels"].append(panel("f", 0, 18, 24, 4))  # a second line inside the row: 12 units in all
    layout = dict(expanded_layout(board(taller, [])))
    assert layout["c"]["y"] == 10 and layout["f"]["y"] == 18
    assert layout["last"]["y"] == 10 + 12 and layout["e"]["y"] == 11 + 12
    assert overlaps(board(taller, [])) == []


def test_unused_and_undefined_variables_are_found() -> None:
    panels = [panel("a", 0, 0, 24, 8, 'rate(up{job=~"$job", estate=~"${estate}"}[$__rate_interval])')]
    assert variable_problems(board(panels, ["job", "estate"])) == []
    assert variable_problems(board(panels, ["job"])) == ["undefined variable $estate"]
    assert variable_problems(board(panels, ["job", "estate", "instance"])) == ["unused variable $instance"]


def test_substitute_knows_every_reference_syntax() -> None:
    text = "$a ${a} ${a:regex} [[a]] [[a:csv]] $__rate_interval"
    assert substitute(text, {"a": "x", "__rate_interval": "1m"}) == "x x x x x 1m"
    with pytest.raises(KeyError):
        substitute("$unknown", {"a": "x"})


def test_multi_value_regex_survives_the_promql_string_and_matches_literally() -> None:
    value = grafana_regex("127.0.0.1:9863", "host-b:9863")
    (selector,) = selectors(promql_parser.parse(f'up{{instance=~"{value}"}}'))
    (_, operator, pattern) = selector.matchers[0]
    assert operator == "=~"
    assert re.fullmatch(pattern, "127.0.0.1:9863") and re.fullmatch(pattern, "host-b:9863")
    assert not re.fullmatch(pattern, "127a0b0c1:9863")
