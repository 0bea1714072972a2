"""A simulated hybrid MDM estate: AD -> Entra ID -> ConfigMgr discovery -> Intune collection -> connector.

Most people travel the whole chain with realistic delays: Entra Connect's 30-minute cycle, ConfigMgr's
delta discovery every 5 minutes, an admin (or a query rule) adding them to the Intune collection,
the connector's 10-minute cycle writing CloudUserID. The others meet one of the problems below, the
way real users do, and most of those problems get fixed a few days later. Estate-wide outages
(Entra Connect, AD User Discovery, the connector) hold up everyone who reaches that step meanwhile.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from exporter.demo.common import (
    DAY,
    HOUR,
    MINUTE,
    NEVER,
    EstateSpec,
    Person,
    Schedule,
    SimulatedEstate,
    ascii_name,
    later,
    random_guid,
    window,
)
from exporter.model import (
    AssignedLicense,
    CmComponent,
    CmTable,
    CmUser,
    EntraTable,
    EntraUser,
    OrganizationData,
    ServicePlan,
    SubscribedSku,
    Subscription,
)
from exporter.pipelines.definitions import HYBRID_MDM
from exporter.sources.base import SourceError

COLLECTION_ID = "PS100012"
AD_USER_DISCOVERY = "SMS_AD_USER_DISCOVERY_AGENT"
CLOUD_USER_SYNC = "SMS_CLOUD_USERSYNC"
COMPONENTS = (
    CLOUD_USER_SYNC,
    "SMS_DMP_UPLOADER",
    "SMS_DMP_DOWNLOADER",
    "SMS_OUTGOING_CONTENT_MANAGER",
    AD_USER_DISCOVERY,
    "SMS_AZUREAD_DISCOVERY_AGENT",
    "SMS_COLLECTION_EVALUATOR",
)
RESOURCE_IDS = 2063597568  # ConfigMgr numbers user resources from 0x7B000000
STALE_RESOURCE_IDS = 2063500000

INTUNE_PLAN = ServicePlan("c1ec4a95-1f05-45b3-a911-aa3fa01094f5", "INTUNE_A")
E3_SKU = "6fd2c87f-b296-42f0-b197-1e91e994b900"
INTUNE_SKU = "061f9ace-7d42-4136-88ac-31dc755f143f"
EMS_SKU = "efccb6f7-5641-4e0e-bd10-b4976e1bf68e"
E5_SKU = "06ebc4ee-1bb5-47dd-8120-11324bc54e06"
LEGACY_SKU = "3f4babde-90ec-47c6-995d-d223749065d1"

# What happens to a person, by fate (the reason it shows while the problem lasts):
#   ok                  goes all the way
#   not_synced          OU outside Entra Connect's sync scope (entra_not_synced)
#   cloud_conflict      a cloud-only Entra user has its UPN, immutable id or SID (entra_cloud_user_conflict)
#   not_discovered      OU missing from AD User Discovery (configmgr_not_discovered, or
#                       configmgr_discovery_unhealthy while discovery is critical)
#   stale_record        account recreated under a new name: the old record keeps the UPN
#                       (configmgr_stale_record)
#   not_in_collection   nobody added it to the Intune collection (not_in_intune_collection)
#   collection_removed  enabled once, then dropped from the collection (intune_collection_removed)
#   upn_mismatch        .local UPN: Entra has the onmicrosoft.com one (upn_mismatch)
#   entra_blocked       pre-boarded: blocked in Entra until the start date (entra_account_disabled)
#   connector_pending   the connector skips it for hours, or for good (connector_sync_pending, or
#                       connector_unhealthy while the connector is critical)
#   other_user          CloudUserID of its former, now cloud-only, Entra object (cloud_user_id_other_user)
#   unknown_cloud_id    CloudUserID of a deleted Entra object (cloud_user_id_unknown)
HYBRID_FATES = (
    "ok",
    "not_synced",
    "cloud_conflict",
    "not_discovered",
    "stale_record",
    "not_in_collection",
    "collection_removed",
    "upn_mismatch",
    "entra_blocked",
    "connector_pending",
    "other_user",
    "unknown_cloud_id",
)


@dataclass(frozen=True)
class HybridSpec(EstateSpec):
    connector_status: int = 0  # SMS_CLOUD_USERSYNC's status outside an outage (1: warning)
    connector_outage: tuple[float, float] | None = None  # SMS_CLOUD_USERSYNC critical (relative times)
    discovery_outage: tuple[float, float] | None = None  # SMS_AD_USER_DISCOVERY_AGENT critical
    flaky_configmgr: bool = False  # every 6th site-database read times out


@dataclass(slots=True, eq=False)
class HybridUser(Person):
    cm_key: str = "sid"  # which key the ConfigMgr record carries: "sid", "guid" or "name"
    cm_at: float = NEVER  # discovered (Creation_Date0)
    collection_at: float = NEVER
    connector_at: float = NEVER  # CloudUserID written
    removed_at: float = NEVER  # left the Intune collection ...
    readded_at: float = NEVER  # ... and came back
    wrong_cloud_id: str | None = None  # the CloudUserID the connector wrote instead of entra_id ...
    wrong_until: float = NEVER  # ... until the fix
    wrong_is_former_object: bool = False
    blocked_from: float = NEVER  # Entra accountEnabled false in [blocked_from, blocked_until)
    blocked_until: float = NEVER
    local_upn_until: float = -NEVER  # AD UPN on the .local suffix until then
    entra_upn_until: float = -NEVER  # Entra UPN on onmicrosoft.com until then
    stale_guid: bytes = b""  # the record of the deleted former account (configmgr_stale_record)
    stale_cloud_id: str = ""
    stale_created: float = NEVER
    licensed_intune: bool = False


class HybridEstate(SimulatedEstate):
    definition = HYBRID_MDM
    person_type = HybridUser
    spec: HybridSpec

    def setup(self) -> None:
        self.discovery = Schedule(5 * MINUTE, 13.0, window(self.start, self.spec.discovery_outage))
        self.connector = Schedule(10 * MINUTE, 200.0, window(self.start, self.spec.connector_outage))
        self.configmgr_reads = 0

    # ------------------------------------------------------------------ a life in the chain
    def draw_chain(self, rng: random.Random, p: HybridUser) -> None:
        fate = p.fate
        p.cm_key = rng.choices(("sid", "guid", "name"), (0.9, 0.05, 0.05))[0]
        p.licensed_intune = rng.random() < 0.8
        noticed = p.created + rng.uniform(0, 60)
        if fate in ("not_discovered", "stale_record"):
            noticed = later(p.created, p.fix_after)
        if fate == "stale_record":
            p.stale_guid = random_guid(rng).bytes_le
            p.stale_cloud_id = str(random_guid(rng))
            p.stale_created = p.created - rng.uniform(200, 1500) * DAY
        p.cm_at = later(self.discovery.next_run(noticed), rng.uniform(30, 240))
        admin = rng.choice((rng.uniform(5 * MINUTE, 50 * MINUTE), rng.uniform(1 * HOUR, 3 * HOUR)))
        p.collection_at = later(p.cm_at, p.fix_after if fate == "not_in_collection" else admin)
        ready = max(p.collection_at, p.entra_at)  # the connector needs both
        if fate == "upn_mismatch":
            p.local_upn_until = later(p.collection_at, p.fix_after)
            p.entra_upn_until = later(self.entra_connect.next_run(p.local_upn_until), 2 * MINUTE)
            ready = max(ready, p.entra_upn_until)
        elif fate == "entra_blocked":
            p.blocked_from = p.entra_at
            unblocked = self.entra_connect.next_run(later(p.collection_at, p.fix_after))
            p.blocked_until = later(unblocked, 2 * MINUTE)
            ready = max(ready, p.blocked_until)
        elif fate == "connector_pending":
            ready = later(ready, rng.uniform(2 * HOUR, 4 * DAY) if rng.random() < 0.6 else NEVER)
        p.connector_at = later(self.connector.next_run(ready), rng.uniform(10, 120))
        if fate == "collection_removed":
            p.removed_at = later(p.connector_at, rng.uniform(3, 40) * DAY)
            p.readded_at = later(p.removed_at, p.fix_after)
        elif fate in ("other_user", "unknown_cloud_id"):
            p.wrong_cloud_id = str(random_guid(rng))
            p.wrong_is_former_object = fate == "other_user"
            p.wrong_until = later(p.connector_at, p.fix_after)

    def cloud_id_at(self, p: HybridUser, t: float) -> str | None:
        if t < p.connector_at:
            return None
        if p.wrong_cloud_id is not None and t < p.wrong_until:
            return p.wrong_cloud_id
        return p.entra_id

    def in_collection(self, p: HybridUser, t: float) -> bool:
        return p.collection_at <= t and not p.removed_at <= t < p.readded_at and p.left_at > t

    def stage_at(self, p: HybridUser, t: float) -> tuple[str, float]:
        if t < p.entra_at:
            return "ad_created", p.created
        if t < p.cm_at:
            return "entra_synced", p.entra_at
        if not self.in_collection(p, t):
            return "cm_discovered", p.removed_at if p.removed_at <= t else p.cm_at
        cloud = self.cloud_id_at(p, t)
        if cloud is None:
            return "in_intune_collection", p.collection_at
        if cloud != p.entra_id:
            return "connector_synced", p.connector_at
        return "intune_enabled", max(v for v in (p.connector_at, p.wrong_until, p.readded_at) if v <= t)

    def upn_at(self, p: HybridUser, t: float) -> str:
        if t < p.local_upn_until:
            return f"{p.sam}@{self.tenant}.local"
        return f"{p.sam}@{self.domain}"

    def entra_upn_at(self, p: HybridUser, t: float) -> str:
        if t < p.entra_upn_until:  # a UPN suffix Entra does not know becomes onmicrosoft.com
            return f"{p.sam}@{self.tenant}.onmicrosoft.com"
        return self.upn_at(p, t)

    def entra_enabled(self, p: HybridUser, t: float) -> bool:
        return p.left_at > t and not p.blocked_from <= t < p.blocked_until

    # ------------------------------------------------------------------ backend views
    def read_entra(self) -> EntraTable:
        now = self.clock()
        people = self.existing(now)
        users: list[EntraUser] = []
        for p in people:
            assert isinstance(p, HybridUser)
            if now < p.entra_at:
                continue
            licenses = (
                (AssignedLicense(E3_SKU), AssignedLicense(EMS_SKU))
                if p.licensed_intune
                else (AssignedLicense(E3_SKU),)
            )
            users.append(
                self.synced_user(
                    p,
                    now,
                    account_enabled=self.entra_enabled(p, now),
                    assigned_licenses=licenses if p.left_at > now else (),
                )
            )
        users += self.cloud_only_users(people, now)
        users += [
            self._former_object(p) for p in people if isinstance(p, HybridUser) and p.wrong_is_former_object
        ]
        self.count_graph("users", len(users) // 999 + 1)
        table = EntraTable.from_records(users)
        table.meta["read"] = "full"
        return table.prepare()

    def _former_object(self, p: HybridUser) -> EntraUser:
        """The person's earlier Entra object, left behind cloud-only when the sync re-created it."""
        assert p.wrong_cloud_id is not None
        return EntraUser(
            id=p.wrong_cloud_id,
            user_principal_name=f"{p.sam}.old@{self.tenant}.onmicrosoft.com",
            on_premises_sync_enabled=False,
            on_premises_immutable_id=None,
            on_premises_security_identifier=None,
            created=p.created - 30 * DAY,
            account_enabled=False,
        )

    def read_configmgr(self) -> CmTable:
        now = self.clock()
        self.configmgr_reads += 1
        if self.spec.flaky_configmgr and self.configmgr_reads % 6 == 0:
            raise SourceError("timeout", f"demo: query on CM01.{self.domain.upper()}/CM_PS1 timed out")
        records = []
        for p in self.existing(now):
            assert isinstance(p, HybridUser)
            if p.stale_guid and p.stale_created <= now < p.cm_at:
                records.append(self._stale_record(p, now))
            if now < p.cm_at:
                continue
            records.append(
                CmUser(
                    resource_id=RESOURCE_IDS + p.index,
                    unique_user_name=f"{self.netbios}\\{p.sam}",
                    user_principal_name=self.upn_at(p, now),
                    sid=p.sid if p.cm_key == "sid" else None,
                    object_guid=p.guid if p.cm_key in ("sid", "guid") else None,
                    creation_date=p.cm_at,
                    cloud_user_id=self.cloud_id_at(p, now),
                    collections=(COLLECTION_ID,) if self.in_collection(p, now) else (),
                )
            )
        table = CmTable.from_records(records, self.components(now), collection_ids=(COLLECTION_ID,))
        table.meta["read"] = "full"
        return table.prepare()

    def _stale_record(self, p: HybridUser, now: float) -> CmUser:
        """The discovery record of the deleted account the person's account replaced."""
        return CmUser(
            resource_id=STALE_RESOURCE_IDS + p.index,
            unique_user_name=f"{self.netbios}\\{ascii_name(p.given)}.{ascii_name(p.family)}",
            user_principal_name=self.upn_at(p, now),
            sid=f"{self.domain_sid}-{1100 + p.index}",
            object_guid=p.stale_guid,
            creation_date=p.stale_created,
            cloud_user_id=p.stale_cloud_id,
            collections=(COLLECTION_ID,),
        )

    def components(self, now: float) -> tuple[CmComponent, ...]:
        def status(name: str) -> int:
            if name == CLOUD_USER_SYNC:
                return 2 if self.connector.down(now) else self.spec.connector_status
            if name == AD_USER_DISCOVERY:
                return 2 if self.discovery.down(now) else 0
            return 0

        machine = f"CM01.{self.domain.upper()}"
        return tuple(CmComponent("PS1", machine, name, status(name)) for name in COMPONENTS)

    def read_organization(self) -> OrganizationData:
        now = self.clock()
        for endpoint in ("organization", "subscribedSkus", "subscriptions"):
            self.count_graph(endpoint, 1)
        active = [p for p in self.existing(now) if p.left_at > now and p.entra_at <= now]
        ems_users = sum(1 for p in active if isinstance(p, HybridUser) and p.licensed_intune)
        size = len(active)
        skus = (
            SubscribedSku(E3_SKU, "ENTERPRISEPACK", size, round(size * 1.08) + 20, 0, 0, 0),
            SubscribedSku(EMS_SKU, "EMS", ems_users, round(ems_users * 1.03) + 5, 50, 0, 0, (INTUNE_PLAN,)),
            SubscribedSku(INTUNE_SKU, "INTUNE_A", 12, 25, 0, 10, 0, (INTUNE_PLAN,)),
            # More assigned than purchased: reported as is, never clamped.
            SubscribedSku(E5_SKU, "SPE_E5", 53, 50, 10, 0, 0),
            SubscribedSku(LEGACY_SKU, "CONTOSO_LEGACY_ADDON", 3, 10, 0, 0, 0),
        )
        subscriptions = (
            Subscription(
                "sub-e3", E3_SKU, "ENTERPRISEPACK", "Enabled", False, skus[0].prepaid_enabled, now + 165 * DAY
            ),
            Subscription(
                "sub-ems", EMS_SKU, "EMS", "Enabled", False, skus[1].prepaid_enabled, now + 65 * DAY
            ),
            Subscription("sub-intune-trial", INTUNE_SKU, "INTUNE_A", "Enabled", True, 25, now + 10 * DAY),
            Subscription("sub-e5", E5_SKU, "SPE_E5", "Warning", False, 50, now + 25 * DAY),
            Subscription("sub-legacy", LEGACY_SKU, "CONTOSO_LEGACY_ADDON", "Enabled", False, 10, None),
        )
        return OrganizationData(True, self.entra_connect.last_run(now), skus, subscriptions)
