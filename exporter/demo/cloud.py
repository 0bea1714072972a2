"""A simulated ``cloud`` estate: AD -> Entra ID -> Intune licence -> enrolled device -> compliant device.

Northwind left hybrid MDM: group-based licensing gives staff Microsoft 365 E3, frontline workers
Microsoft 365 F3 and contractors EMS E3 (plus Office 365 E3 directly). People enroll a Windows
laptop (co-managed with ConfigMgr or Autopilot-only), a Mac or, for frontline workers, a phone within
days of getting their licence, and many enroll a phone too. Devices check in every eight hours.

Things go wrong the way they do in such tenants: the contractors' EMS units ran out nine days before
the start (everyone assigned since gets CountViolation until more are bought), a stricter compliance
policy went out two and a half days before the start with a seven-day grace period, and each person
may meet one of the problems of ``CLOUD_FATES``; most of them get fixed a few days later.
"""

from __future__ import annotations

import functools
import random
import uuid
from dataclasses import dataclass, field

from exporter.demo.common import (
    DAY,
    HOUR,
    MINUTE,
    NEVER,
    EstateSpec,
    Person,
    SimulatedEstate,
    later,
    random_guid,
)
from exporter.model import (
    AssignedLicense,
    DeviceTable,
    EntraTable,
    EntraUser,
    LicenseState,
    ManagedDevice,
    OrganizationData,
    ServicePlan,
    SubscribedSku,
    Subscription,
)
from exporter.pipelines.definitions import CLOUD, DEFAULT_DEVICE_STALE_AFTER

INTUNE_A = ServicePlan("c1ec4a95-1f05-45b3-a911-aa3fa01094f5", "INTUNE_A")
EXCHANGE_ENTERPRISE = ServicePlan("efb87545-963c-4e0d-99df-69c6916d9eb0", "EXCHANGE_S_ENTERPRISE")
EXCHANGE_KIOSK = ServicePlan("4a82b400-a79f-41a4-b4e2-e94f5787b113", "EXCHANGE_S_DESKLESS")
EXCHANGE_STANDARD = ServicePlan("9aaf7827-d63c-4b61-89c3-182f06f82e5c", "EXCHANGE_S_STANDARD")
ENTRA_P1 = ServicePlan("41781fb2-bc02-4b7c-bd55-b576c07bb09d", "AAD_PREMIUM")


@dataclass(frozen=True)
class Product:
    sku_id: str
    part_number: str
    plans: tuple[ServicePlan, ...]

    @property
    def grants_intune(self) -> bool:
        return INTUNE_A in self.plans


M365_E3 = Product("05e9a617-0261-4cee-bb44-138d3ef5d965", "SPE_E3", (INTUNE_A, EXCHANGE_ENTERPRISE, ENTRA_P1))
M365_F3 = Product("66b55226-6b4f-492c-910c-a3b7a3c9d993", "SPE_F1", (INTUNE_A, EXCHANGE_KIOSK, ENTRA_P1))
EMS_E3 = Product("efccb6f7-5641-4e0e-bd10-b4976e1bf68e", "EMS", (INTUNE_A, ENTRA_P1))
O365_E3 = Product("6fd2c87f-b296-42f0-b197-1e91e994b900", "ENTERPRISEPACK", (EXCHANGE_ENTERPRISE,))
EXCHANGE_P1 = Product("4b9405b0-7788-4568-add1-99614e613b69", "EXCHANGESTANDARD", (EXCHANGE_STANDARD,))
PRODUCTS = (M365_E3, M365_F3, EMS_E3, O365_E3, EXCHANGE_P1)
GRANTS_INTUNE = {p.sku_id: p.grants_intune for p in PRODUCTS}


@dataclass(frozen=True)
class LicensingGroup:
    name: str
    product: Product
    disabled: tuple[str, ...] = ()  # service plan ids the group's licence options turn off


STAFF = LicensingGroup("LIC-M365-E3-Staff", M365_E3)
FRONTLINE = LicensingGroup("LIC-M365-F3-Frontline", M365_F3)
CONTRACTORS = LicensingGroup("LIC-EMS-E3-Contractors", EMS_E3)
NO_MDM_PILOT = LicensingGroup("LIC-EMS-E3-Pilot-NoMDM", EMS_E3, (INTUNE_A.id,))
GROUPS = (STAFF, FRONTLINE, CONTRACTORS, NO_MDM_PILOT)

DEVICE_SYNC_CYCLE = 8 * HOUR
GRACE_PERIOD = 7 * DAY
CLEANUP_AFTER = 180 * DAY  # the tenant's device clean-up rule deletes devices silent for this long
CO_MANAGED = "configurationManagerClientMdm"
ACTIVE = ("Active", "ActiveWithError")

# What happens to a person, by fate (the reason it shows while the problem lasts):
#   ok                   licensed, enrolls within days, compliant (contractors assigned while the EMS
#                        units are exhausted wait at license_count_violation)
#   not_synced, cloud_conflict   as in the hybrid estates (entra_not_synced, entra_cloud_user_conflict)
#   usage_location       no usageLocation: the licence fails (license_usage_location_missing)
#   license_conflict     F3 next to a direct Exchange Online Plan 1 (license_conflict)
#   license_other        the assignment fails with "Other" (license_error_other)
#   plan_disabled        in the EMS pilot group that turns Intune off (intune_plan_disabled)
#   no_license           Office 365 E3 only, or nothing (no_intune_license)
#   entra_blocked        licensed but blocked from sign-in (entra_account_disabled)
#   no_device            never enrolls anything (device_enrollment_pending after a week)
#   stale_devices        the only device stopped checking in (device_stale after 30 days)
#   noncompliant         the devices fail a policy (device_noncompliant)
#   grace                the devices miss the new policy: grace period, then noncompliant
#   compliance_unknown   co-managed with the compliance workload still on ConfigMgr, or never
#                        evaluated (device_compliance_unknown)
CLOUD_FATES = (
    "ok",
    "not_synced",
    "cloud_conflict",
    "usage_location",
    "license_conflict",
    "license_other",
    "plan_disabled",
    "no_license",
    "entra_blocked",
    "no_device",
    "stale_devices",
    "noncompliant",
    "grace",
    "compliance_unknown",
)
COUNTRIES = (("US", 0.35), ("GB", 0.2), ("DE", 0.2), ("SE", 0.1), ("IN", 0.1), ("FR", 0.05))


@dataclass(frozen=True)
class CloudSpec(EstateSpec):
    ems_exhausted: float = -9 * DAY  # the contractors' EMS units ran out (relative to the start)
    ems_topped_up: float = 3 * DAY  # more units bought, the failed assignments reprocessed
    ems_extra_units: int = 150
    policy_rollout: float = -2.5 * DAY  # the stricter compliance policy (grace period GRACE_PERIOD)


@dataclass(slots=True, eq=False)
class Grant:
    """One licence assignment of a person, and how its licenseAssignmentStates entry evolves."""

    product: Product
    group: LicensingGroup | None  # None: assigned directly
    since: float
    until: float = NEVER  # removed
    error: str | None = None  # the assignment fails with this error ...
    error_until: float = NEVER  # ... until it is reprocessed successfully

    @property
    def active_from(self) -> float:
        return self.since if self.error is None else max(self.since, self.error_until)

    @property
    def grants_intune(self) -> bool:
        disabled = self.group.disabled if self.group else ()
        return self.product.grants_intune and INTUNE_A.id not in disabled

    def state_at(self, t: float, group_ids: dict[str, str]) -> LicenseState | None:
        if not self.since <= t < self.until:
            return None
        group = group_ids[self.group.name] if self.group else None
        disabled = self.group.disabled if self.group else ()
        if self.error is not None and t < self.error_until:
            return LicenseState(self.product.sku_id, "Error", self.error, group, disabled, self.since)
        return LicenseState(self.product.sku_id, "Active", "None", group, disabled, self.active_from)


@dataclass(slots=True, eq=False)
class SimDevice:
    id: str
    name: str
    os: str
    agent: str  # managementAgent
    enrolled: float
    evaluated_after: float  # compliance is "unknown" this long after enrollment
    phase: float  # where in the eight-hour check-in cycle this device is
    steady: str = "compliant"  # its compliance state when nothing is wrong with its user
    frozen_at: float = NEVER  # stopped checking in (an old device nobody retired)
    removed_at: float = NEVER


@dataclass(slots=True, eq=False)
class CloudUser(Person):
    role: str = "staff"  # staff | frontline | contractor
    usage_location: str | None = None
    no_location_until: float = -NEVER  # usageLocation null until then
    grants: list[Grant] = field(default_factory=list)
    blocked_from: float = NEVER  # Entra accountEnabled false in [blocked_from, blocked_until)
    blocked_until: float = NEVER
    devices: list[SimDevice] = field(default_factory=list)
    problem: str | None = None  # what is wrong with every device of the person ...
    problem_since: float = NEVER  # ... from then ...
    problem_until: float = NEVER  # ... until then


class CloudEstate(SimulatedEstate):
    definition = CLOUD
    person_type = CloudUser
    spec: CloudSpec

    def setup(self) -> None:
        spec = self.spec
        self.ems_exhausted_at = self.start + spec.ems_exhausted
        self.ems_topped_up_at = self.start + spec.ems_topped_up
        self.policy_rollout_at = self.start + spec.policy_rollout
        self.group_ids = {
            g.name: str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.name}/group/{g.name}")) for g in GROUPS
        }

    # ------------------------------------------------------------------ licences
    def draw_chain(self, rng: random.Random, p: CloudUser) -> None:
        p.role = rng.choices(("staff", "frontline", "contractor"), (0.72, 0.18, 0.10))[0]
        p.usage_location = rng.choices([c for c, _ in COUNTRIES], [w for _, w in COUNTRIES])[0]
        p.grants = self._draw_grants(rng, p)
        licensed = min(
            (g.active_from for g in p.grants if g.grants_intune and g.active_from < g.until), default=NEVER
        )
        if p.fate == "entra_blocked":
            p.blocked_from = p.entra_at
            p.blocked_until = later(self.entra_connect.next_run(later(licensed, p.fix_after)), 2 * MINUTE)
        self._draw_devices(rng, p, licensed)

    def _draw_grants(self, rng: random.Random, p: CloudUser) -> list[Grant]:
        assigned = later(p.entra_at, rng.uniform(2 * MINUTE, 20 * MINUTE))  # group-based licensing runs
        fixed = later(assigned, p.fix_after)
        fate = p.fate
        grants: list[Grant] = []
        if fate == "usage_location":
            p.no_location_until = fixed
            error = rng.choice(("ProhibitedInUsageLocationViolation", "Other"))
            grants.append(Grant(M365_E3, STAFF, assigned, error=error, error_until=fixed))
        elif fate == "license_conflict":  # F3's Exchange Kiosk excludes the direct Exchange Plan 1
            grants.append(Grant(EXCHANGE_P1, None, later(p.entra_at, MINUTE), until=fixed))
            grants.append(
                Grant(M365_F3, FRONTLINE, assigned, error="MutuallyExclusiveViolation", error_until=fixed)
            )
        elif fate == "license_other":
            grants.append(Grant(M365_E3, STAFF, assigned, error="Other", error_until=fixed))
        elif fate == "plan_disabled":  # moved to the staff group when someone notices
            grants.append(Grant(EMS_E3, NO_MDM_PILOT, assigned, until=fixed))
            grants.append(Grant(O365_E3, None, assigned, until=fixed))
            grants.append(Grant(M365_E3, STAFF, fixed))
        elif fate == "no_license":  # nobody put the person in a licensing group
            if rng.random() < 0.7:
                grants.append(Grant(O365_E3, None, assigned, until=fixed))
            grants.append(Grant(M365_E3, STAFF, fixed))
        elif p.role == "staff":
            grants.append(Grant(M365_E3, STAFF, assigned))
        elif p.role == "frontline":
            grants.append(Grant(M365_F3, FRONTLINE, assigned))
        else:
            grants.append(Grant(EMS_E3, CONTRACTORS, assigned))
            grants.append(Grant(O365_E3, None, assigned))
        for grant in grants:
            if (
                grant.product is EMS_E3
                and grant.error is None
                and self.ems_exhausted_at <= grant.since < self.ems_topped_up_at
            ):
                grant.error, grant.error_until = "CountViolation", self.ems_topped_up_at
        return [g for g in grants if g.since != NEVER]

    def states_at(self, p: CloudUser, t: float) -> list[LicenseState]:
        return [s for g in p.grants if (s := g.state_at(t, self.group_ids)) is not None]

    def licensed_since(self, p: CloudUser, t: float) -> float | None:
        """When the person got an Intune-granting licence that is active at ``t`` (None: it has none)."""
        active = [
            g.active_from
            for g in p.grants
            if g.grants_intune and g.since <= t < g.until and g.active_from <= t
        ]
        return min(active) if active else None

    # ------------------------------------------------------------------ devices
    def _draw_devices(self, rng: random.Random, p: CloudUser, licensed: float) -> None:
        fate = p.fate
        if fate == "no_device":
            first = later(licensed, rng.uniform(8, 25) * DAY if rng.random() < 0.6 else NEVER)
        elif fate == "entra_blocked":
            first = later(p.blocked_until, rng.uniform(0.1, 2) * DAY)
        else:
            first = later(licensed, rng.uniform(0.1, 4) * DAY)  # the laptop is handed out
        if first == NEVER:
            return
        problem = {
            "noncompliant": "noncompliant",
            "grace": "grace",
            "stale_devices": "stale",
            "compliance_unknown": rng.choices(
                ("configManager", "unknown", "error", "conflict"), (0.6, 0.25, 0.1, 0.05)
            )[0],
        }.get(fate)
        one_device_only = fate in ("stale_devices", "compliance_unknown")
        if problem == "configManager" or (p.role != "frontline" and rng.random() < 0.88):
            co_managed = problem == "configManager" or rng.random() < 0.6
            p.devices.append(self._computer(rng, first, "Windows", CO_MANAGED if co_managed else "mdm"))
        elif p.role != "frontline":
            p.devices.append(self._computer(rng, first, "macOS", "mdm"))
        else:
            p.devices.append(self._phone(rng, p, first))
        if not one_device_only and p.role != "frontline" and rng.random() < 0.55:
            phone = self._phone(rng, p, first + rng.uniform(0, 20) * DAY)
            if fate == "ok" and rng.random() < 0.05:
                phone.steady = "noncompliant"  # the laptop keeps the person compliant
            p.devices.append(phone)
        if fate == "ok" and rng.random() < 0.06:
            old = self._phone(rng, p, first + rng.uniform(0, 10) * DAY)
            old.frozen_at = old.enrolled + rng.uniform(1, 20) * DAY  # replaced, never retired
            p.devices.append(old)
        if p.left_at != NEVER:
            for device in p.devices:
                device.removed_at = later(p.left_at, rng.uniform(2, 30) * DAY)  # wiped and deleted
        self._draw_problem(rng, p, problem, first)

    def _draw_problem(self, rng: random.Random, p: CloudUser, problem: str | None, first: float) -> None:
        p.problem = problem
        if problem == "noncompliant":
            p.problem_since = first + rng.uniform(0.5, 60) * DAY
            p.problem_until = later(p.problem_since, p.fix_after)
        elif problem == "grace":
            p.problem_since = max(self.policy_rollout_at, first + HOUR)
            fixed = rng.uniform(1, 10) * DAY if rng.random() < 0.6 else NEVER
            p.problem_until = later(p.problem_since, fixed)
        elif problem == "stale":  # parental leave, a laptop in a drawer
            p.problem_since = first + rng.uniform(1, 30) * DAY
            back = rng.uniform(40, 120) * DAY if rng.random() < 0.6 else NEVER
            p.problem_until = later(p.problem_since, back)
        elif problem is not None:
            p.problem_since = first
            p.problem_until = later(first, p.fix_after)
        for device in p.devices:
            device.removed_at = min(device.removed_at, self._cleaned_up_at(p, device))

    @staticmethod
    def _cleaned_up_at(p: CloudUser, d: SimDevice) -> float:
        """When the clean-up rule deletes the device, because it stopped checking in (NEVER: it does not)."""
        silent = later(d.frozen_at, CLEANUP_AFTER)
        if p.problem == "stale" and later(p.problem_since, CLEANUP_AFTER) < p.problem_until:
            silent = min(silent, later(p.problem_since, CLEANUP_AFTER))
        return silent

    def _computer(self, rng: random.Random, enrolled: float, os: str, agent: str) -> SimDevice:
        serial = rng.randrange(10000, 99999)
        name = f"{self.netbios}-LT{serial}" if os == "Windows" else f"{self.netbios}-MAC{serial}"
        return self._device(rng, name, os, agent, enrolled)

    def _phone(self, rng: random.Random, p: CloudUser, enrolled: float) -> SimDevice:
        android_share = 0.6 if p.role == "frontline" else 0.3
        if rng.random() < android_share:
            return self._device(
                rng, rng.choice(("Galaxy A54", "Pixel 8", "Galaxy S23")), "Android", "mdm", enrolled
            )
        return self._device(rng, f"{p.given}'s iPhone", "iOS", "mdm", enrolled)

    def _device(self, rng: random.Random, name: str, os: str, agent: str, enrolled: float) -> SimDevice:
        return SimDevice(
            id=str(random_guid(rng)),
            name=name,
            os=os,
            agent=agent,
            enrolled=enrolled,
            evaluated_after=rng.uniform(10 * MINUTE, 90 * MINUTE),
            phase=rng.uniform(0, DEVICE_SYNC_CYCLE),
        )

    def compliance(self, p: CloudUser, d: SimDevice, t: float) -> str:
        if t < d.enrolled + d.evaluated_after:
            return "unknown"
        problem = p.problem
        if problem is not None and problem != "stale" and p.problem_since <= t < p.problem_until:
            if problem == "grace":
                return "inGracePeriod" if t < p.problem_since + GRACE_PERIOD else "noncompliant"
            return problem
        return d.steady

    def last_sync(self, p: CloudUser, d: SimDevice, t: float) -> float:
        if d.frozen_at <= t:
            return d.frozen_at
        if p.problem == "stale" and p.problem_since <= t < p.problem_until:
            return max(d.enrolled, p.problem_since)
        return max(d.enrolled, t - (t + d.phase) % DEVICE_SYNC_CYCLE)

    def devices_at(self, p: CloudUser, t: float) -> list[SimDevice]:
        return [d for d in p.devices if d.enrolled <= t < d.removed_at]

    def stage_at(self, p: CloudUser, t: float) -> tuple[str, float]:
        if t < p.entra_at:
            return "ad_created", p.created
        licensed = self.licensed_since(p, t)
        if licensed is None:
            return "entra_synced", p.entra_at
        devices = self.devices_at(p, t)
        if not devices:
            return "intune_licensed", licensed
        first = min(d.enrolled for d in devices)
        for d in devices:
            fresh = t - self.last_sync(p, d, t) <= DEFAULT_DEVICE_STALE_AFTER
            if fresh and self.compliance(p, d, t) == "compliant":
                return "device_compliant", first + d.evaluated_after
        return "device_enrolled", first

    def entra_enabled(self, p: CloudUser, t: float) -> bool:
        return p.left_at > t and not p.blocked_from <= t < p.blocked_until

    # ------------------------------------------------------------------ backend views
    def read_entra(self) -> EntraTable:
        now = self.clock()
        people = self.existing(now)
        users: list[EntraUser] = []
        for p in people:
            assert isinstance(p, CloudUser)
            if now < p.entra_at:
                continue
            states = self.states_at(p, now)
            users.append(
                self.synced_user(
                    p,
                    now,
                    account_enabled=self.entra_enabled(p, now),
                    assigned_licenses=tuple(
                        AssignedLicense(s.sku_id, s.disabled_plans) for s in states if s.state in ACTIVE
                    ),
                    license_states=tuple(states),
                    usage_location=None if now < p.no_location_until else p.usage_location,
                )
            )
        users += self.cloud_only_users(people, now)
        self.count_graph("users", len(users) // 999 + 1)
        names = {self.group_ids[g.name]: g.name for g in GROUPS}
        table = EntraTable.from_records(users, group_names=names)
        table.meta["read"] = "full"
        return table.prepare()

    def read_devices(self) -> DeviceTable:
        now = self.clock()
        devices = []
        for p in self.existing(now):
            assert isinstance(p, CloudUser)
            for d in self.devices_at(p, now):
                devices.append(
                    ManagedDevice(
                        id=d.id,
                        user_id=p.entra_id,
                        operating_system=d.os,
                        compliance_state=self.compliance(p, d, now),
                        management_agent=d.agent,
                        enrolled=d.enrolled,
                        last_sync=self.last_sync(p, d, now),
                        device_name=d.name,
                    )
                )
        self.count_graph("managedDevices", len(devices) // 1000 + 1)
        table = DeviceTable.from_records(devices)
        table.meta["read"] = "full"
        return table.prepare()

    @functools.cached_property
    def ems_units_bought_first(self) -> int:
        """The EMS units of the first purchase: exactly those in use when they ran out."""
        t = self.ems_exhausted_at
        return sum(
            1
            for p in self.people
            if isinstance(p, CloudUser)
            for g in p.grants
            if g.product is EMS_E3 and g.since <= t < g.until and g.active_from <= t
        )

    def consumed_units(self, now: float) -> dict[str, int]:
        consumed = dict.fromkeys((p.sku_id for p in PRODUCTS), 0)
        for p in self.existing(now):
            assert isinstance(p, CloudUser)
            if now < p.entra_at:
                continue
            for state in self.states_at(p, now):
                if state.state in ACTIVE:
                    consumed[state.sku_id] += 1
        return consumed

    def read_organization(self) -> OrganizationData:
        now = self.clock()
        for endpoint in ("organization", "subscribedSkus", "subscriptions"):
            self.count_graph(endpoint, 1)
        consumed = self.consumed_units(now)
        ems = self.ems_units_bought_first + (self.spec.ems_extra_units if now >= self.ems_topped_up_at else 0)
        prepaid = {
            M365_E3.sku_id: round(consumed[M365_E3.sku_id] * 1.04) + 15,
            M365_F3.sku_id: consumed[M365_F3.sku_id] + 12,
            EMS_E3.sku_id: ems,
            O365_E3.sku_id: consumed[O365_E3.sku_id] + 25,
            EXCHANGE_P1.sku_id: consumed[EXCHANGE_P1.sku_id] + 3,
        }
        skus = tuple(
            SubscribedSku(p.sku_id, p.part_number, consumed[p.sku_id], prepaid[p.sku_id], 0, 0, 0, p.plans)
            for p in PRODUCTS
        )
        renewals = {M365_E3: 200, M365_F3: 200, EMS_E3: 45, O365_E3: 200, EXCHANGE_P1: 80}
        subscriptions = tuple(
            Subscription(
                f"sub-{p.part_number.lower()}",
                p.sku_id,
                p.part_number,
                "Enabled",
                False,
                prepaid[p.sku_id],
                now + renewals[p] * DAY,
            )
            for p in PRODUCTS
        )
        return OrganizationData(True, self.entra_connect.last_run(now), skus, subscriptions)
