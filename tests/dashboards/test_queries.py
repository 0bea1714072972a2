"""Every dashboard query: parses as PromQL, is scoped by the variables, uses exported metrics, and
returns data from a real Prometheus that scrapes the demo exporter."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

import promql_parser
import pytest

from dashboards import generate
from exporter.pipelines.definitions import PIPELINES, all_stages
from tests.dashboards.conftest import DemoExporter, ScrapedPrometheus
from tests.dashboards.grafana import (
    PROMETHEUS_TARGET_SERIES,
    Target,
    calls,
    grafana_regex,
    matrix_selectors,
    selectors,
    substitute,
    targets,
    visual_panels,
)

BOARDS = {board["uid"]: board for board in generate.build_dashboards().values()}
TARGETS = [target for board in BOARDS.values() for target in targets(board)]
# What each target is expected to return against the demo (which pipelines' estates, all of them or some).
EXPECTED = generate.queries_by_target()

GRAFANA_INTERVALS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "6h",
    "__range_s": "21600",
    "__range_ms": "21600000",
}
# How Grafana fills the variables: "All" (allValue .*), one value, several values.
PARSE_SELECTIONS = {
    "all": {"job": ".*", "instance": ".*", "estate": ".*"},
    "one": {"job": grafana_regex("intune"), "instance": grafana_regex("cm01:9863"), "estate": "contoso"},
    "several": {
        "job": grafana_regex("intune", "intune-dr"),
        "instance": grafana_regex("127.0.0.1:9863", "exporter-b.contoso.com:9863"),
        "estate": grafana_regex("contoso", "fabrikam"),
    },
}
# Intervals small enough for a Prometheus that has scraped every second for a few seconds; 4 s is
# what Grafana itself uses as $__rate_interval for a 1 s scrape interval (4 x scrape interval).
LIVE_INTERVALS = {"__rate_interval": "4s", "__interval": "1s", "__range": "6s"}


def by_name(target: Target) -> str:
    return target.name


def keep_variables(expr: str, **intervals: str) -> str:
    """Substitute only the built-in intervals; $job, $instance and $estate stay as written."""
    values = {name: f"${name}" for name in ("job", "instance", "estate")}
    return substitute(expr, {**GRAFANA_INTERVALS, **intervals, **values})


def parse(expr: str) -> promql_parser.Expr:
    return promql_parser.parse(expr)


def panel_targets(dashboard: str, title: str) -> list[Target]:
    found = [target for target in TARGETS if target.dashboard == dashboard and target.panel == title]
    assert found, f"no panel {title!r} in {dashboard}"
    return found


# ---------------------------------------------------------------------------------------------
# Static checks


@pytest.mark.parametrize("target", TARGETS, ids=by_name)
@pytest.mark.parametrize("selection", sorted(PARSE_SELECTIONS))
def test_query_parses_as_promql(target: Target, selection: str) -> None:
    expr = substitute(target.expr, {**GRAFANA_INTERVALS, **PARSE_SELECTIONS[selection]})
    try:
        parse(expr)
    except ValueError as error:
        pytest.fail(f"{target.name}: {error}\n{expr}")


def test_parser_rejects_what_it_should() -> None:
    # The parse test above is only worth something if the parser is strict.
    for broken in ('sum(up{job=~"a"}', 'rate(up{job=~"a"}[$__rate_interval])', "up{job=~(a|b)}", "sum by up"):
        with pytest.raises(ValueError):
            parse(broken)


@pytest.mark.parametrize("target", TARGETS, ids=by_name)
def test_every_selector_is_scoped_by_the_variables(target: Target, demo_exporter: DemoExporter) -> None:
    labels = demo_exporter.series_labels()
    for selector in selectors(parse(keep_variables(target.expr))):
        matchers = set(selector.matchers)
        assert ("job", "=~", "$job") in matchers, (target.name, selector)
        assert ("instance", "=~", "$instance") in matchers, (target.name, selector)
        has_estate = "estate" in labels.get(selector.metric, set())
        scoped_by_estate = ("estate", "=~", "$estate") in matchers
        assert scoped_by_estate == has_estate, (target.name, selector.metric, has_estate)


@pytest.mark.parametrize("target", TARGETS, ids=by_name)
def test_every_metric_is_exported_by_the_demo_exporter(target: Target, demo_exporter: DemoExporter) -> None:
    exported = demo_exporter.series_labels()
    for selector in selectors(parse(keep_variables(target.expr))):
        assert selector.metric in exported or selector.metric in PROMETHEUS_TARGET_SERIES, (
            f"{target.name}: {selector.metric} is not in the demo exporter's /metrics"
        )


@pytest.mark.parametrize("target", TARGETS, ids=by_name)
def test_range_vectors_use_grafana_intervals(target: Target) -> None:
    rate_interval, time_range = timedelta(seconds=1111), timedelta(seconds=2222)
    expr = parse(keep_variables(target.expr, __rate_interval="1111s", __range="2222s"))
    for call in calls(expr):
        if call.func.name in ("rate", "irate"):
            (matrix,) = call.args
            assert matrix.range == rate_interval, f"{target.name}: rate() must use $__rate_interval"
    for matrix in matrix_selectors(expr):
        assert matrix.range in (rate_interval, time_range), f"{target.name}: fixed range {matrix.range}"
    # Counters are only meaningful through rate()/increase(): never read one as a plain value.
    plain_counters = [s.metric for s in selectors(expr) if s.metric.endswith("_total")]
    ranged_counters = [m.vector_selector.name for m in matrix_selectors(expr) if m.vector_selector.name]
    assert sorted(plain_counters) == sorted(c for c in ranged_counters if c.endswith("_total")), target.name


def stage_of(target: Target) -> str:
    values = [
        value
        for label, _, value in selectors(parse(keep_variables(target.expr)))[0].matchers
        if label == "provisioning_stage"
    ]
    assert len(values) == 1, target.name
    return values[0]


def test_funnel_lists_the_stages_of_each_chain_in_chain_order() -> None:
    funnel = [
        stage_of(t) for t in panel_targets("intune-provisioning-overview", "Provisioning funnel: $estate")
    ]
    assert funnel == list(all_stages())
    for title in ("Longest wait per stage", "Stuck users per stage"):
        waits = [stage_of(t) for t in panel_targets("intune-provisioning-overview", title)]
        for definition in PIPELINES.values():
            assert [stage for stage in funnel if stage in definition.stages] == list(definition.stages)
            assert [stage for stage in waits if stage in definition.stages] == list(definition.waiting_stages)


def test_every_target_has_its_expectation() -> None:
    assert {(t.dashboard, t.panel, t.ref_id) for t in TARGETS} == set(EXPECTED)
    for target in TARGETS:
        expected = EXPECTED[(target.dashboard, target.panel, target.ref_id)]
        assert expected.expr == target.expr, target.name
        assert set(expected.pipelines) <= set(PIPELINES), target.name


def test_oldest_entry_timestamps_of_empty_stages_are_left_out() -> None:
    # An empty stage exports 0: "now - 0" would show a wait of 56 years.
    uses = [target for target in TARGETS if generate.OLDEST in target.expr]
    assert uses
    for target in uses:
        assert re.search(re.escape(generate.OLDEST) + r"\{[^}]*\}\s*>\s*0\b", target.expr), target.name


# ---------------------------------------------------------------------------------------------
# Against a real Prometheus


def live_values(scraped: ScrapedPrometheus, estate: str) -> dict[str, str]:
    return {
        **LIVE_INTERVALS,
        "job": grafana_regex(scraped.job),
        "instance": grafana_regex(scraped.exporter.address),
        "estate": estate,
    }


def run(scraped: ScrapedPrometheus, target: Target, estate: str, at: float) -> list[dict[str, Any]]:
    expr = substitute(target.expr, live_values(scraped, estate))
    if target.instant:
        return scraped.prometheus.instant(expr, at)
    return scraped.prometheus.range(expr, at - 3, at)


def test_the_demo_has_an_estate_of_each_pipeline(demo_exporter: DemoExporter) -> None:
    # Queries only one pipeline's estates answer are checked against those estates: without an estate
    # of each pipeline in the demo, their checks below would pass on nothing.
    assert set(demo_exporter.estate_pipelines().values()) == set(PIPELINES)


def estate_selections(pipelines: dict[str, str]) -> list[tuple[str, str, set[str]]]:
    """(name, $estate value, estates selected) as Grafana fills the variable: All, each estate alone,
    every estate picked by hand."""
    everyone = set(pipelines)
    selections = [("all", ".*", everyone)]
    selections += [(estate, grafana_regex(estate), {estate}) for estate in sorted(pipelines)]
    selections.append(("every one picked", grafana_regex(*sorted(pipelines)), everyone))
    return selections


@pytest.mark.parametrize("target", TARGETS, ids=by_name)
def test_query_returns_data_from_prometheus(target: Target, scraped: ScrapedPrometheus) -> None:
    """Each query returns data for every estate selection that holds an estate of a pipeline it
    serves, only for the selected estates, and (unless it keeps only some rows) for each of them."""
    expected = EXPECTED[(target.dashboard, target.panel, target.ref_id)]
    pipelines = scraped.exporter.estate_pipelines()
    at = time.time()
    problems = []
    for name, estate, selected in estate_selections(pipelines):
        served = {e for e in selected if pipelines[e] in expected.pipelines}
        result = run(scraped, target, estate, at)
        series_labels = [series["metric"] for series in result]
        jobs = {labels.get("job", scraped.job) for labels in series_labels}
        estates = {labels["estate"] for labels in series_labels if "estate" in labels}
        if jobs - {scraped.job}:
            problems.append(f"{name}: series of other jobs {jobs}")
        if not estates <= selected:
            problems.append(f"{name}: the estate filter let {estates - selected} through")
        if served and not result:
            problems.append(f"{name}: no data (estates {sorted(served)} should have some)")
        elif served and estates and not expected.sparse and not served <= estates:
            problems.append(f"{name}: no data for {sorted(served - estates)}")
    assert problems == [], f"{target.name}:\n{target.expr}\n" + "\n".join(problems)


def test_variable_queries_find_the_scraped_values(scraped: ScrapedPrometheus) -> None:
    estates = set(scraped.exporter.estate_pipelines())
    expected = {"job": {scraped.job}, "instance": {scraped.exporter.address}, "estate": estates}
    now = time.time()
    for board in BOARDS.values():
        for variable in board["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"])
            assert match, variable["query"]
            selector = substitute(match.group(1), {"job": ".*", "instance": ".*"})
            series = scraped.prometheus.api(
                "/api/v1/series", **{"match[]": selector, "start": f"{now - 60:.0f}"}
            )
            assert {labels[match.group(2)] for labels in series} == expected[variable["name"]], variable[
                "name"
            ]


# ---------------------------------------------------------------------------------------------
# Values: the panel queries compute what their titles promise, checked against the raw series


def raw(scraped: ScrapedPrometheus, expr: str, at: float) -> list[dict[str, Any]]:
    return scraped.prometheus.instant(expr, at)


def single_target(dashboard: str, title: str) -> Target:
    (target,) = panel_targets(dashboard, title)
    return target


def instant_value(scraped: ScrapedPrometheus, target: Target, at: float) -> dict[tuple[str, ...], float]:
    expr = substitute(target.expr, live_values(scraped, ".*"))
    return {
        (series["metric"].get("estate", ""), series["metric"].get("sku", "")): float(series["value"][1])
        for series in scraped.prometheus.instant(expr, at)
    }


def test_available_units_and_utilisation_per_sku(scraped: ScrapedPrometheus) -> None:
    at = time.time()
    job = f'job="{scraped.job}"'
    enabled = {
        (s["metric"]["estate"], s["metric"]["sku"]): float(s["value"][1])
        for s in raw(scraped, f'intune_license_prepaid_units{{{job}, status="enabled"}}', at)
    }
    consumed = {
        (s["metric"]["estate"], s["metric"]["sku"]): float(s["value"][1])
        for s in raw(scraped, f"intune_license_consumed_units{{{job}}}", at)
    }
    assert enabled and set(enabled) == set(consumed)
    available = instant_value(scraped, single_target("intune-licenses", "Available units per SKU"), at)
    assert available == {key: enabled[key] - consumed[key] for key in enabled}
    assert min(available.values()) < 0, "the demo has an over-assigned SKU: negative values must show"
    utilisation = instant_value(scraped, single_target("intune-licenses", "Utilisation per SKU"), at)
    assert utilisation == pytest.approx(
        {key: consumed[key] / enabled[key] for key in enabled if enabled[key] > 0}
    )


def test_days_to_expiry_lists_every_subscription_once_with_its_product_name(
    scraped: ScrapedPrometheus,
) -> None:
    at = time.time()
    subscriptions = {
        (s["metric"]["estate"], s["metric"]["subscription_id"]): float(s["value"][1])
        for s in raw(
            scraped, f'intune_license_subscription_expiry_timestamp_seconds{{job="{scraped.job}"}}', at
        )
    }
    names = {
        (s["metric"]["estate"], s["metric"]["sku"]): s["metric"]["sku_name"]
        for s in raw(scraped, f'intune_license_consumed_units{{job="{scraped.job}"}}', at)
    }
    target = single_target("intune-licenses", "Days to subscription expiry")
    rows = scraped.prometheus.instant(substitute(target.expr, live_values(scraped, ".*")), at)
    keys = [(row["metric"]["estate"], row["metric"]["subscription_id"]) for row in rows]
    assert sorted(keys) == sorted(subscriptions), "a subscription is missing or listed twice"
    for row in rows:
        labels = row["metric"]
        key = (labels["estate"], labels["subscription_id"])
        assert float(row["value"][1]) == pytest.approx((subscriptions[key] - at) / 86400, abs=1e-3)
        assert labels.get("sku_name") == names.get((labels["estate"], labels["sku"])), labels


def test_longest_wait_is_the_age_of_the_oldest_entry(scraped: ScrapedPrometheus) -> None:
    at = time.time()
    oldest = {
        (s["metric"]["estate"], s["metric"]["provisioning_stage"]): float(s["value"][1])
        for s in raw(scraped, f'{generate.OLDEST}{{job="{scraped.job}"}}', at)
    }
    for target in panel_targets("intune-provisioning-overview", "Longest wait per stage"):
        stage = stage_of(target)
        expr = substitute(target.expr, live_values(scraped, ".*"))
        waits = {s["metric"]["estate"]: float(s["value"][1]) for s in scraped.prometheus.instant(expr, at)}
        expected = {
            estate: at - entered
            for (estate, at_stage), entered in oldest.items()
            if at_stage == stage and entered > 0
        }
        assert waits == pytest.approx(expected, abs=1e-3), stage


def panel_json(dashboard: str, title: str) -> dict[str, Any]:
    return next(panel for panel in visual_panels(BOARDS[dashboard]) if panel["title"] == title)


def action_texts(dashboard: str, title: str) -> dict[str, str]:
    """The value mappings of a table's action column: "stage:reason" -> what to do."""
    (column,) = panel_json(dashboard, title)["fieldConfig"]["overrides"]
    (mappings,) = next(p["value"] for p in column["properties"] if p["id"] == "mappings")
    return {key: option["text"] for key, option in mappings["options"].items()}


def test_stuck_user_table_lists_every_listed_user_with_reason_and_action(scraped: ScrapedPrometheus) -> None:
    at = time.time()
    title = "Currently stuck users"
    actions = action_texts("intune-provisioning-overview", title)
    target = single_target("intune-provisioning-overview", title)
    for estate in scraped.exporter.estate_pipelines():
        listed = raw(
            scraped, f'intune_provisioning_stuck_user_info{{job="{scraped.job}", estate="{estate}"}}', at
        )
        rows = scraped.prometheus.instant(substitute(target.expr, live_values(scraped, estate)), at)
        assert listed, estate
        assert sorted(row["metric"]["user"] for row in rows) == sorted(s["metric"]["user"] for s in listed)
        for row in rows:
            labels = row["metric"]
            assert set(labels) == {"estate", "provisioning_stage", "reason", "user", "action"}, labels
            assert labels["action"] == f"{labels['provisioning_stage']}:{labels['reason']}"
            assert labels["action"] in actions, labels


def test_reasons_add_up_to_the_stuck_users_of_each_stage(scraped: ScrapedPrometheus) -> None:
    at = time.time()
    stuck = {
        (s["metric"]["estate"], s["metric"]["provisioning_stage"]): float(s["value"][1])
        for s in raw(scraped, f'intune_provisioning_stuck_users{{job="{scraped.job}"}} > 0', at)
    }
    title = "Why users are stuck now"
    target = single_target("intune-provisioning-overview", title)
    rows = scraped.prometheus.instant(substitute(target.expr, live_values(scraped, ".*")), at)
    actions = action_texts("intune-provisioning-overview", title)
    by_stage: dict[tuple[str, str], float] = {}
    for row in rows:
        labels = row["metric"]
        key = (labels["estate"], labels["provisioning_stage"])
        by_stage[key] = by_stage.get(key, 0.0) + float(row["value"][1])
        assert actions.get(labels["action"]), labels
    assert stuck and by_stage == stuck


def test_device_panels_count_every_managed_device(scraped: ScrapedPrometheus) -> None:
    at = time.time()
    devices = {
        s["metric"]["estate"]: float(s["value"][1])
        for s in raw(scraped, f'sum by (estate) (intune_devices{{job="{scraped.job}"}})', at)
    }
    assert devices, "the demo exports no intune_devices"
    for title in ("Managed devices by compliance state", "Managed devices by management agent"):
        target = single_target("intune-provisioning-overview", title)
        totals: dict[str, float] = {}
        for series in scraped.prometheus.instant(substitute(target.expr, live_values(scraped, ".*")), at):
            estate = series["metric"]["estate"]
            totals[estate] = totals.get(estate, 0.0) + float(series["value"][1])
        assert totals == devices, title


def test_every_panel_of_the_dashboards_was_queried() -> None:
    # Guard against a panel whose targets the parametrized tests would silently skip.
    panels = sum(1 for board in BOARDS.values() for _ in visual_panels(board))
    assert len({(target.dashboard, target.panel) for target in TARGETS}) == panels
