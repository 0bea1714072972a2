"""Synthetic tenants for benchmarks: many users and devices, varied like a real estate, from a seed.

Users are :func:`tests.entra.tenant_data.graph_user` with, drawn per user: 8% cloud-only, 3% without
immutable id (SID-only match), 2% disabled, 1% without usage location, licence states mostly active with
~1% ``CountViolation`` and ~0.5% ``ProhibitedInUsageLocationViolation``, a third assigned by group. About
90% of users have one Intune device (a few have two), with the compliance states Intune reports.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from tests.entra import tenant_data

COMPLIANCE_STATES = (
    "compliant",
    "compliant",
    "compliant",
    "noncompliant",
    "inGracePeriod",
    "unknown",
    "error",
)
OPERATING_SYSTEMS = ("Windows", "Windows", "Windows", "iOS", "Android", "macOS")
_USER_ID_BASE = uuid.UUID(tenant_data.user_id(0)).int


def license_states(rng: random.Random, stamp: int = 0) -> list[dict[str, Any]]:
    roll = rng.random()
    error, state = "None", "Active"
    if roll < 0.01:
        error, state = "CountViolation", "Error"
    elif roll < 0.015:
        error, state = "ProhibitedInUsageLocationViolation", "Error"
    group = tenant_data.INTUNE_USERS_GROUP if rng.random() < 0.33 else None
    updated = f"2024-{1 + stamp % 12:02d}-{1 + stamp % 28:02d}T09:00:00Z"
    return [
        tenant_data.license_state(
            tenant_data.INTUNE_A_SKU, state=state, error=error, group=group, updated=updated
        )
    ]


def user(index: int, rng: random.Random) -> dict[str, Any]:
    synced = rng.random() >= 0.08
    return tenant_data.graph_user(
        index,
        synced=synced,
        immutable=rng.random() >= 0.03,
        license_states=license_states(rng, index),
        usage_location=None if rng.random() < 0.01 else "DE",
        enabled=rng.random() >= 0.02,
    )


def users(count: int, seed: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for index in range(count):
        yield user(index, rng)


def devices(user_count: int, seed: int, share: float = 0.9) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed + 1)
    index = 0
    for user_index in range(user_count):
        if rng.random() >= share:
            continue
        for _ in range(2 if rng.random() < 0.05 else 1):
            yield tenant_data.managed_device(
                index,
                user_index,
                compliance=rng.choice(COMPLIANCE_STATES),
                operating_system=rng.choice(OPERATING_SYSTEMS),
                agent="configurationManagerClientMdm" if rng.random() < 0.1 else "mdm",
            )
            index += 1


def next_free_index(user_ids: Iterable[str]) -> int:
    """The first synthetic user index above every index in use."""
    highest = -1
    for user_id in user_ids:
        try:
            index = uuid.UUID(user_id).int - _USER_ID_BASE
        except ValueError:
            continue
        if 0 <= index < 1 << 40:
            highest = max(highest, index)
    return highest + 1
