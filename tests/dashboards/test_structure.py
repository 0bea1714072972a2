"""Structure of the generated Grafana dashboards: ids, layout, variables, links, units, freshness."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dashboards import generate
from exporter.pipelines.definitions import PIPELINES, all_stages
from tests.dashboards.grafana import (
    all_panels,
    overlaps,
    referenced_variables,
    variable_problems,
    visual_panels,
)

Board = dict[str, Any]
EXPECTED_UIDS = {"intune-provisioning-overview", "intune-licenses", "intune-exporter-health"}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
GRID_WIDTH = 24


def test_committed_files_are_what_the_generator_builds() -> None:
    stale = [
        str(path.relative_to(generate.DASHBOARD_DIR.parent))
        for path, text in generate.expected_files().items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]
    assert not stale, f"stale generated files {stale}: run python -m dashboards.generate"


def test_committed_json_files_are_exactly_the_three_dashboards() -> None:
    files = sorted(generate.DASHBOARD_DIR.glob("*.json"))
    assert [path.stem for path in files] == sorted(EXPECTED_UIDS)
    for path in files:
        board = json.loads(path.read_text(encoding="utf-8"))
        assert board["uid"] == path.stem


def test_generator_check_mode_reports_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --check must fail on a hand-edited file and must not rewrite it.
    for name, board in generate.build_dashboards().items():
        (tmp_path / name).write_text(generate.render(board), encoding="utf-8")
    docs = tmp_path / "dashboards.md"
    docs.write_text(generate.DOCS_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(generate, "DASHBOARD_DIR", tmp_path)
    monkeypatch.setattr(generate, "DOCS_FILE", docs)
    assert generate.main(["--check"]) == 0
    edited = tmp_path / "intune-licenses.json"
    hand_edited = edited.read_text(encoding="utf-8").replace("Units per SKU", "Units")
    edited.write_text(hand_edited, encoding="utf-8")
    assert generate.main(["--check"]) == 1
    assert edited.read_text(encoding="utf-8") == hand_edited  # --check never rewrites
    assert generate.main([]) == 0
    assert generate.main(["--check"]) == 0


def test_fixed_uids_tags_and_schema(dashboards: dict[str, Board]) -> None:
    assert set(dashboards) == EXPECTED_UIDS
    for board in dashboards.values():
        assert board["schemaVersion"] == 39
        assert {"intune", "intune-provisioning-exporter"} <= set(board["tags"])
        assert board["title"] and board["description"]
        assert board["id"] is None  # Grafana assigns its own database id on import


def test_panel_ids_are_unique(dashboards: dict[str, Board]) -> None:
    for uid, board in dashboards.items():
        ids = [panel["id"] for panel in all_panels(board)]
        assert len(ids) == len(set(ids)), f"{uid}: duplicate panel ids"


def test_panels_fit_the_grid(dashboards: dict[str, Board]) -> None:
    for uid, board in dashboards.items():
        for panel in all_panels(board):
            position = panel["gridPos"]
            assert position["x"] >= 0 and position["y"] >= 0, (uid, panel["title"])
            assert position["w"] > 0 and position["h"] > 0, (uid, panel["title"])
            assert position["x"] + position["w"] <= GRID_WIDTH, (uid, panel["title"])
            if panel["type"] == "row":
                assert position["w"] == GRID_WIDTH and position["h"] == 1


def test_no_panels_overlap_with_rows_collapsed_or_expanded(dashboards: dict[str, Board]) -> None:
    for uid, board in dashboards.items():
        assert overlaps(board) == [], uid


def test_collapsed_rows_hold_their_panels_below_themselves(dashboards: dict[str, Board]) -> None:
    collapsed_seen = 0
    for uid, board in dashboards.items():
        for row in (panel for panel in board["panels"] if panel["type"] == "row"):
            if not row["collapsed"]:
                assert row["panels"] == [], f"{uid}: expanded row {row['title']!r} must not hold panels"
                continue
            collapsed_seen += 1
            assert row["panels"], f"{uid}: collapsed row {row['title']!r} is empty"
            assert min(panel["gridPos"]["y"] for panel in row["panels"]) == row["gridPos"]["y"] + 1
            assert all(panel["type"] != "row" for panel in row["panels"])
    assert collapsed_seen, "the layout tests should cover at least one collapsed row"


def test_every_panel_queries_the_datasource_variable(dashboards: dict[str, Board]) -> None:
    for uid, board in dashboards.items():
        for panel in visual_panels(board):
            assert panel["datasource"] == DATASOURCE_REF, (uid, panel["title"])
            assert panel["targets"], (uid, panel["title"])
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), (uid, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE_REF, (uid, panel["title"], target["refId"])
                assert target["expr"].strip(), (uid, panel["title"], target["refId"])


def test_panel_titles_are_unique_within_a_dashboard(dashboards: dict[str, Board]) -> None:
    for uid, board in dashboards.items():
        titles = [panel["title"] for panel in all_panels(board)]
        assert len(titles) == len(set(titles)), f"{uid}: {sorted(t for t in titles if titles.count(t) > 1)}"


def test_every_panel_has_a_unit_and_a_description(dashboards: dict[str, Board]) -> None:
    for uid, board in dashboards.items():
        for panel in visual_panels(board):
            assert panel["fieldConfig"]["defaults"]["unit"], (uid, panel["title"])
            assert len(panel["description"]) >= 30, (uid, panel["title"])
            assert panel["title"].strip(), uid


def test_variables_are_the_agreed_ones(dashboards: dict[str, Board]) -> None:
    for uid, board in dashboards.items():
        variables = {variable["name"]: variable for variable in board["templating"]["list"]}
        assert list(variables) == ["datasource", "job", "instance", "estate"], uid
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["job"]["query"] == "label_values(intune_exporter_build_info, job)"
        assert (
            variables["instance"]["query"]
            == 'label_values(intune_exporter_build_info{job=~"$job"}, instance)'
        )
        assert (
            variables["estate"]["query"]
            == 'label_values(intune_exporter_source_up{job=~"$job", instance=~"$instance"}, estate)'
        )
        for name in ("job", "instance", "estate"):
            variable = variables[name]
            assert variable["type"] == "query", (uid, name)
            assert variable["datasource"] == DATASOURCE_REF, (uid, name)
            assert variable["multi"] and variable["includeAll"], (uid, name)
            assert variable["definition"] == variable["query"], (uid, name)


def test_every_variable_is_defined_and_used(dashboards: dict[str, Board]) -> None:
    for uid, board in dashboards.items():
        assert variable_problems(board) == [], uid


def test_variable_queries_only_use_earlier_variables(dashboards: dict[str, Board]) -> None:
    # Grafana resolves variables in order: a query may only depend on variables defined before it.
    for uid, board in dashboards.items():
        earlier: set[str] = set()
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                needed = referenced_variables(json.dumps(variable["datasource"]) + variable["query"])
                assert needed <= earlier, (uid, variable["name"], needed - earlier)
            earlier.add(variable["name"])


def test_dashboards_link_to_each_other(dashboards: dict[str, Board]) -> None:
    for uid, board in dashboards.items():
        reachable: set[str] = set()
        for link in board["links"]:
            assert link["includeVars"] and link["keepTime"], uid
            if link["type"] == "dashboards":
                reachable |= {
                    other_uid
                    for other_uid, other in dashboards.items()
                    if link["tags"] and set(link["tags"]) <= set(other["tags"])
                }
        assert reachable >= set(dashboards) - {uid}, f"{uid} does not link to {set(dashboards) - reachable}"


def test_repeated_panels_repeat_over_a_multi_value_variable_and_sit_alone_in_their_line(
    dashboards: dict[str, Board],
) -> None:
    # Grafana lays the copies of a horizontally repeated panel over the full width.
    for uid, board in dashboards.items():
        variables = {variable["name"]: variable for variable in board["templating"]["list"]}
        for panel in all_panels(board):
            if not panel.get("repeat"):
                continue
            assert variables[panel["repeat"]]["multi"], (uid, panel["title"])
            assert panel["gridPos"]["w"] == GRID_WIDTH, (uid, panel["title"])
            assert f"${panel['repeat']}" in panel["title"], (uid, panel["title"])


def test_value_mappings_of_the_configmgr_component_status(dashboards: dict[str, Board]) -> None:
    panel = next(
        panel
        for panel in visual_panels(dashboards["intune-provisioning-overview"])
        if "intune_configmgr_component_status" in panel["targets"][0]["expr"]
    )
    (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
    assert mapping["type"] == "value"
    texts = {value: option["text"] for value, option in mapping["options"].items()}
    assert texts == {"0": "OK", "1": "Warning", "2": "Critical"}


def test_panel_list_in_the_docs_names_every_panel(dashboards: dict[str, Board]) -> None:
    docs = generate.DOCS_FILE.read_text(encoding="utf-8")
    for board in dashboards.values():
        assert board["uid"] in docs
        for panel in all_panels(board):
            assert f"{panel['title']}" in docs, panel["title"]


def test_every_stage_of_both_chains_has_a_title_numbered_by_its_step() -> None:
    assert set(generate.STAGE_TITLES) == set(all_stages())
    for definition in PIPELINES.values():
        for step, stage in enumerate(definition.stages, start=1):
            assert generate.stage_label(stage) == f"{step} {generate.STAGE_TITLES[stage]}", stage


def test_funnel_shows_the_last_stage_of_each_chain_in_green(dashboards: dict[str, Board]) -> None:
    funnel = next(
        panel
        for panel in visual_panels(dashboards["intune-provisioning-overview"])
        if panel["title"] == "Provisioning funnel: $estate"
    )
    green = {
        override["matcher"]["options"]
        for override in funnel["fieldConfig"]["overrides"]
        if override["matcher"]["id"] == "byFrameRefID"
    }
    final_stages = {definition.final_stage for definition in PIPELINES.values()}
    finals = {
        target["refId"]
        for target in funnel["targets"]
        if any(f'"{s}"' in target["expr"] for s in final_stages)
    }
    assert green == finals and len(finals) == len(PIPELINES)


def test_action_columns_map_every_reason_of_both_chains_to_its_action(dashboards: dict[str, Board]) -> None:
    expected = {
        f"{reason.stage}:{reason.name}": reason.action
        for definition in PIPELINES.values()
        for reason in definition.reasons
    }
    columns = 0
    for panel in visual_panels(dashboards["intune-provisioning-overview"]):
        for override in panel["fieldConfig"]["overrides"]:
            for prop in override["properties"]:
                if prop["id"] != "mappings":
                    continue
                columns += 1
                (mapping,) = prop["value"]
                assert {key: option["text"] for key, option in mapping["options"].items()} == expected
                assert "label_join(" in panel["targets"][0]["expr"], panel["title"]
    assert columns == 2, "the reason table and the stuck-user table each have an action column"
