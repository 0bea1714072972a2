"""Checks of the generator that need no server: ``python3 -m pytest benchmarks/scale``.

The stage counts themselves are checked against the real exporter by the benchmark run; these tests
pin what the run relies on: the estate is a pure function of its parameters, and the record counts
in truth.json are what the generated files really hold.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks.scale.estate import (
    CHURN_PER_MILLE,
    EstateFiles,
    EstateParams,
    Truth,
    fate_share,
    generate,
    truth_after_churn,
)

USERS = 4000
ANCHOR = 1_790_000_000.0


@pytest.fixture(scope="module")
def estate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("estate")
    return directory, generate(EstateParams(users=USERS, seed=7), directory, anchor=ANCHOR)


def _ldif_entries(path: Path) -> list[dict[str, list[str]]]:
    entries = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        if not block.strip():
            continue
        entry: dict[str, list[str]] = {}
        for line in block.splitlines():
            name, _, value = line.partition(":")
            entry.setdefault(name, []).append(value.lstrip(": "))
        entries.append(entry)
    return entries


def test_same_parameters_give_the_same_files(tmp_path: Path, estate: tuple[Path, dict]) -> None:
    first, _ = estate
    generate(EstateParams(users=USERS, seed=7), tmp_path, anchor=ANCHOR)
    for name in (EstateFiles.LDIF, EstateFiles.GRAPH_USERS, EstateFiles.CM_USERS, EstateFiles.CHURN):
        assert (tmp_path / name).read_bytes() == (first / name).read_bytes(), name


def test_another_seed_gives_other_identifiers(tmp_path: Path, estate: tuple[Path, dict]) -> None:
    first, _ = estate
    generate(EstateParams(users=USERS, seed=8), tmp_path, anchor=ANCHOR)
    assert (tmp_path / EstateFiles.LDIF).read_bytes() != (first / EstateFiles.LDIF).read_bytes()


def test_record_counts_match_the_files(estate: tuple[Path, dict]) -> None:
    directory, document = estate
    truth = Truth.from_json(document["truth"])
    in_scope = [
        e
        for e in _ldif_entries(directory / EstateFiles.LDIF)
        if "user" in e.get("objectClass", [])
        and "computer" not in e["objectClass"]
        and e["dn"][0].endswith("OU=Staff,DC=contoso,DC=com")
        and not int(e["userAccountControl"][0]) & 2
    ]
    assert truth.records["ad"] == len(in_scope) == sum(truth.users.values())
    graph_lines = (directory / EstateFiles.GRAPH_USERS).read_text().splitlines()
    assert truth.records["entra"] == len(graph_lines)
    with (directory / EstateFiles.CM_USERS).open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert truth.records["configmgr"] == len(rows)


def test_missing_cloud_user_ids_match_the_rows(estate: tuple[Path, dict]) -> None:
    directory, document = estate
    truth = Truth.from_json(document["truth"])
    intune = {"PS100012", "PS100013"}
    with (directory / EstateFiles.CM_MEMBERS).open(newline="") as handle:
        members = {
            int(rid) for collection, rid, kind in csv.reader(handle) if kind == "4" and collection in intune
        }
    with (directory / EstateFiles.CM_USERS).open(newline="") as handle:
        missing = [int(row[0]) in members for row in csv.reader(handle) if not row[13]]
    assert truth.missing_cloud_user_id == {"true": missing.count(True), "false": missing.count(False)}


def test_every_reason_occurs_and_stuck_never_exceeds_users(estate: tuple[Path, dict]) -> None:
    truth = Truth.from_json(estate[1]["truth"])
    healthy_only = {"configmgr_discovery_unhealthy", "connector_unhealthy"}
    for key, counts in truth.reasons.items():
        assert counts["stuck"] + counts["settling"] <= counts["users"], key
        assert (counts["users"] > 0) == (key.split("/")[1] not in healthy_only), key


def test_churn_is_about_one_percent_per_kind(estate: tuple[Path, dict]) -> None:
    directory, _ = estate
    churn = json.loads((directory / EstateFiles.CHURN).read_text())
    for kind, (pool, per_mille) in CHURN_PER_MILLE.items():
        expected = USERS * per_mille / 1000
        assert abs(len(churn.get(kind, [])) - expected) <= 4 * expected**0.5 + 2, (
            kind,
            pool,
            fate_share(pool),
        )


def test_truth_after_churn_moves_users_between_stages(estate: tuple[Path, dict]) -> None:
    directory, document = estate
    truth = Truth.from_json(document["truth"])
    churn = json.loads((directory / EstateFiles.CHURN).read_text())
    after = truth_after_churn(truth, churn)
    assert after.to_json() == document["truth_after_churn"]
    in_scope_change = len(churn.get("ad_new", [])) - len(churn.get("ad_disable", []))
    assert sum(after.users.values()) == sum(truth.users.values()) + in_scope_change
    assert after.orphans["entra"] == truth.orphans["entra"] + len(churn.get("ad_disable", []))
