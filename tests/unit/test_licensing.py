"""Which licence entries grant Intune: the vectorised verdicts agree with the rule, entry by entry."""

from __future__ import annotations

import random

import numpy as np
import pytest

from exporter.model import AssignedLicenseTable, OrganizationData, ServicePlan, SubscribedSku
from exporter.pipelines.licensing import all_intune_plans_disabled, granting_entries
from exporter.tables import TableBuilder

INTUNE_PLANS = ("INTUNE_A", "INTUNE_EDU")


def _organization(rng: random.Random, skus: list[str], plans: list[str]) -> OrganizationData:
    names = {plan: rng.choice([*INTUNE_PLANS, "EXCHANGE_S_STANDARD", "TEAMS1"]) for plan in plans}
    return OrganizationData(
        sync_enabled=True,
        last_sync=None,
        skus=tuple(
            SubscribedSku(
                sku_id=sku,
                sku_part_number=f"SKU{i}",
                consumed_units=0,
                prepaid_enabled=10,
                prepaid_warning=0,
                prepaid_suspended=0,
                prepaid_locked_out=0,
                service_plans=tuple(ServicePlan(p, names[p]) for p in rng.sample(plans, rng.randint(0, 3))),
            )
            for i, sku in enumerate(skus[:-1])  # the last SKU is not subscribed
        ),
        subscriptions=(),
    )


def _expected(org: OrganizationData, sku: str | None, disabled: str | None, *, granting: bool) -> bool:
    known = {s.sku_id: {p.id for p in s.service_plans if p.name in INTUNE_PLANS} for s in org.skus}
    intune = known.get((sku or "").lower())
    if not intune:
        return False
    remaining = intune - {p for p in (disabled or "").split(",") if p}
    return bool(remaining) if granting else not remaining


@pytest.mark.parametrize("seed", range(20))
def test_verdicts_per_entry_match_the_rule(seed: int) -> None:
    rng = random.Random(seed)
    plans = [f"plan-{i}" for i in range(6)]
    skus = [f"sku-{i}" for i in range(rng.randint(1, 6))]
    org = _organization(rng, skus, plans)
    builder = TableBuilder(AssignedLicenseTable)
    entries: list[tuple[str | None, str | None]] = []
    for row in range(rng.randint(0, 300)):
        sku = None if rng.random() < 0.1 else rng.choice(skus).upper()  # ids compare case-blind
        disabled = None if rng.random() < 0.3 else ",".join(sorted(rng.sample(plans, rng.randint(0, 3))))
        entries.append((sku, disabled))
        builder.add({"row": row, "sku": sku, "disabled": disabled})
    table = AssignedLicenseTable(builder.columns())
    for granting, judge in ((True, granting_entries), (False, all_intune_plans_disabled)):
        got = judge(table, org, INTUNE_PLANS)
        assert got.dtype == np.bool_
        assert got.tolist() == [_expected(org, s, d, granting=granting) for s, d in entries]
