"""License units per SKU (Get-MsolAccountSku) and subscription lifecycle dates (Get-MsolSubscription)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from exporter.pipelines.cloud import licence_errors
from exporter.products import product_name
from exporter.snapshot import Snapshot

_FRESHNESS = " Values come from the exporter's background refresh of Microsoft Graph."


def snake_case(value: str) -> str:
    """Graph's status names (``LockedOut``) in the label style of the prepaid units (``locked_out``)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", value).lower()


class LicenseCollector:
    name = "licenses"

    def collect_from(self, snapshot: Snapshot) -> Iterator[Metric]:
        prepaid = GaugeMetricFamily(
            "intune_license_prepaid_units",
            "Purchased license units per SKU by state (Get-MsolAccountSku Active/Warning/Suspended/"
            "LockedOut units)." + _FRESHNESS,
            labels=["estate", "sku", "sku_name", "status"],
        )
        consumed = GaugeMetricFamily(
            "intune_license_consumed_units",
            "Assigned license units per SKU; may exceed the enabled units and is reported as is."
            + _FRESHNESS,
            labels=["estate", "sku", "sku_name"],
        )
        expiry = GaugeMetricFamily(
            "intune_license_subscription_expiry_timestamp_seconds",
            "Next lifecycle date of each subscription (renewal, expiry or deletion); subscriptions "
            "without one are not exported." + _FRESHNESS,
            labels=["estate", "sku", "subscription_id", "status", "trial"],
        )
        errors = GaugeMetricFamily(
            "intune_license_assignment_error_users",
            "Entra users (every user Graph returned) whose licence assignment state for this SKU carries "
            "this error, by assigning group (display name, or direct)." + _FRESHNESS,
            labels=["estate", "sku", "error", "assigned_by"],
        )
        for estate in snapshot.estates:
            org = estate.organization
            if estate.entra is not None:
                names = estate.entra.group_names
                counted: dict[tuple[str, str, str], int] = {}
                for (sku_id, error, group), count in licence_errors(estate.entra).items():
                    part = org.sku_part_number(sku_id) if org is not None else sku_id
                    by = "direct" if group is None else names.get(group, group)
                    counted[(part, error, by)] = counted.get((part, error, by), 0) + count
                for (part, error, by), count in sorted(counted.items()):
                    errors.add_metric([estate.name, part, error, by], count)
            if org is None:
                continue
            for sku in org.skus:
                name = product_name(sku.sku_part_number, sku.sku_id)
                base = [estate.name, sku.sku_part_number, name]
                prepaid.add_metric([*base, "enabled"], sku.prepaid_enabled)
                prepaid.add_metric([*base, "warning"], sku.prepaid_warning)
                prepaid.add_metric([*base, "suspended"], sku.prepaid_suspended)
                prepaid.add_metric([*base, "locked_out"], sku.prepaid_locked_out)
                consumed.add_metric(base, sku.consumed_units)
            for sub in org.subscriptions:
                if sub.next_lifecycle is None:
                    continue
                expiry.add_metric(
                    [
                        estate.name,
                        sub.sku_part_number,
                        sub.id,
                        snake_case(sub.status),
                        "true" if sub.is_trial else "false",
                    ],
                    sub.next_lifecycle,
                )
        yield from (prepaid, consumed, expiry, errors)
