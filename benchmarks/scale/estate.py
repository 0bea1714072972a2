"""The seeded estate: every user's fate in AD, Entra ID and ConfigMgr, and the counts that follow.

One pass over N users draws each user's *fate* (its stage and the reason it is stuck there, see
CONTRACT.md) from a seeded RNG and writes what the three systems hold for it:

- ``ad.ldif``: the AD-shaped directory for ``slapadd`` (users, a few computers, OUs, the service
  account), with deterministic objectGUID/objectSid and a ``uSNChanged`` on every entry;
- ``graph_users.jsonl`` and ``graph_tenant.json``: the Entra users (synced, cloud-only, conflicting)
  and the organization/licensing objects, for the Graph simulator;
- ``cm_*.csv``: ConfigMgr's User_DISC rows, collections, memberships and component status, for
  PostgreSQL's ``COPY``;
- ``truth.json``: the counts the exporter must report, worked out from the fates (never by running
  the exporter's stage model), and ``churn.json``: a 1% change set with the counts after it.

Time: every timestamp is ``anchor - age``. Ages are either *old* (a day or more) or *fresh* (a few
minutes), never in between, and the driver sets ``stuck_after`` of the stages with evidence
(ad_created, entra_synced, cm_discovered) to ``(start - anchor) + 12h``: old users are stuck and
fresh ones are not, whenever the files were generated. The collection and connector stages have no
evidence (first-seen time): their ``stuck_after`` is 0s, so those users count as stuck from the
second evaluation on ("settling" until then).
"""

from __future__ import annotations

import base64
import csv
import json
import random
import struct
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tests.entra.tenant_data import E3_SKU, EMS_SKU, INTUNE_A_PLAN, INTUNE_A_SKU, sku, subscription

SCHEMA_VERSION = 4  # bump when generated files change shape: cached files are then rebuilt

DOMAIN_DN = "DC=contoso,DC=com"
NETBIOS = "CONTOSO"
UPN_SUFFIX = "contoso.com"
STAFF_OU = f"OU=Staff,{DOMAIN_DN}"
WORKSTATIONS_OU = f"OU=Workstations,{STAFF_OU}"
CONTRACTORS_OU = f"OU=Contractors,{DOMAIN_DN}"
SERVICE_OU = f"OU=Service Accounts,{DOMAIN_DN}"
SERVICE_DN = f"CN=svc-intune,{SERVICE_OU}"
SCHEMA_NC = f"CN=Schema,CN=Configuration,{DOMAIN_DN}"
PERSON_CATEGORY = f"CN=Person,{SCHEMA_NC}"
COMPUTER_CATEGORY = f"CN=Computer,{SCHEMA_NC}"
# AD's default filter with objectCategory in the DN form, which OpenLDAP and AD both understand.
USER_FILTER = (
    f"(&(objectCategory={PERSON_CATEGORY})(objectClass=user)"
    "(!(userAccountControl:1.2.840.113556.1.4.803:=2)))"
)
DEPARTMENTS = 20
DOMAIN_SID = (21, 1004336348, 1177238915, 682003330)
OLD_DOMAIN_SID = (21, 3520112233, 2211009988, 1122334455)  # the domain of stale records
FABRIKAM_SID = (21, 1111111111, 2222222222, 3333333333)  # ConfigMgr-only records

INTUNE_COLLECTION = "PS100012"
PILOT_COLLECTION = "PS100013"
STAFF_COLLECTION = "PS100020"
DEVICE_COLLECTION = "PS100030"
INTUNE_COLLECTIONS = (INTUNE_COLLECTION, PILOT_COLLECTION)
SITE_CODE = "PS1"
SITE_SERVER = "CM01.contoso.com"
SINCE_MIDNIGHT = "0001128000100008"
SINCE_INSTALL = "000A470000100008"
FIRST_RESOURCE_ID = 16_777_216
CLOUD_USERSYNC = "SMS_CLOUD_USERSYNC"
AD_DISCOVERY = "SMS_AD_USER_DISCOVERY_AGENT"

TENANT_ID = "3f6a2c71-8d4e-4b9a-a1c5-7e2f0d9b6c48"
CLIENT_ID = "8b1d4e6f-2a3c-4d5e-9f7a-1b2c3d4e5f60"
CLIENT_SECRET = "Scale~bench.secret_0123456789-abcdef"

DAY = 86400.0
LAST_SYNC_AGE = 2 * DAY  # Entra Connect last ran two days before the anchor (and is stale)
STUCK_MARGIN = 12 * 3600.0  # stuck_after of evidence stages = (start - anchor) + this

STAGES = (
    "ad_created",
    "entra_synced",
    "cm_discovered",
    "in_intune_collection",
    "connector_synced",
    "intune_enabled",
)
REASONS: dict[str, tuple[str, ...]] = {
    "ad_created": ("entra_cloud_user_conflict", "entra_sync_pending", "entra_not_synced"),
    "entra_synced": ("configmgr_stale_record", "configmgr_discovery_unhealthy", "configmgr_not_discovered"),
    "cm_discovered": ("intune_collection_removed", "not_in_intune_collection"),
    "in_intune_collection": (
        "upn_mismatch",
        "entra_account_disabled",
        "connector_unhealthy",
        "connector_sync_pending",
    ),
    "connector_synced": ("cloud_user_id_other_user", "cloud_user_id_unknown"),
}
STUCK, FRESH, SETTLING = "stuck", "fresh", "settling"

_FIRST = ("Anna", "Ben", "Chloé", "David", "Emma", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal")
_LAST = ("Adams", "Becker", "Costa", "Dubois", "Eriksen", "Fischer", "García", "Huber", "Ivanov", "Jones")


# ------------------------------------------------------------------------------------ fates
@dataclass(frozen=True)
class Fate:
    """What happens to one AD account across the three systems."""

    name: str
    stage: str | None  # None: not an in-scope user (disabled, outside the search base, a computer)
    reason: str | None
    per_mille: float  # share of N; "enabled" takes what the others leave


FATES: tuple[Fate, ...] = (
    Fate("enabled", "intune_enabled", None, 0.0),
    Fate("not_synced", "ad_created", "entra_not_synced", 16),
    Fate("sync_pending", "ad_created", "entra_sync_pending", 8),
    Fate("conflict_upn", "ad_created", "entra_cloud_user_conflict", 5),
    Fate("conflict_anchor", "ad_created", "entra_cloud_user_conflict", 3),
    Fate("conflict_sid", "ad_created", "entra_cloud_user_conflict", 2),
    Fate("stale_record", "entra_synced", "configmgr_stale_record", 8),
    Fate("not_discovered", "entra_synced", "configmgr_not_discovered", 22),
    Fate("collection_removed", "cm_discovered", "intune_collection_removed", 10),
    Fate("not_in_collection", "cm_discovered", "not_in_intune_collection", 30),
    Fate("upn_mismatch", "in_intune_collection", "upn_mismatch", 15),
    Fate("entra_disabled", "in_intune_collection", "entra_account_disabled", 8),
    Fate("connector_pending", "in_intune_collection", "connector_sync_pending", 22),
    Fate("other_user", "connector_synced", "cloud_user_id_other_user", 6),
    Fate("unknown_id", "connector_synced", "cloud_user_id_unknown", 9),
    Fate("disabled", None, None, 15),  # userAccountControl 514: filtered out; leaves orphans behind
    Fate("outside", None, None, 5),  # enabled, but outside search_bases; leaves orphans behind
    Fate("computer", None, None, 10),  # a computer account under the search base (AD only)
)
FATE_BY_NAME = {fate.name: fate for fate in FATES}
ENABLED_PER_MILLE = 1000.0 - sum(f.per_mille for f in FATES)
CLOUD_ONLY_PER_MILLE = 25.0  # cloud-only Entra users that conflict with nobody
CM_ONLY_PER_MILLE = 5.0  # ConfigMgr records of another domain (orphans)

# The 1% change set, per mille of N, and the fate each kind of change is drawn from.
CHURN_PER_MILLE: dict[str, tuple[str, float]] = {
    "ad_touch": ("enabled", 6.0),  # description changed: uSNChanged moves, nothing else
    "ad_disable": ("enabled", 1.0),  # account disabled: leaves scope, its records become orphans
    "entra_touch": ("enabled", 8.0),  # onPremisesLastSyncDateTime moves (every Entra Connect export)
    "cm_touch": ("enabled", 8.5),  # Full_User_Name0 changed
    "ad_upn": ("connector_pending", 1.0),  # UPN moved to .local: the connector cannot find the user
    "entra_disable": ("connector_pending", 0.5),  # blocked from sign-in in Entra
    "cm_enable": ("connector_pending", 1.0),  # the connector wrote the CloudUserID: now enabled
    "entra_sync": ("not_synced", 1.0),  # Entra Connect finally synced the user (no ConfigMgr record)
    "cm_new": ("not_discovered", 0.5),  # discovery found the user
    "entra_delete": ("cloud_only", 0.5),  # a cloud-only user deleted
}
AD_NEW_PER_MILLE = 1.0  # new accounts created in AD (not synced yet)


def fate_share(name: str) -> float:
    """Per mille of N for a fate (or for the cloud-only pool)."""
    if name == "enabled":
        return ENABLED_PER_MILLE
    if name == "cloud_only":
        return CLOUD_ONLY_PER_MILLE
    if name == "not_synced":  # only those without a ConfigMgr record are eligible
        return FATE_BY_NAME[name].per_mille / 2
    return FATE_BY_NAME[name].per_mille


@dataclass(frozen=True)
class EstateParams:
    users: int
    seed: int = 1
    connector_critical: bool = False  # SMS_CLOUD_USERSYNC critical: connector_unhealthy reasons
    discovery_critical: bool = False  # SMS_AD_USER_DISCOVERY_AGENT critical

    def reason_for(self, fate: Fate) -> str | None:
        if fate.reason == "connector_sync_pending" and self.connector_critical:
            return "connector_unhealthy"
        if fate.reason == "configmgr_not_discovered" and self.discovery_critical:
            return "configmgr_discovery_unhealthy"
        return fate.reason


# ------------------------------------------------------------------------------------ truth
@dataclass
class Truth:
    """What the exporter must report for the estate (CONTRACT.md metric names in comments)."""

    users: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    # "stage/reason" -> {"users", "stuck", "settling"}; settling users count as stuck once the
    # exporter evaluated the estate again after first seeing them at their stage.
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)
    missing_cloud_user_id: dict[str, int] = field(default_factory=lambda: {"true": 0, "false": 0})
    cloud_user_id_mismatch: int = 0
    orphans: dict[str, int] = field(default_factory=lambda: {"entra": 0, "configmgr": 0})
    records: dict[str, int] = field(default_factory=lambda: {"ad": 0, "entra": 0, "configmgr": 0})
    provisioning_errors: dict[str, int] = field(default_factory=dict)
    enabled_without_intune_license: int = 0

    def __post_init__(self) -> None:
        for stage, names in REASONS.items():
            for reason in names:
                self.reasons.setdefault(f"{stage}/{reason}", {"users": 0, "stuck": 0, "settling": 0})

    def place(self, stage: str, reason: str | None, stuck_class: str, sign: int = 1) -> None:
        self.users[stage] += sign
        if reason is None:
            return
        entry = self.reasons[f"{stage}/{reason}"]
        entry["users"] += sign
        if stuck_class == STUCK:
            entry["stuck"] += sign
        elif stuck_class == SETTLING:
            entry["settling"] += sign

    def stuck(self, stage: str, settled: bool) -> tuple[int, int]:
        """(least, most) stuck users at a stage: equal once settled."""
        least = sum(v["stuck"] for k, v in self.reasons.items() if k.startswith(stage + "/"))
        settling = sum(v["settling"] for k, v in self.reasons.items() if k.startswith(stage + "/"))
        return (least + settling, least + settling) if settled else (least, least + settling)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Truth:
        return cls(**raw)

    def copy(self) -> Truth:
        return Truth.from_json(json.loads(json.dumps(self.to_json())))


# ------------------------------------------------------------------------------ identifiers
def sid_bytes(sub_authorities: tuple[int, ...]) -> bytes:
    """Binary SID (revision 1, NT authority 5) as AD stores objectSid."""
    head = struct.pack("<BB", 1, len(sub_authorities)) + (5).to_bytes(6, "big")
    return head + struct.pack(f"<{len(sub_authorities)}I", *sub_authorities)


def sid_string(sub_authorities: tuple[int, ...]) -> str:
    return "S-1-5-" + "-".join(str(part) for part in sub_authorities)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def ldap_time(seconds: float) -> str:
    return time.strftime("%Y%m%d%H%M%S.0Z", time.gmtime(seconds))


def graph_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def sql_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


@dataclass(slots=True)
class Person:
    """One AD account and the identifiers the other systems use for it."""

    index: int
    given: str
    surname: str
    sam: str
    upn: str
    dn: str
    guid: bytes
    rid: int
    created: float
    uac: int
    entra_id: str

    @property
    def sid(self) -> tuple[int, ...]:
        return (*DOMAIN_SID, self.rid)

    @property
    def full_name(self) -> str:
        return f"{self.given} {self.surname}"


# ----------------------------------------------------------------------------------- writer
class EstateFiles:
    """The generated files of one estate and the running counters (USN, ResourceID)."""

    LDIF = "ad.ldif"
    GRAPH_USERS = "graph_users.jsonl"
    GRAPH_TENANT = "graph_tenant.json"
    CM_USERS = "cm_users.csv"
    CM_MEMBERS = "cm_members.csv"
    CM_COLLECTIONS = "cm_collections.csv"
    CM_COMPONENTS = "cm_components.csv"
    TRUTH = "truth.json"
    CHURN = "churn.json"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._handles: list[TextIO] = []
        self.ldif = self._open(self.LDIF)
        self.graph = self._open(self.GRAPH_USERS)
        self.cm_users = csv.writer(self._open(self.CM_USERS))
        self.cm_members = csv.writer(self._open(self.CM_MEMBERS))
        self.usn = 0
        self.resource_id = FIRST_RESOURCE_ID

    def _open(self, name: str) -> TextIO:
        handle = (self.directory / name).open("w", encoding="utf-8", newline="")
        self._handles.append(handle)
        return handle

    def next_usn(self) -> int:
        self.usn += 1
        return self.usn

    def next_resource_id(self) -> int:
        self.resource_id += 1
        return self.resource_id

    def close(self) -> None:
        for handle in self._handles:
            handle.close()


# -------------------------------------------------------------------------------- generator
@dataclass
class _Pools:
    """Churn victims picked during generation (details the change set needs)."""

    churn: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, kind: str, victim: dict[str, Any]) -> None:
        self.churn.setdefault(kind, []).append(victim)


class Generator:
    def __init__(self, params: EstateParams, files: EstateFiles, anchor: float) -> None:
        self.params = params
        self.files = files
        self.anchor = anchor
        self.last_sync = anchor - LAST_SYNC_AGE
        self.rng = random.Random(params.seed)
        self.churn_rng = random.Random(params.seed * 7919 + 1)
        self.truth = Truth()
        self.pools = _Pools()
        self.cloud_only = 0
        self.cm_only = 0
        self._fate_table = self._cumulative_fates()
        self._churn_table = self._cumulative_churn()

    # -- draws
    def _cumulative_fates(self) -> list[tuple[float, Fate]]:
        table, total = [], 0.0
        for fate in FATES:
            total += (fate.per_mille or ENABLED_PER_MILLE) / 1000
            table.append((total, fate))
        return table

    def _cumulative_churn(self) -> dict[str, list[tuple[float, str]]]:
        table: dict[str, list[tuple[float, str]]] = {}
        for kind, (pool, per_mille) in CHURN_PER_MILLE.items():
            entries = table.setdefault(pool, [])
            previous = entries[-1][0] if entries else 0.0
            entries.append((previous + per_mille / fate_share(pool), kind))
        return table

    def draw_fate(self) -> Fate:
        r = self.rng.random()
        for bound, fate in self._fate_table:
            if r < bound:
                return fate
        return FATES[0]

    def draw_churn(self, pool: str) -> str | None:
        entries = self._churn_table.get(pool)
        if not entries:
            return None
        r = self.churn_rng.random()
        for bound, kind in entries:
            if r < bound:
                return kind
        return None

    def old_age(self, low: float = 3 * DAY, high: float = 3 * 365 * DAY) -> float:
        return self.rng.uniform(low, high)

    def fresh_age(self) -> float:
        return self.rng.uniform(60.0, 300.0)

    def new_guid(self) -> bytes:
        return self.rng.getrandbits(128).to_bytes(16, "little")

    def new_entra_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    # -- people
    def person(self, index: int, fate: Fate, created: float) -> Person:
        given, surname = _FIRST[index % len(_FIRST)], _LAST[(index // len(_FIRST)) % len(_LAST)]
        sam = f"{given[0]}{surname[:6]}{index:07d}".lower().replace("é", "e").replace("í", "i")
        cn = f"{given} {surname} {index:07d}"
        if fate.name == "outside":
            ou = CONTRACTORS_OU
        elif fate.name == "computer":
            sam, cn, ou = f"WS{index:07d}$", f"WS{index:07d}", WORKSTATIONS_OU
        else:
            ou = f"OU=Dept{index % DEPARTMENTS:02d},{STAFF_OU}"
        uac = 512 if self.rng.random() < 0.8 else 66048  # 66048: password never expires
        if fate.name == "disabled":
            uac |= 2
        elif fate.name == "computer":
            uac = 4096
        return Person(
            index=index,
            given=given,
            surname=surname,
            sam=sam,
            upn=f"{sam}@{UPN_SUFFIX}",
            dn=f"CN={cn},{ou}",
            guid=self.new_guid(),
            rid=1100 + index,
            created=created,
            uac=uac,
            entra_id=self.new_entra_id(),
        )

    def ad_created(self, fate: Fate) -> tuple[float, str]:
        """whenCreated and the stuck class it gives a user at ad_created."""
        if fate.name == "not_synced":  # created before Entra Connect's last run
            return self.anchor - self.old_age(LAST_SYNC_AGE + DAY), STUCK
        if fate.name == "sync_pending":  # created after it
            if self.rng.random() < 0.5:
                return self.anchor - self.rng.uniform(DAY, LAST_SYNC_AGE - 3600), STUCK
            return self.anchor - self.fresh_age(), FRESH
        if fate.stage == "ad_created" and self.rng.random() < 0.3:
            return self.anchor - self.fresh_age(), FRESH
        return self.anchor - self.old_age(LAST_SYNC_AGE + DAY), STUCK

    def evidence_time(self, null_share: float) -> tuple[float | None, str]:
        """An Entra createdDateTime or ConfigMgr Creation_Date0 and its stuck class."""
        r = self.rng.random()
        if r < null_share:
            return None, FRESH  # no evidence: first-seen time, far below stuck_after
        if r < null_share + 0.2:
            return self.anchor - self.fresh_age(), FRESH
        return self.anchor - self.old_age(DAY), STUCK

    # -- the pass
    def run(self) -> None:
        self.write_directory_skeleton()
        for index in range(self.params.users):
            self.user(index)
            self.maybe_extras(index)
        self.plan_new_accounts()
        self.write_configmgr_tables()
        self.write_tenant()

    def maybe_extras(self, index: int) -> None:
        if self.rng.random() < CLOUD_ONLY_PER_MILLE / 1000:
            self.cloud_only_user(index)
        if self.rng.random() < CM_ONLY_PER_MILLE / 1000:
            self.cm_only_record(index)

    def user(self, index: int) -> None:
        fate = self.draw_fate()
        created, ad_class = self.ad_created(fate)
        person = self.person(index, fate, created)
        self.write_ad_user(person, fate)
        if fate.stage is not None:
            self.truth.records["ad"] += 1
        place = getattr(self, f"fate_{fate.name}")
        place(person, fate, ad_class)

    # -- one method per fate: what Entra and ConfigMgr hold, and where the user ends up
    def fate_enabled(self, p: Person, fate: Fate, ad_class: str) -> None:
        licensed = self.synced_entra_user(p)
        rid, _ = self.cm_record(p, in_collection=True, cloud_id=p.entra_id)
        self.truth.place("intune_enabled", None, "")
        if not licensed:
            self.truth.enabled_without_intune_license += 1
        kind = self.draw_churn("enabled")
        if kind is not None:
            self.pools.add(kind, {**self.victim(p), "resource_id": rid, "licensed": licensed})

    def fate_not_synced(self, p: Person, fate: Fate, ad_class: str) -> None:
        has_record = self.rng.random() < 0.5  # ConfigMgr discovers from AD, whatever Entra has
        if has_record:
            self.cm_record(p, in_collection=False, cloud_id=None)
        self.truth.place(fate.stage or "", fate.reason, ad_class)
        if not has_record and self.draw_churn("not_synced"):
            self.pools.add("entra_sync", {**self.victim(p), "stuck_class": ad_class})

    def fate_sync_pending(self, p: Person, fate: Fate, ad_class: str) -> None:
        self.truth.place(fate.stage or "", fate.reason, ad_class)

    def fate_conflict_upn(self, p: Person, fate: Fate, ad_class: str) -> None:
        # A cloud account made by hand for the same person before the sync reached it.
        self.conflicting_cloud_user(p, upn=p.upn.upper() if p.index % 2 else p.upn)
        self.truth.place(fate.stage or "", fate.reason, ad_class)

    def fate_conflict_anchor(self, p: Person, fate: Fate, ad_class: str) -> None:
        self.conflicting_cloud_user(p, immutable_id=b64(p.guid))
        self.truth.place(fate.stage or "", fate.reason, ad_class)

    def fate_conflict_sid(self, p: Person, fate: Fate, ad_class: str) -> None:
        self.conflicting_cloud_user(p, sid=sid_string(p.sid))
        self.truth.place(fate.stage or "", fate.reason, ad_class)

    def fate_stale_record(self, p: Person, fate: Fate, ad_class: str) -> None:
        created, stuck_class = self.evidence_time(null_share=0.15)
        self.synced_entra_user(p, evidence=(created,))
        self.stale_cm_record(p)
        self.truth.place(fate.stage or "", fate.reason, stuck_class)

    def fate_not_discovered(self, p: Person, fate: Fate, ad_class: str) -> None:
        created, stuck_class = self.evidence_time(null_share=0.15)
        self.synced_entra_user(p, evidence=(created,))
        reason = self.params.reason_for(fate)
        self.truth.place(fate.stage or "", reason, stuck_class)
        if self.draw_churn("not_discovered"):
            self.pools.add("cm_new", {**self.victim(p), "stuck_class": stuck_class, "reason": reason})

    def fate_collection_removed(self, p: Person, fate: Fate, ad_class: str) -> None:
        self.synced_entra_user(p)
        _, stuck_class = self.cm_record(p, in_collection=False, cloud_id=p.entra_id)
        self.truth.place(fate.stage or "", fate.reason, stuck_class)

    def fate_not_in_collection(self, p: Person, fate: Fate, ad_class: str) -> None:
        self.synced_entra_user(p)
        _, stuck_class = self.cm_record(p, in_collection=False, cloud_id=None)
        self.truth.place(fate.stage or "", fate.reason, stuck_class)

    def fate_upn_mismatch(self, p: Person, fate: Fate, ad_class: str) -> None:
        # Entra Connect could not use the AD suffix, so the cloud UPN is the tenant's default domain.
        self.synced_entra_user(p, upn=f"{p.sam}@contoso.onmicrosoft.com")
        self.cm_record(p, in_collection=True, cloud_id=None)
        self.truth.place(fate.stage or "", fate.reason, SETTLING)

    def fate_entra_disabled(self, p: Person, fate: Fate, ad_class: str) -> None:
        self.synced_entra_user(p, enabled=False)
        self.cm_record(p, in_collection=True, cloud_id=None)
        self.truth.place(fate.stage or "", fate.reason, SETTLING)

    def fate_connector_pending(self, p: Person, fate: Fate, ad_class: str) -> None:
        licensed = self.synced_entra_user(p)
        rid, _ = self.cm_record(p, in_collection=True, cloud_id=None)
        reason = self.params.reason_for(fate)
        self.truth.place(fate.stage or "", reason, SETTLING)
        kind = self.draw_churn("connector_pending")
        if kind is not None:
            victim = {**self.victim(p), "resource_id": rid, "licensed": licensed, "reason": reason}
            self.pools.add(kind, victim)

    def fate_other_user(self, p: Person, fate: Fate, ad_class: str) -> None:
        self.synced_entra_user(p)
        # The account was deleted and recreated in the cloud: the record points at the old one.
        previous = self.plain_cloud_user(f"{p.sam}.previous@contoso.onmicrosoft.com")
        self.cm_record(p, in_collection=True, cloud_id=previous)
        self.truth.place(fate.stage or "", fate.reason, SETTLING)
        self.truth.cloud_user_id_mismatch += 1

    def fate_unknown_id(self, p: Person, fate: Fate, ad_class: str) -> None:
        self.synced_entra_user(p)
        self.cm_record(p, in_collection=True, cloud_id=self.new_entra_id())
        self.truth.place(fate.stage or "", fate.reason, SETTLING)
        self.truth.cloud_user_id_mismatch += 1

    def fate_disabled(self, p: Person, fate: Fate, ad_class: str) -> None:
        # A leaver: still synced (disabled) in Entra, still enabled in ConfigMgr. Both are orphans.
        self.synced_entra_user(p, enabled=False)
        self.cm_record(p, in_collection=True, cloud_id=p.entra_id)
        self.truth.orphans["entra"] += 1
        self.truth.orphans["configmgr"] += 1

    def fate_outside(self, p: Person, fate: Fate, ad_class: str) -> None:
        self.synced_entra_user(p)
        self.truth.orphans["entra"] += 1
        if self.rng.random() < 0.5:
            self.cm_record(p, in_collection=False, cloud_id=None)
            self.truth.orphans["configmgr"] += 1

    def fate_computer(self, p: Person, fate: Fate, ad_class: str) -> None:
        pass  # only the AD entry: the filter's objectCategory keeps it out

    def victim(self, p: Person) -> dict[str, Any]:
        """What applying a change to this user needs to know about it."""
        return {
            "index": p.index,
            "dn": p.dn,
            "sam": p.sam,
            "upn": p.upn,
            "full_name": p.full_name,
            "guid": b64(p.guid),
            "sid": sid_string(p.sid),
            "entra_id": p.entra_id,
        }

    # -- Active Directory
    def write_directory_skeleton(self) -> None:
        entries: list[tuple[str, list[str]]] = [
            (DOMAIN_DN, ["objectClass: domain", "objectClass: adTopAux", "dc: contoso"]),
        ]
        for ou in (STAFF_OU, CONTRACTORS_OU, SERVICE_OU, WORKSTATIONS_OU):
            name = ou.split(",", 1)[0][3:]
            entries.append((ou, ["objectClass: organizationalUnit", "objectClass: adTopAux", f"ou: {name}"]))
        for department in range(DEPARTMENTS):
            ou = f"OU=Dept{department:02d},{STAFF_OU}"
            classes = ["objectClass: organizationalUnit", "objectClass: adTopAux"]
            entries.append((ou, [*classes, f"ou: Dept{department:02d}"]))
        for dn, lines in entries:
            usn = self.files.next_usn()
            body = "\n".join(lines)
            created = ldap_time(self.anchor - 5 * 365 * DAY)
            self.files.ldif.write(
                f"dn: {dn}\n{body}\nobjectGUID:: {b64(self.new_guid())}\n"
                f"uSNCreated: {usn}\nuSNChanged: {usn}\nwhenCreated: {created}\n\n"
            )

    def write_ad_user(self, p: Person, fate: Fate) -> None:
        usn = self.files.next_usn()
        computer = fate.name == "computer"
        classes = "".join(f"objectClass: {c}\n" for c in ("top", "person", "organizationalPerson", "user"))
        if computer:
            classes += "objectClass: computer\n"
        category = COMPUTER_CATEGORY if computer else PERSON_CATEGORY
        cn = p.dn.split(",", 1)[0][3:]
        consistency = "" if self.rng.random() < 0.2 else f"mS-DS-ConsistencyGuid:: {b64(p.guid)}\n"
        upn = "" if computer else f"userPrincipalName: {p.upn}\ngivenName: {p.given}\n"
        self.files.ldif.write(
            f"dn: {p.dn}\n{classes}cn: {cn}\nsn: {p.surname}\n{upn}"
            f"sAMAccountName: {p.sam}\nobjectCategory: {category}\n"
            f"objectGUID:: {b64(p.guid)}\nobjectSid:: {b64(sid_bytes(p.sid))}\n{consistency}"
            f"userAccountControl: {p.uac}\nwhenCreated: {ldap_time(p.created)}\n"
            f"whenChanged: {ldap_time(p.created)}\nuSNCreated: {usn}\nuSNChanged: {usn}\n\n"
        )

    def plan_new_accounts(self) -> None:
        """AD accounts the churn creates (written to churn.json, not to the directory yet)."""
        count = round(self.params.users * AD_NEW_PER_MILLE / 1000)
        for offset in range(count):
            index = self.params.users + offset
            fate = FATE_BY_NAME["sync_pending"]
            p = self.person(index, fate, self.anchor)
            p.uac = 512
            self.pools.add(
                "ad_new",
                {
                    "dn": p.dn,
                    "sam": p.sam,
                    "upn": p.upn,
                    "given": p.given,
                    "surname": p.surname,
                    "guid": b64(p.guid),
                    "sid": b64(sid_bytes(p.sid)),
                    "uac": p.uac,
                },
            )

    # -- Entra ID
    def licenses(self) -> tuple[list[dict[str, Any]], bool]:
        """assignedLicenses of a synced user and whether they grant Intune (INTUNE_A enabled)."""
        r = self.rng.random()
        if r < 0.85:
            return [{"disabledPlans": [], "skuId": INTUNE_A_SKU}], True
        if r < 0.93:
            return [{"disabledPlans": [], "skuId": EMS_SKU}], True
        if r < 0.95:
            return [{"disabledPlans": [INTUNE_A_PLAN], "skuId": EMS_SKU}], False
        return [{"disabledPlans": [], "skuId": E3_SKU}], False

    def synced_entra_user(
        self,
        p: Person,
        *,
        upn: str | None = None,
        enabled: bool = True,
        evidence: tuple[float | None] | None = None,
    ) -> bool:
        """Write a synced Entra user; True when its licences grant Intune. ``evidence`` holds the
        createdDateTime of a user at entra_synced (the stage's evidence, maybe null); the others
        get a drawn one."""
        created = evidence[0] if evidence is not None else self.evidence_time(null_share=0.05)[0]
        licenses, licensed = self.licenses()
        errors = []
        if self.rng.random() < 0.003:
            category = "PropertyConflict" if self.rng.random() < 0.75 else "Other"
            errors.append(
                {
                    "category": category,
                    "occurredDateTime": graph_time(self.last_sync),
                    "propertyCausingError": "ProxyAddresses",
                    "value": p.upn,
                }
            )
            self.truth.provisioning_errors[category] = self.truth.provisioning_errors.get(category, 0) + 1
        entra_upn = upn or (p.upn.capitalize() if p.index % 10 == 3 else p.upn)
        immutable = None if self.rng.random() < 0.07 else b64(p.guid)  # some match by SID only
        self.write_graph_user(
            {
                "id": p.entra_id,
                "displayName": p.full_name,
                "userPrincipalName": entra_upn,
                "mail": p.upn,
                "accountEnabled": enabled,
                "createdDateTime": graph_time(created) if created is not None else None,
                "onPremisesSyncEnabled": True,
                "onPremisesImmutableId": immutable,
                "onPremisesSecurityIdentifier": sid_string(p.sid),
                "onPremisesSamAccountName": p.sam,
                "onPremisesDomainName": UPN_SUFFIX,
                "onPremisesLastSyncDateTime": graph_time(self.last_sync),
                "onPremisesProvisioningErrors": errors,
                "assignedLicenses": licenses,
            }
        )
        return licensed

    def conflicting_cloud_user(
        self, p: Person, *, upn: str | None = None, immutable_id: str | None = None, sid: str | None = None
    ) -> None:
        self.write_graph_user(
            {
                "id": self.new_entra_id(),
                "displayName": p.full_name,
                "userPrincipalName": upn or f"{p.sam}.cloud@contoso.onmicrosoft.com",
                "mail": None,
                "accountEnabled": True,
                "createdDateTime": graph_time(self.anchor - self.old_age(DAY)),
                "onPremisesSyncEnabled": None,
                "onPremisesImmutableId": immutable_id,
                "onPremisesSecurityIdentifier": sid,
                "onPremisesSamAccountName": None,
                "onPremisesLastSyncDateTime": None,
                "onPremisesProvisioningErrors": [],
                "assignedLicenses": [],
            }
        )

    def plain_cloud_user(self, upn: str) -> str:
        entra_id = self.new_entra_id()
        self.write_graph_user(
            {
                "id": entra_id,
                "displayName": upn.split("@", 1)[0],
                "userPrincipalName": upn,
                "mail": upn,
                "accountEnabled": True,
                "createdDateTime": graph_time(self.anchor - self.old_age(DAY)),
                "onPremisesSyncEnabled": None,
                "onPremisesImmutableId": None,
                "onPremisesSecurityIdentifier": None,
                "onPremisesSamAccountName": None,
                "onPremisesLastSyncDateTime": None,
                "onPremisesProvisioningErrors": [],
                "assignedLicenses": [{"disabledPlans": [], "skuId": E3_SKU}],
            }
        )
        return entra_id

    def cloud_only_user(self, index: int) -> None:
        self.cloud_only += 1
        entra_id = self.plain_cloud_user(f"ext{self.cloud_only:07d}@contoso.onmicrosoft.com")
        if self.draw_churn("cloud_only"):
            self.pools.add("entra_delete", {"entra_id": entra_id})

    def write_graph_user(self, user: dict[str, Any]) -> None:
        self.files.graph.write(json.dumps(user, separators=(",", ":")) + "\n")
        self.truth.records["entra"] += 1

    # -- ConfigMgr
    def cm_record(self, p: Person, *, in_collection: bool, cloud_id: str | None) -> tuple[int, str]:
        """Write the User_DISC row; returns its ResourceID and the stuck class its Creation_Date0
        gives a user at cm_discovered."""
        rid = self.files.next_resource_id()
        created, stuck_class = self.evidence_time(null_share=0.0)
        r = self.rng.random()
        sid: str | None = sid_string(p.sid)
        guid: bytes | None = p.guid
        unique = f"{NETBIOS}\\{p.sam}"
        if r >= 0.96:  # neither SID nor GUID: matched by DOMAIN\sam, in another case
            sid, guid, unique = None, None, unique.lower() if p.index % 2 else unique.upper()
        elif r >= 0.90:  # no SID: matched by Object_GUID0
            sid = None
        self.write_cm_row(rid, p, unique, sid, guid, created, self.cloud_id_text(cloud_id))
        self.memberships(rid, in_collection)
        self.count_missing(cloud_id, in_collection)
        return rid, stuck_class

    def stale_cm_record(self, p: Person) -> None:
        """The record of the account's previous incarnation: same UPN, no key in common."""
        rid = self.files.next_resource_id()
        old_sid = sid_string((*OLD_DOMAIN_SID, p.rid))
        cloud = self.new_entra_id() if self.rng.random() < 0.5 else None
        in_collection = self.rng.random() < 0.5
        created = self.anchor - self.old_age(DAY)
        self.write_cm_row(
            rid,
            p,
            f"OLDCORP\\{p.sam}",
            old_sid,
            self.new_guid(),
            created,
            self.cloud_id_text(cloud),
            upn=p.upn.upper(),
        )
        self.memberships(rid, in_collection)
        self.count_missing(cloud, in_collection)
        self.truth.orphans["configmgr"] += 1

    def cm_only_record(self, index: int) -> None:
        self.cm_only += 1
        rid = self.files.next_resource_id()
        sam = f"fab{self.cm_only:07d}"
        p = Person(
            index=index,
            given="Fabrikam",
            surname="User",
            sam=sam,
            upn=f"{sam}@fabrikam.com",
            dn=f"CN={sam},OU=Users,DC=fabrikam,DC=com",
            guid=self.new_guid(),
            rid=5000 + self.cm_only,
            created=self.anchor,
            uac=512,
            entra_id="",
        )
        cloud = self.new_entra_id() if self.rng.random() < 0.5 else None
        in_collection = self.rng.random() < 0.3
        self.write_cm_row(
            rid,
            p,
            f"FABRIKAM\\{sam}",
            sid_string((*FABRIKAM_SID, p.rid)),
            p.guid,
            self.anchor - self.old_age(DAY),
            self.cloud_id_text(cloud),
        )
        self.memberships(rid, in_collection)
        self.count_missing(cloud, in_collection)
        self.truth.orphans["configmgr"] += 1

    def cloud_id_text(self, cloud_id: str | None) -> str | None:
        if cloud_id is None:
            return None
        text = cloud_id.upper()  # ConfigMgr hands GUIDs out in upper case
        return "{" + text + "}" if self.rng.random() < 0.1 else text

    def write_cm_row(
        self,
        rid: int,
        p: Person,
        unique: str,
        sid: str | None,
        guid: bytes | None,
        created: float | None,
        cloud_id: str | None,
        upn: str | None = None,
    ) -> None:
        domain = unique.split("\\", 1)[0].upper()
        self.files.cm_users.writerow(
            (
                rid,
                f"{unique} ({p.full_name})",
                unique,
                p.sam,
                domain,
                p.full_name,
                upn or p.upn,
                p.upn,
                sid,
                "\\x" + guid.hex() if guid else None,
                p.dn,
                p.uac,
                sql_time(created) if created is not None else None,
                cloud_id,
                p.entra_id or None,
                TENANT_ID if p.entra_id else None,
            )
        )
        self.truth.records["configmgr"] += 1

    def memberships(self, rid: int, in_collection: bool) -> None:
        write = self.files.cm_members.writerow
        if in_collection:
            r = self.rng.random()
            if r < 0.90:
                write((INTUNE_COLLECTION, rid, 4))
            if r >= 0.85:
                write((PILOT_COLLECTION, rid, 4))
        elif self.rng.random() < 0.1:
            # A device row with the user's ResourceID in the Intune collection: not a membership.
            write((INTUNE_COLLECTION, rid, 5))
        if self.rng.random() < 0.5:
            write((STAFF_COLLECTION, rid, 4))

    def count_missing(self, cloud_id: str | None, in_collection: bool) -> None:
        if cloud_id is None:
            self.truth.missing_cloud_user_id["true" if in_collection else "false"] += 1

    def write_configmgr_tables(self) -> None:
        with (self.files.directory / EstateFiles.CM_COLLECTIONS).open("w", newline="") as handle:
            csv.writer(handle).writerows(
                [
                    (INTUNE_COLLECTION, "Intune Users", 1, 0),
                    (PILOT_COLLECTION, "Intune Pilot Users", 1, 0),
                    (STAFF_COLLECTION, "All Staff", 1, 0),
                    (DEVICE_COLLECTION, "All Workstations", 2, 0),
                ]
            )
        components = [
            "SMS_CLOUD_USERSYNC",
            "SMS_DMP_UPLOADER",
            "SMS_DMP_DOWNLOADER",
            "SMS_OUTGOING_CONTENT_MANAGER",
            AD_DISCOVERY,
            "SMS_AZUREAD_DISCOVERY_AGENT",
            "SMS_COLLECTION_EVALUATOR",
        ]
        critical = {CLOUD_USERSYNC} if self.params.connector_critical else set()
        if self.params.discovery_critical:
            critical.add(AD_DISCOVERY)
        rows = []
        for name in components:
            rows.append((SITE_CODE, SITE_SERVER, name, 2 if name in critical else 0, 0, SINCE_MIDNIGHT))
            rows.append((SITE_CODE, SITE_SERVER, name, 2, 0, SINCE_INSTALL))  # old errors: not today
        with (self.files.directory / EstateFiles.CM_COMPONENTS).open("w", newline="") as handle:
            csv.writer(handle).writerows(rows)

    def write_tenant(self) -> None:
        consumed = self.truth.records["entra"]
        tenant = {
            "tenant_id": TENANT_ID,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "organization": {
                "id": TENANT_ID,
                "displayName": "Contoso",
                "onPremisesSyncEnabled": True,
                "onPremisesLastSyncDateTime": graph_time(self.last_sync),
                "verifiedDomains": [{"name": UPN_SUFFIX, "isDefault": True}],
            },
            "skus": [
                sku(
                    INTUNE_A_SKU,
                    "INTUNE_A",
                    enabled=consumed,
                    consumed=int(consumed * 0.8),
                    plans=((INTUNE_A_PLAN, "INTUNE_A"),),
                ),
                sku(
                    EMS_SKU,
                    "EMS",
                    enabled=consumed // 10,
                    consumed=consumed // 10,
                    plans=((INTUNE_A_PLAN, "INTUNE_A"),),
                ),
                sku(E3_SKU, "ENTERPRISEPACK", enabled=consumed // 5, consumed=consumed // 6),
            ],
            "subscriptions": [
                subscription("sub-intune", INTUNE_A_SKU, "INTUNE_A", total=consumed),
                subscription("sub-ems", EMS_SKU, "EMS", total=consumed // 10),
                subscription("sub-e3", E3_SKU, "ENTERPRISEPACK", total=consumed // 5),
            ],
        }
        (self.files.directory / EstateFiles.GRAPH_TENANT).write_text(json.dumps(tenant, indent=1))


# ----------------------------------------------------------------------------------- churn
def truth_after_churn(truth: Truth, churn: dict[str, list[dict[str, Any]]]) -> Truth:
    """The counts once every change of the change set is applied (and seen by the exporter)."""
    after = truth.copy()
    for v in churn.get("ad_disable", []):
        after.place("intune_enabled", None, "", -1)
        after.records["ad"] -= 1
        after.orphans["entra"] += 1
        after.orphans["configmgr"] += 1
        if not v["licensed"]:
            after.enabled_without_intune_license -= 1
    for v in churn.get("ad_upn", []):
        after.place("in_intune_collection", v["reason"], SETTLING, -1)
        after.place("in_intune_collection", "upn_mismatch", SETTLING)
    for v in churn.get("entra_disable", []):
        after.place("in_intune_collection", v["reason"], SETTLING, -1)
        after.place("in_intune_collection", "entra_account_disabled", SETTLING)
    for v in churn.get("cm_enable", []):
        after.place("in_intune_collection", v["reason"], SETTLING, -1)
        after.place("intune_enabled", None, "")
        after.missing_cloud_user_id["true"] -= 1
        if not v["licensed"]:
            after.enabled_without_intune_license += 1
    for _ in churn.get("ad_new", []):
        after.place("ad_created", "entra_sync_pending", FRESH)
        after.records["ad"] += 1
    for v in churn.get("entra_sync", []):
        after.place("ad_created", "entra_not_synced", v["stuck_class"], -1)
        after.place("entra_synced", v.get("reason") or "configmgr_not_discovered", FRESH)
        after.records["entra"] += 1
    for v in churn.get("cm_new", []):
        after.place("entra_synced", v["reason"], v["stuck_class"], -1)
        after.place("cm_discovered", "not_in_intune_collection", FRESH)
        after.records["configmgr"] += 1
        after.missing_cloud_user_id["false"] += 1
    after.records["entra"] -= len(churn.get("entra_delete", []))
    return after


# ------------------------------------------------------------------------------------ build
def cache_key(params: EstateParams) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, **asdict(params)}


def generate(params: EstateParams, directory: Path, anchor: float | None = None) -> dict[str, Any]:
    """Write every file of the estate into ``directory``; returns the contents of truth.json."""
    anchor = float(int(anchor if anchor is not None else time.time()))
    files = EstateFiles(directory)
    generator = Generator(params, files, anchor)
    try:
        generator.run()
    finally:
        files.close()
    if params.discovery_critical:
        for victim in generator.pools.churn.get("entra_sync", []):
            victim["reason"] = "configmgr_discovery_unhealthy"
    churn = generator.pools.churn
    document = {
        "key": cache_key(params),
        "anchor": anchor,
        "last_sync": generator.last_sync,
        "highest_usn": files.usn,
        "truth": generator.truth.to_json(),
        "truth_after_churn": truth_after_churn(generator.truth, churn).to_json(),
        "churn_counts": {kind: len(victims) for kind, victims in sorted(churn.items())},
    }
    (directory / EstateFiles.CHURN).write_text(json.dumps(churn))
    (directory / EstateFiles.TRUTH).write_text(json.dumps(document, indent=1))
    return document


def load_or_generate(params: EstateParams, directory: Path, log: Any = print) -> dict[str, Any]:
    """The estate's truth.json, generating the files first unless a matching set is cached."""
    truth_file = directory / EstateFiles.TRUTH
    if truth_file.exists():
        document: dict[str, Any] = json.loads(truth_file.read_text())
        if document.get("key") == cache_key(params):
            log(f"reusing the generated estate in {directory}")
            return document
    started = time.monotonic()
    document = generate(params, directory)
    log(f"generated {params.users} users into {directory} in {time.monotonic() - started:.1f}s")
    return document


def graph_users(directory: Path) -> Iterator[dict[str, Any]]:
    with (directory / EstateFiles.GRAPH_USERS).open(encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def stage_totals(truth: Truth) -> Counter[str]:
    return Counter(truth.users)
