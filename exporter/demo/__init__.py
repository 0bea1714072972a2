"""The embedded demo: three simulated estates behind the real engine, stage model and collectors.

- ``contoso`` (hybrid MDM, ~3000 users): the everyday problems. Most stuck users were never added to
  the Intune collection or wait for a slow connector; a few of every other reason of the hybrid table.
  Its connector is in warning state.
- ``fabrikam`` (hybrid MDM, ~900 users): a bad day. Entra Connect has been silent for 5 hours,
  AD User Discovery (SMS_AD_USER_DISCOVERY_AGENT) has been critical for 9 hours and the connector
  (SMS_CLOUD_USERSYNC) for 14, and its site database times out on one read in six.
- ``northwind`` (cloud pipeline, ~1500 users): licences by group, devices, compliance; the
  contractors' EMS units ran out and a stricter compliance policy is in its grace period.

Every estate has a history (accounts created over weeks or years, a steady trickle of new hires,
leavers who leave orphans behind, problems fixed days later) and a first-seen history, so the stuck
users show at once. Everything is drawn from seeded random generators and every read takes the time
from the clock it is given: the same seed and clock give the same estates, byte for byte.
"""

from __future__ import annotations

import time

from exporter.config import Config, EstateConfig
from exporter.demo.cloud import CloudEstate, CloudSpec
from exporter.demo.common import DAY, HOUR, MINUTE, Clock, SimulatedEstate
from exporter.demo.hybrid import HybridEstate, HybridSpec
from exporter.demo.sources import DemoGraphSource, DemoSource, demo_source
from exporter.model import SourceKind
from exporter.pipelines.evaluation import FirstSeen
from exporter.sources.base import Source

__all__ = [
    "DemoGraphSource",
    "DemoSource",
    "build_estates",
    "demo_setup",
    "scaled_clock",
]

CONTOSO = HybridSpec(
    name="contoso",
    domain="contoso.com",
    netbios="CONTOSO",
    users=3000,
    history=60 * DAY,
    hire_interval=20 * MINUTE,
    fates=(
        ("ok", 0.812),
        ("not_synced", 0.012),
        ("cloud_conflict", 0.005),
        ("not_discovered", 0.012),
        ("stale_record", 0.005),
        ("not_in_collection", 0.05),
        ("collection_removed", 0.008),
        ("upn_mismatch", 0.014),
        ("entra_blocked", 0.006),
        ("connector_pending", 0.06),
        ("other_user", 0.005),
        ("unknown_cloud_id", 0.011),
    ),
    connector_status=1,
)
FABRIKAM = HybridSpec(
    name="fabrikam",
    domain="fabrikam.com",
    netbios="FABRIKAM",
    users=900,
    history=60 * DAY,
    hire_interval=45 * MINUTE,
    fates=(
        ("ok", 0.86),
        ("not_synced", 0.01),
        ("cloud_conflict", 0.005),
        ("not_discovered", 0.006),
        ("stale_record", 0.005),
        ("not_in_collection", 0.05),
        ("collection_removed", 0.008),
        ("upn_mismatch", 0.015),
        ("entra_blocked", 0.006),
        ("connector_pending", 0.015),
        ("other_user", 0.008),
        ("unknown_cloud_id", 0.012),
    ),
    entra_connect_outage=(-5 * HOUR, 2 * DAY),
    discovery_outage=(-9 * HOUR, 2 * DAY),
    connector_outage=(-14 * HOUR, 3 * DAY),
    flaky_configmgr=True,
)
NORTHWIND = CloudSpec(
    name="northwind",
    domain="northwindtraders.com",
    netbios="NORTHWIND",
    users=1500,
    history=180 * DAY,
    hire_interval=30 * MINUTE,
    # A full synchronisation cycle (after a sync rule change) has held up the exports for 2.5 hours,
    # and HR's import of next week's starters ran since.
    entra_connect_outage=(-2.5 * HOUR, 20 * MINUTE),
    hr_batches=((-2.4 * HOUR, 6),),
    fates=(
        ("ok", 0.816),
        ("not_synced", 0.008),
        ("cloud_conflict", 0.004),
        ("usage_location", 0.009),
        ("license_conflict", 0.006),
        ("license_other", 0.007),
        ("plan_disabled", 0.01),
        ("no_license", 0.016),
        ("entra_blocked", 0.01),
        ("no_device", 0.035),
        ("stale_devices", 0.02),
        ("noncompliant", 0.025),
        ("grace", 0.008),
        ("compliance_unknown", 0.024),
    ),
)
SOURCES: dict[str, tuple[SourceKind, ...]] = {
    "hybrid_mdm": ("ad", "entra", "entra_organization", "configmgr"),
    "cloud": ("ad", "entra", "entra_organization", "intune_devices"),
}


def scaled_clock(time_scale: float) -> Clock:
    """Wall-clock time, optionally running faster from now on so a short demo shows movement."""
    start_wall = time.time()
    start_mono = time.monotonic()
    return lambda: start_wall + (time.monotonic() - start_mono) * time_scale


def build_estates(clock: Clock, seed: int | str = 0) -> list[SimulatedEstate]:
    seed_text = f"demo-{seed}"
    return [
        HybridEstate(CONTOSO, clock, seed_text),
        HybridEstate(FABRIKAM, clock, seed_text),
        CloudEstate(NORTHWIND, clock, seed_text),
    ]


def demo_setup(
    time_scale: float = 1.0,
    refresh_interval: float = 15.0,
    *,
    clock: Clock | None = None,
    seed: int | str = 0,
) -> tuple[Config, dict[str, list[Source]], Clock, dict[str, FirstSeen]]:
    """The demo's config, sources, clock and first-seen history.

    ``clock`` replaces the wall clock (scaled by ``time_scale``): the estates start at its first
    reading and read every time from it, so a fixed clock and seed give the same estates every run.
    """
    if clock is not None and time_scale != 1.0:
        raise ValueError("demo_setup: give either a clock or a time_scale, not both")
    clock = clock or scaled_clock(time_scale)
    estates = build_estates(clock, seed)
    config = Config(
        estates=tuple(
            EstateConfig(
                name=e.name,
                pipeline=e.definition.name,
                stuck_after=dict(e.definition.default_stuck_after),
            )
            for e in estates
        ),
        refresh_interval=refresh_interval,
        stuck_users_listed=25,
        user_label="upn",
    )
    sources: dict[str, list[Source]] = {
        e.name: [demo_source(e, kind) for kind in SOURCES[e.definition.name]] for e in estates
    }
    history = {e.name: e.first_seen_history() for e in estates}
    return config, sources, clock, history
