"""The embedded demo estate: simulated backends behind the real engine, stage model and collectors.

Each simulated estate has a few thousand users with sixty days of history and a steady trickle of
new hires. Every user has a fate drawn at creation: most travel the whole pipeline with realistic
delays (Entra Connect cycle up to 30 min, ConfigMgr delta discovery, an admin adding them to the
Intune collection, the connector's delta sync), some get stuck at a stage the way real users do
(OU outside the sync scope, not discovered, never added to the collection, UPN suffix the
connector cannot find, CloudUserID of a deleted Entra user), and many of those get fixed days later.
Leavers are disabled in AD and leave orphans behind in Entra and ConfigMgr.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from exporter.columns import guid_keys
from exporter.config import Config, EstateConfig
from exporter.ids import immutable_id
from exporter.model import (
    AdTable,
    AdUser,
    AssignedLicense,
    CmComponent,
    CmTable,
    CmUser,
    EntraTable,
    EntraUser,
    HttpStats,
    OrganizationData,
    ServicePlan,
    SourceData,
    SourceKind,
    SubscribedSku,
    Subscription,
)
from exporter.pipelines.definitions import HYBRID_MDM
from exporter.pipelines.evaluation import FirstSeen
from exporter.sources.base import Source, SourceError

COLLECTION_ID = "PS100012"

HOUR = 3600.0
DAY = 86400.0
NEVER = float("inf")
HISTORY = 60 * DAY
INTUNE_PLAN = ServicePlan("c1ec4a95-1f05-45b3-a911-aa3fa01094f5", "INTUNE_A")
E3_SKU = "6fd2c87f-b296-42f0-b197-1e91e994b900"
INTUNE_SKU = "061f9ace-7d42-4136-88ac-31dc755f143f"
EMS_SKU = "efccb6f7-5641-4e0e-bd10-b4976e1bf68e"
CONNECTOR_COMPONENTS = (
    "SMS_CLOUD_USERSYNC",
    "SMS_DMP_UPLOADER",
    "SMS_DMP_DOWNLOADER",
    "SMS_OUTGOING_CONTENT_MANAGER",
    "SMS_AD_USER_DISCOVERY_AGENT",
    "SMS_AZUREAD_DISCOVERY_AGENT",
    "SMS_COLLECTION_EVALUATOR",
)
# Share of users per fate. "ok" users go all the way; the others stop at a stage until fixed.
FATES = (
    ("ok", 0.845),
    ("not_synced", 0.02),  # OU outside Entra Connect's sync scope: stays at ad_created
    ("not_discovered", 0.02),  # OU not in AD user discovery: stays at entra_synced
    ("not_in_collection", 0.06),  # the step admins forget: stays at cm_discovered
    ("upn_mismatch", 0.035),  # .local UPN, connector "UserNotFound": stays at in_intune_collection
    ("wrong_cloud_id", 0.02),  # CloudUserID of a deleted Entra user: stays at connector_synced
)
GIVEN = (
    "Anna",
    "Ben",
    "Chloé",
    "Dmitri",
    "Eva",
    "Farah",
    "Gustav",
    "Hana",
    "Ivan",
    "Jürgen",
    "Kai",
    "Lena",
    "Mohammed",
    "Nora",
    "Oskar",
    "Priya",
    "Quentin",
    "Rosa",
    "Søren",
    "Tomás",
    "Uma",
    "Viktor",
    "Wei",
    "Ximena",
    "Yusuf",
    "Zoë",
)
FAMILY = (
    "Andersson",
    "Brown",
    "Chen",
    "Dubois",
    "Ekström",
    "Fischer",
    "García",
    "Hansen",
    "Ivanova",
    "Jensen",
    "Kowalski",
    "Li",
    "Müller",
    "Nakamura",
    "O'Brien",
    "Patel",
    "Rossi",
    "Schmidt",
    "Tanaka",
    "Usman",
    "Virtanen",
    "Wang",
    "Yilmaz",
    "Zhang",
)


@dataclass
class SimUser:
    index: int
    guid: bytes
    sid: str
    sam: str
    upn: str
    created: float
    fate: str
    entra_at: float
    cm_at: float
    collection_at: float
    connector_at: float
    left_at: float  # disabled in AD (leaver)
    entra_id: str
    immutable_id_synced: bool  # a few accounts were matched by SID (hard match) and carry no immutable id
    cm_key: str  # which key ConfigMgr's record carries: "sid", "guid" or "name"
    licensed_intune: bool
    provisioning_error: str | None


class DemoEstate:
    """One simulated estate; every call to a read method shows the estate at the clock's time."""

    def __init__(
        self,
        name: str,
        domain: str,
        netbios: str,
        users: int,
        clock: Callable[[], float],
        seed: int,
        connector_status: int = 1,
        sync_lag: float = 0.0,
        flaky_configmgr: bool = False,
    ) -> None:
        self.name = name
        self.domain = domain
        self.netbios = netbios
        self.clock = clock
        self.connector_status = connector_status
        self.sync_lag = sync_lag  # seconds Entra Connect has been silent (a stale sync alert in the demo)
        self.rng = random.Random(seed)
        self.flaky_configmgr = flaky_configmgr  # every 6th site-database read times out
        self.configmgr_reads = 0
        self.graph = HttpStats()
        self.graph_lock = threading.Lock()
        self.domain_sid = (
            f"S-1-5-21-{self.rng.randrange(10**9)}-{self.rng.randrange(10**9)}-{self.rng.randrange(10**9)}"
        )
        self.start = clock()
        self.users: list[SimUser] = []
        self.cloud_only = max(5, users // 25)
        # History: `users` hires over sixty days, then one new hire every ~90 s of simulated time
        # for the next thirty days, so the demo keeps moving.
        for _ in range(users):
            self._hire(self.start - HISTORY * self.rng.random() ** 0.8)
        t = self.start
        while t < self.start + 30 * DAY:
            t += self.rng.expovariate(1 / 90.0)
            self._hire(t)
        self.users.sort(key=lambda u: u.created)

    # ------------------------------------------------------------------ simulation
    def _hire(self, created: float) -> None:
        rng = self.rng
        index = len(self.users)
        given, family = rng.choice(GIVEN), rng.choice(FAMILY)
        sam = f"{given[:1]}{family}".lower().replace("'", "")[:16] + str(index)
        sam = sam.encode("ascii", "ignore").decode() or f"user{index}"
        fate = rng.choices([f for f, _ in FATES], [w for _, w in FATES])[0]
        fixed_after = rng.uniform(1, 7) * DAY if rng.random() < 0.6 else NEVER
        entra_at = created + rng.uniform(2 * 60, 35 * 60)
        cm_at = max(entra_at, created + rng.uniform(5 * 60, 20 * 60)) + rng.uniform(0, 10 * 60)
        collection_at = cm_at + rng.choice((rng.uniform(5 * 60, 50 * 60), rng.uniform(1, 3) * HOUR))
        connector_at = collection_at + rng.uniform(3 * 60, 15 * 60)
        if fate == "not_synced":
            entra_at = cm_at = created + fixed_after + rng.uniform(60, 30 * 60)
            collection_at, connector_at = cm_at + HOUR, cm_at + 1.2 * HOUR
        elif fate == "not_discovered":
            cm_at = entra_at + fixed_after
            collection_at, connector_at = cm_at + HOUR, cm_at + 1.2 * HOUR
        elif fate == "not_in_collection":
            collection_at = cm_at + fixed_after
            connector_at = collection_at + rng.uniform(3 * 60, 15 * 60)
        elif fate == "upn_mismatch":
            connector_at = collection_at + fixed_after
        upn_domain = self.domain if fate != "upn_mismatch" else self.domain.split(".")[0] + ".local"
        self.users.append(
            SimUser(
                index=index,
                guid=uuid.UUID(int=rng.getrandbits(128)).bytes_le,
                sid=f"{self.domain_sid}-{1100 + index}",
                sam=sam,
                upn=f"{sam}@{upn_domain}",
                created=created,
                fate=fate,
                entra_at=entra_at,
                cm_at=cm_at,
                collection_at=collection_at,
                connector_at=connector_at,
                left_at=created + rng.uniform(20, 400) * DAY if rng.random() < 0.25 else NEVER,
                entra_id=str(uuid.UUID(int=rng.getrandbits(128))),
                immutable_id_synced=rng.random() > 0.03,
                cm_key=rng.choices(("sid", "guid", "name"), (0.9, 0.05, 0.05))[0],
                licensed_intune=rng.random() < 0.8,
                provisioning_error=rng.choice(("PropertyConflict", "UserPrincipalName"))
                if rng.random() < 0.01
                else None,
            )
        )

    def first_seen_history(self) -> FirstSeen:
        """First-seen times as an exporter that had watched this estate all along would have them.

        Stages 4 and 5 carry no timestamp of their own in any backend; without this, a fresh demo
        could not show anyone stuck there until the thresholds had passed in real time.
        """
        now = self.clock()
        guids: list[bytes] = []
        stages: list[int] = []
        since: list[float] = []
        for u in self._existing(now):
            if u.left_at <= now or u.cm_at > now or u.collection_at > now:
                continue
            if u.connector_at > now:
                stage, when = "in_intune_collection", u.collection_at
            else:
                stage = "connector_synced" if u.fate == "wrong_cloud_id" else "intune_enabled"
                when = u.connector_at
            guids.append(u.guid)
            stages.append(HYBRID_MDM.stages.index(stage))
            since.append(when)
        keys = guid_keys(np.frombuffer(b"".join(guids), dtype="V16")) if guids else np.zeros(0, np.uint64)
        return FirstSeen.from_rows(
            HYBRID_MDM.name, keys, np.asarray(stages, dtype=np.int8), np.asarray(since, dtype=np.float64)
        )

    def _existing(self, now: float) -> list[SimUser]:
        return [u for u in self.users if u.created <= now]

    # ------------------------------------------------------------------ backend views
    def read_ad(self) -> AdTable:
        now = self.clock()
        users = (
            AdUser(
                object_guid=u.guid,
                object_sid=u.sid,
                sam_account_name=u.sam,
                user_principal_name=u.upn,
                source_anchor=u.guid,
                when_created=u.created,
            )
            for u in self._existing(now)
            if u.left_at > now  # leavers are disabled: the default user_filter leaves them out
        )
        table = AdTable.from_records(users, self.netbios)
        table.meta["read"] = "full"
        return table.prepare()

    def _count_graph(self, endpoint: str, pages: int) -> None:
        # What the real client would have counted: paged reads, an occasional 429 with a short
        # Retry-After, and a token request every hour of simulated time.
        with self.graph_lock:
            stats = self.graph
            reads = sum(stats.requests.values())
            if reads % 11 == 5:
                stats.requests[(endpoint, "429")] = stats.requests.get((endpoint, "429"), 0) + 1
                stats.throttled += 1
                stats.retry_wait_seconds += 2.0
            stats.requests[(endpoint, "200")] = stats.requests.get((endpoint, "200"), 0) + pages
            hour = int(self.clock() // HOUR)
            if stats.token_requests == 0 or hour != getattr(self, "_token_hour", hour):
                stats.token_requests += 1
                stats.requests[("token", "200")] = stats.requests.get(("token", "200"), 0) + 1
            self._token_hour = hour

    def read_entra(self) -> EntraTable:
        now = self.clock()
        synced = []
        for u in self._existing(now):
            if u.entra_at > now:
                continue
            enabled = u.left_at > now
            licenses = [AssignedLicense(E3_SKU)]
            if u.licensed_intune and enabled:
                licenses.append(AssignedLicense(EMS_SKU))
            synced.append(
                EntraUser(
                    id=u.entra_id,
                    user_principal_name=u.upn if not u.upn.endswith(".local") else f"{u.sam}@{self.domain}",
                    on_premises_sync_enabled=True,
                    on_premises_immutable_id=immutable_id(u.guid) if u.immutable_id_synced else None,
                    on_premises_security_identifier=u.sid,
                    created=u.entra_at
                    if u.index % 40
                    else None,  # some pre-2018 users have no createdDateTime
                    account_enabled=enabled,
                    provisioning_error_categories=(u.provisioning_error,) if u.provisioning_error else (),
                    assigned_licenses=tuple(licenses) if enabled else (),
                )
            )
        cloud_only = [
            EntraUser(
                id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.name}/cloud-only/{i}")),
                user_principal_name=f"cloud.admin{i}@{self.domain.split('.')[0]}.onmicrosoft.com",
                on_premises_sync_enabled=False,
                on_premises_immutable_id=None,
                on_premises_security_identifier=None,
                created=self.start - HISTORY,
                account_enabled=True,
            )
            for i in range(self.cloud_only)
        ]
        records = len(synced) + len(cloud_only)
        self._count_graph("users", records // 999 + 1)
        table = EntraTable.from_records([*synced, *cloud_only])
        table.meta["read"] = "full"
        return table.prepare()

    def read_configmgr(self) -> CmTable:
        now = self.clock()
        self.configmgr_reads += 1
        if self.flaky_configmgr and self.configmgr_reads % 6 == 0:
            raise SourceError("timeout", f"demo: query on CM01.{self.domain.upper()}/CM_PS1 timed out")
        records = []
        for u in self._existing(now):
            if u.cm_at > now:
                continue
            in_collection = u.collection_at <= now
            cloud_id = None
            if in_collection and u.connector_at <= now:
                cloud_id = u.entra_id if u.fate != "wrong_cloud_id" else str(uuid.UUID(bytes=u.guid))
            records.append(
                CmUser(
                    resource_id=2063597568 + u.index,
                    unique_user_name=f"{self.netbios}\\{u.sam}",
                    user_principal_name=u.upn,
                    sid=u.sid if u.cm_key == "sid" else None,
                    object_guid=u.guid if u.cm_key in ("sid", "guid") else None,
                    creation_date=u.cm_at,
                    cloud_user_id=cloud_id,
                    collections=(COLLECTION_ID,) if in_collection and u.left_at > now else (),
                )
            )
        components = tuple(
            CmComponent(
                site_code="PS1",
                machine_name=f"CM01.{self.domain.upper()}",
                component_name=name,
                status=self.connector_status if name == "SMS_CLOUD_USERSYNC" else 0,
            )
            for name in CONNECTOR_COMPONENTS
        )
        table = CmTable.from_records(records, components, collection_ids=(COLLECTION_ID,))
        table.meta["read"] = "full"
        return table.prepare()

    def read_organization(self) -> OrganizationData:
        now = self.clock()
        for endpoint in ("organization", "subscribedSkus", "subscriptions"):
            self._count_graph(endpoint, 1)
        last_sync = (now - self.sync_lag) // 1800 * 1800 + 42  # Entra Connect's 30-minute cycle
        active = [u for u in self._existing(now) if u.left_at > now and u.entra_at <= now]
        ems_users = sum(1 for u in active if u.licensed_intune)
        size = len(active)
        skus = (
            SubscribedSku(E3_SKU, "ENTERPRISEPACK", size, round(size * 1.08) + 20, 0, 0, 0),
            SubscribedSku(
                EMS_SKU,
                "EMS",
                ems_users,
                round(ems_users * 1.03) + 5,
                50,
                0,
                0,
                (INTUNE_PLAN,),
            ),
            SubscribedSku(INTUNE_SKU, "INTUNE_A", 12, 25, 0, 10, 0, (INTUNE_PLAN,)),
            # More assigned than purchased: reported as is, never clamped.
            SubscribedSku("06ebc4ee-1bb5-47dd-8120-11324bc54e06", "SPE_E5", 53, 50, 10, 0, 0),
            SubscribedSku(
                "3f4babde-90ec-47c6-995d-d223749065d1",
                "CONTOSO_LEGACY_ADDON",
                3,
                10,
                0,
                0,
                0,
            ),
        )
        subscriptions = (
            Subscription(
                "sub-e3",
                E3_SKU,
                "ENTERPRISEPACK",
                "Enabled",
                False,
                skus[0].prepaid_enabled,
                now + 165 * DAY,
            ),
            Subscription(
                "sub-ems",
                EMS_SKU,
                "EMS",
                "Enabled",
                False,
                skus[1].prepaid_enabled,
                now + 65 * DAY,
            ),
            Subscription(
                "sub-intune-trial",
                INTUNE_SKU,
                "INTUNE_A",
                "Enabled",
                True,
                25,
                now + 10 * DAY,
            ),
            Subscription(
                "sub-e5",
                "06ebc4ee-1bb5-47dd-8120-11324bc54e06",
                "SPE_E5",
                "Warning",
                False,
                50,
                now + 25 * DAY,
            ),
            Subscription(
                "sub-legacy",
                "3f4babde-90ec-47c6-995d-d223749065d1",
                "CONTOSO_LEGACY_ADDON",
                "Enabled",
                False,
                10,
                None,
            ),
        )
        return OrganizationData(True, last_sync, skus, subscriptions)


class DemoSource:
    """A Source whose backend is a DemoEstate; goes through the same engine path as real sources."""

    def __init__(self, estate: DemoEstate, kind: SourceKind) -> None:
        self.estate = estate
        self.kind: SourceKind = kind

    def describe(self) -> str:
        return f"demo {self.kind} of {self.estate.domain}"

    def refresh(self, previous: SourceData | None, deadline: float | None = None) -> SourceData:
        readers: dict[str, Callable[[], SourceData]] = {
            "ad": self.estate.read_ad,
            "entra": self.estate.read_entra,
            "entra_organization": self.estate.read_organization,
            "configmgr": self.estate.read_configmgr,
        }
        return readers[self.kind]()

    def close(self) -> None:
        return None


class DemoGraphSource(DemoSource):
    """The demo's Entra sources also report Graph request statistics, like the real client."""

    def http_stats(self) -> HttpStats:
        with self.estate.graph_lock:
            return self.estate.graph.copy()


def scaled_clock(time_scale: float) -> Callable[[], float]:
    """Wall-clock time, optionally running faster from now on so a short demo shows movement."""
    start_wall = time.time()
    start_mono = time.monotonic()
    return lambda: start_wall + (time.monotonic() - start_mono) * time_scale


def demo_setup(
    time_scale: float = 1.0, refresh_interval: float = 15.0
) -> tuple[Config, dict[str, list[Source]], Callable[[], float], dict[str, FirstSeen]]:
    clock = scaled_clock(time_scale)
    estates = [
        DemoEstate("contoso", "contoso.com", "CONTOSO", 3000, clock, seed=1),
        DemoEstate(
            "fabrikam", "fabrikam.com", "FABRIKAM", 900, clock, seed=2, connector_status=2, sync_lag=5 * HOUR
        ),
    ]
    config = Config(
        estates=tuple(
            EstateConfig(name=e.name, stuck_after=dict(HYBRID_MDM.default_stuck_after)) for e in estates
        ),
        refresh_interval=refresh_interval,
        stuck_users_listed=25,
        user_label="upn",
    )
    sources: dict[str, list[Source]] = {
        e.name: [
            DemoSource(e, "ad"),
            DemoGraphSource(e, "entra"),
            DemoGraphSource(e, "entra_organization"),
            DemoSource(e, "configmgr"),
        ]
        for e in estates
    }
    history = {e.name: e.first_seen_history() for e in estates}
    return config, sources, clock, history
