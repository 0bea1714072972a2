"""A ConfigMgr-shaped test database: the tables behind the views, the views the source reads, and
the data sets the tests use.

The same DDL and inserts run on SQLite (through the stdlib ``sqlite3`` module, which is fast for
building; the source under test then reads it through the ``SQLite3`` ODBC driver) and on
PostgreSQL (through pyodbc). Both DB-API modules take ``?`` parameters. Column types differ where
the backends do: SQLite stores ``Creation_Date0`` as text (the driver then returns strings, the
"timestamps may come back as strings" case), PostgreSQL as ``timestamp`` (datetime objects).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from exporter.config import ConfigMgrConfig, Secret
from exporter.sources.configmgr import ConfigMgrSource

Backend = Literal["sqlite", "postgresql"]
SINCE_MIDNIGHT = "0001128000100008"
SINCE_INSTALL = "000A470000100008"

_TYPES: dict[Backend, dict[str, str]] = {
    "sqlite": {"int": "INTEGER", "text": "VARCHAR(256)", "binary": "BLOB", "datetime": "TEXT"},
    "postgresql": {"int": "INTEGER", "text": "VARCHAR(256)", "binary": "BYTEA", "datetime": "TIMESTAMP"},
}

USER_DISC_COLUMNS = (
    "ItemKey",
    "Name0",
    "Unique_User_Name0",
    "User_Name0",
    "Windows_NT_Domain0",
    "Full_User_Name0",
    "User_Principal_Name0",
    "Mail0",
    "SID0",
    "Object_GUID0",
    "Distinguished_Name0",
    "User_Account_Control0",
    "Creation_Date0",
    "CloudUserId",
    "AADUserID",
    "AADTenantID",
)


def schema(
    backend: Backend, slow_user_view_seconds: float | None = None, *, wide_text: bool = False
) -> list[str]:
    """DDL of the tables and the five v_* views. With ``slow_user_view_seconds`` (PostgreSQL
    only) reading v_R_User sleeps that long first, to provoke a query timeout. ``wide_text``
    makes text columns unbounded (PostgreSQL enforces VARCHAR lengths; SQLite never does), for
    tests of values far longer than any identifier."""
    t = dict(_TYPES[backend])
    if wide_text:
        t["text"] = "TEXT"
    user_source = "User_DISC u"
    if slow_user_view_seconds is not None:
        user_source += f" CROSS JOIN (SELECT pg_sleep({slow_user_view_seconds})) AS slow"
    return [
        f"""CREATE TABLE User_DISC (
            ItemKey {t["int"]} PRIMARY KEY, Name0 {t["text"]}, Unique_User_Name0 {t["text"]},
            User_Name0 {t["text"]}, Windows_NT_Domain0 {t["text"]}, Full_User_Name0 {t["text"]},
            User_Principal_Name0 {t["text"]}, Mail0 {t["text"]}, SID0 {t["text"]},
            Object_GUID0 {t["binary"]}, Distinguished_Name0 {t["text"]},
            User_Account_Control0 {t["int"]}, Creation_Date0 {t["datetime"]}, CloudUserId {t["text"]},
            AADUserID {t["text"]}, AADTenantID {t["text"]})""",
        f"""CREATE TABLE Collections_G (
            CollectionID {t["text"]} PRIMARY KEY, Name {t["text"]}, CollectionType {t["int"]},
            MemberCount {t["int"]}, LastRefreshTime {t["datetime"]}, LastMemberChangeTime {t["datetime"]})""",
        f"""CREATE TABLE CollectionMembers (
            CollectionID {t["text"]}, ResourceID {t["int"]}, ResourceType {t["int"]}, Name {t["text"]},
            Domain {t["text"]}, SiteCode {t["text"]}, IsDirect {t["int"]})""",
        f"""CREATE TABLE Summarizer_Components (
            SiteCode {t["text"]}, MachineName {t["text"]}, ComponentName {t["text"]}, Status {t["int"]},
            State {t["int"]}, Type {t["int"]}, AvailabilityState {t["int"]}, Errors {t["int"]},
            Warnings {t["int"]}, Infos {t["int"]}, LastContacted {t["datetime"]},
            TallyInterval {t["text"]})""",
        f"""CREATE TABLE DiscItemAgents (
            ResourceType {t["int"]}, ItemKey {t["int"]}, AgentName {t["text"]}, AgentSite {t["text"]},
            AgentTime {t["datetime"]})""",
        f"""CREATE VIEW v_R_User AS SELECT u.ItemKey AS ResourceID, 4 AS ResourceType, u.Name0,
            u.Unique_User_Name0, u.User_Name0, u.Windows_NT_Domain0, u.Full_User_Name0,
            u.User_Principal_Name0, u.Mail0, u.SID0, u.Object_GUID0, u.Distinguished_Name0,
            u.User_Account_Control0, u.Creation_Date0, u.CloudUserId, u.AADUserID, u.AADTenantID
            FROM {user_source}""",
        """CREATE VIEW v_Collection AS SELECT CollectionID, Name, CollectionType, MemberCount,
            LastRefreshTime, LastMemberChangeTime FROM Collections_G""",
        """CREATE VIEW v_FullCollectionMembership AS SELECT CollectionID, ResourceID, ResourceType,
            Name, Domain, SiteCode, IsDirect FROM CollectionMembers""",
        """CREATE VIEW v_ComponentSummarizer AS SELECT SiteCode, MachineName, ComponentName, Status,
            State, Type, AvailabilityState, Errors, Warnings, Infos, LastContacted, TallyInterval
            FROM Summarizer_Components""",
        """CREATE VIEW v_AgentDiscoveries AS SELECT ResourceType, ItemKey AS ResourceId, AgentName,
            AgentSite, AgentTime FROM DiscItemAgents""",
    ]


# ------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class UserRecord:
    resource_id: int
    sam: str
    full_name: str | None
    upn: str | None
    sid: str | None
    object_guid: bytes | str | None  # str: GUID text stored as bytes (a driver that gives text)
    uac: int | None
    created: datetime | None
    cloud_user_id: str | None
    domain: str = "CONTOSO"


@dataclass(frozen=True)
class Collection:
    collection_id: str
    name: str
    collection_type: int


@dataclass(frozen=True)
class Member:
    collection_id: str
    resource_id: int
    resource_type: int = 4


@dataclass(frozen=True)
class ComponentStatus:
    site_code: str
    machine_name: str
    component_name: str
    status: int
    tally_interval: str


def _time_value(backend: Backend, value: datetime | None) -> object:
    if value is None:
        return None
    if backend == "sqlite":
        # SQL Server datetime2 text: seven fractional digits, no offset (UTC).
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f") + "0"
    return value.astimezone(UTC).replace(tzinfo=None)


def _user_values(backend: Backend, user: UserRecord) -> tuple[object, ...]:
    guid = user.object_guid.encode("ascii") if isinstance(user.object_guid, str) else user.object_guid
    return (
        user.resource_id,
        f"{user.domain}\\{user.sam} ({user.full_name})",
        f"{user.domain}\\{user.sam}",
        user.sam,
        user.domain,
        user.full_name,
        user.upn,
        user.upn,
        user.sid,
        guid,
        f"CN={user.full_name},OU=Staff,DC=contoso,DC=com",
        user.uac,
        _time_value(backend, user.created),
        user.cloud_user_id,
        None,
        None,
    )


def insert_rows(
    connection: Any, table: str, columns: Sequence[str], rows: Iterable[Sequence[object]]
) -> None:
    """Multi-row INSERTs with ? parameters (portable, and far faster than row by row)."""
    per_statement = max(1, 4000 // len(columns))
    row_marks = "(" + ", ".join("?" * len(columns)) + ")"
    cursor = connection.cursor()
    batch: list[object] = []
    count = 0

    def flush() -> None:
        if count:
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([row_marks] * count)
            cursor.execute(sql, batch)

    for row in rows:
        batch.extend(row)
        count += 1
        if count == per_statement:
            flush()
            batch, count = [], 0
    flush()
    cursor.close()


def populate(
    connection: Any,
    backend: Backend,
    users: Iterable[UserRecord],
    collections: Iterable[Collection],
    members: Iterable[Member],
    components: Iterable[ComponentStatus],
    slow_user_view_seconds: float | None = None,
    *,
    wide_text: bool = False,
) -> None:
    cursor = connection.cursor()
    for statement in schema(backend, slow_user_view_seconds, wide_text=wide_text):
        cursor.execute(statement)
    cursor.close()
    insert_rows(connection, "User_DISC", USER_DISC_COLUMNS, (_user_values(backend, u) for u in users))
    insert_rows(
        connection,
        "Collections_G",
        ("CollectionID", "Name", "CollectionType", "MemberCount"),
        ((c.collection_id, c.name, c.collection_type, 0) for c in collections),
    )
    insert_rows(
        connection,
        "CollectionMembers",
        ("CollectionID", "ResourceID", "ResourceType", "SiteCode", "IsDirect"),
        ((m.collection_id, m.resource_id, m.resource_type, "PS1", 1) for m in members),
    )
    insert_rows(
        connection,
        "Summarizer_Components",
        ("SiteCode", "MachineName", "ComponentName", "Status", "State", "TallyInterval"),
        ((c.site_code, c.machine_name, c.component_name, c.status, 0, c.tally_interval) for c in components),
    )
    insert_rows(
        connection,
        "DiscItemAgents",
        ("ResourceType", "ItemKey", "AgentName", "AgentSite"),
        [(4, 2001, "SMS_AD_USER_DISCOVERY_AGENT", "PS1")],
    )
    connection.commit()


# ------------------------------------------------------------------------------ the case data
INTUNE = "PS100012"
INTUNE_PILOT = "PS100013"
STAFF = "PS100020"
WORKSTATIONS = "PS100030"
CREATED = datetime(2024, 3, 1, 8, 30, 15, 250000, tzinfo=UTC)
ALICE_CLOUD = "aaaaaaaa-1111-2222-3333-444444444444"
ERIN_CLOUD_TEXT = "{ABCDEF01-2345-6789-ABCD-EF0123456789}"
ERIN_GUID = uuid.UUID("0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0")


def _guid(n: int) -> bytes:
    return uuid.UUID(int=(0x5EED << 112) | n).bytes_le


def _case_user(
    resource_id: int,
    sam: str,
    full_name: str | None,
    upn: str | None,
    object_guid: bytes | str | None,
    cloud_user_id: str | None,
    *,
    uac: int = 512,
    sid: str | None = None,
) -> UserRecord:
    sid = sid or f"S-1-5-21-1-2-3-{resource_id - 900}"
    return UserRecord(resource_id, sam, full_name, upn, sid, object_guid, uac, CREATED, cloud_user_id)


CASE_USERS = (
    _case_user(2001, "alice", "Alice Archer", "alice@contoso.com", _guid(1), ALICE_CLOUD),
    _case_user(2002, "bob", "Bob Baker", "bob@contoso.com", _guid(2), None),
    _case_user(2003, "carol", "Carol Cook", "carol@contoso.com", _guid(3), None, sid="s-1-5-21-1-2-3-1103"),
    _case_user(2004, "dave", "Dave Dunn", "dave@contoso.com", _guid(4), "", uac=514),
    _case_user(
        2005, "erin", "Erin Evans", "erin@contoso.com", "{" + str(ERIN_GUID).upper() + "}", ERIN_CLOUD_TEXT
    ),
    _case_user(2006, "zoe", "Zoë Ångström", None, _guid(6), None),
    _case_user(2007, "lilei", "李雷", "lilei@contoso.com", _guid(7), None),
    UserRecord(2008, "frank", None, None, None, None, None, None, None),
    _case_user(2009, "mallory", "Mallory Malformed", "mallory@contoso.com", None, "not-a-guid"),
    # alice's account before it was recreated: her UPN, another SID and GUID, no longer in a collection.
    _case_user(
        2010, "alice.old", "Alice Archer", "Alice@Contoso.com", _guid(10), None, sid="S-1-5-21-1-2-3-4411"
    ),
)
CASE_COLLECTIONS = (
    Collection(INTUNE, "Intune Users", 1),
    Collection(INTUNE_PILOT, "Intune Pilot Users", 1),
    Collection(STAFF, "All Staff", 1),
    Collection(WORKSTATIONS, "All Workstations", 2),
)
CASE_MEMBERS = (
    Member(INTUNE, 2001),
    Member(INTUNE, 2002),
    Member(INTUNE, 2004),
    Member(INTUNE, 2006),
    Member(INTUNE_PILOT, 2005),
    Member(INTUNE_PILOT, 2001),  # in both Intune collections: still one record
    Member(STAFF, 2003),
    Member(STAFF, 2007),
    # A non-user resource with carol's id in the Intune collection: ResourceType must filter it out.
    Member(INTUNE, 2003, resource_type=5),
    Member(WORKSTATIONS, 2007, resource_type=5),
    Member(INTUNE, 2999),  # stale membership of a record that no longer exists
)
CASE_COMPONENTS = (
    # Errors since installation, none since midnight: the component is healthy today.
    ComponentStatus("PS1", "CM01.contoso.com", "SMS_CLOUD_USERSYNC", 2, SINCE_INSTALL),
    ComponentStatus("PS1", "CM01.contoso.com", "SMS_CLOUD_USERSYNC", 0, SINCE_MIDNIGHT),
    ComponentStatus("PS1", "CM01.contoso.com", "SMS_DMP_UPLOADER", 1, SINCE_INSTALL),
    ComponentStatus("PS1", "CM01.contoso.com", "SMS_DMP_DOWNLOADER", 0, SINCE_MIDNIGHT),
    ComponentStatus("PS1", "CM02.contoso.com", "SMS_DMP_DOWNLOADER", 2, SINCE_MIDNIGHT),
    ComponentStatus("PS1", "CM01.contoso.com", "SMS_AD_USER_DISCOVERY_AGENT", 0, SINCE_INSTALL),
    ComponentStatus("PS1", "CM01.contoso.com", "SMS_AD_USER_DISCOVERY_AGENT", 1, "0001128000080008"),
    ComponentStatus("PS1", "CM01.contoso.com", "SMS_COLLECTION_EVALUATOR", 0, SINCE_MIDNIGHT),
    ComponentStatus("PS1", "CM01.contoso.com", "SMS_MP_CONTROL_MANAGER", 2, SINCE_MIDNIGHT),
)


def populate_cases(connection: Any, backend: Backend, slow_user_view_seconds: float | None = None) -> None:
    populate(
        connection,
        backend,
        CASE_USERS,
        CASE_COLLECTIONS,
        CASE_MEMBERS,
        CASE_COMPONENTS,
        slow_user_view_seconds,
    )


# ------------------------------------------------------------------------------- the bulk data
BULK_FIRST_ID = 16_777_216
BULK_CREATED = datetime(2023, 1, 1, tzinfo=UTC)


def bulk_user(i: int) -> UserRecord:
    """The i-th user of the bulk data set (deterministic, so tests can spot-check any row)."""
    cloud = None if i % 3 == 0 else str(uuid.UUID(int=(0xC10D << 112) | i)).upper()
    return UserRecord(
        resource_id=BULK_FIRST_ID + i,
        sam=f"user{i:06d}",
        full_name=f"Bulk User {i}",
        upn=f"user{i:06d}@contoso.com",
        sid=f"S-1-5-21-1000-2000-3000-{10_000 + i}",
        object_guid=_guid(i),
        uac=514 if i % 50 == 0 else 512,
        created=BULK_CREATED + timedelta(minutes=i),
        cloud_user_id=cloud,
    )


def bulk_in_intune(i: int) -> bool:
    return i % 2 == 0


def populate_bulk(connection: Any, backend: Backend, count: int) -> None:
    populate(
        connection,
        backend,
        (bulk_user(i) for i in range(count)),
        [Collection(INTUNE, "Intune Users", 1)],
        (Member(INTUNE, BULK_FIRST_ID + i) for i in range(count) if bulk_in_intune(i)),
        CASE_COMPONENTS,
    )


def bulk_users_sql(count: int, first: int = 0) -> str:
    """PostgreSQL INSERT ... SELECT generating bulk users ``first`` to ``first + count - 1`` on the
    server (seconds for 500k rows instead of minutes of parameter round trips); the values equal
    :func:`bulk_user`'s, so any row can be spot-checked the same way."""
    return f"""INSERT INTO User_DISC ({", ".join(USER_DISC_COLUMNS)})
        SELECT {BULK_FIRST_ID} + i,
            'CONTOSO\\user' || lpad(i::text, 6, '0') || ' (Bulk User ' || i || ')',
            'CONTOSO\\user' || lpad(i::text, 6, '0'), 'user' || lpad(i::text, 6, '0'), 'CONTOSO',
            'Bulk User ' || i, 'user' || lpad(i::text, 6, '0') || '@contoso.com',
            'user' || lpad(i::text, 6, '0') || '@contoso.com', 'S-1-5-21-1000-2000-3000-' || (10000 + i),
            '\\x0000ed5e00000000'::bytea || int8send(i::bigint),
            'CN=Bulk User ' || i || ',OU=Staff,DC=contoso,DC=com',
            CASE WHEN i % 50 = 0 THEN 514 ELSE 512 END,
            TIMESTAMP '{BULK_CREATED.replace(tzinfo=None).isoformat(sep=" ")}' + i * INTERVAL '1 minute',
            CASE WHEN i % 3 = 0 THEN NULL ELSE 'C10D0000-0000-0000-' || substr(lpad(upper(to_hex(i)), 16, '0'), 1, 4)
                || '-' || substr(lpad(upper(to_hex(i)), 16, '0'), 5, 12) END,
            NULL, NULL
        FROM generate_series({first}, {first + count - 1}) AS i"""


def populate_bulk_server_side(connection: Any, count: int) -> None:
    """:func:`populate_bulk` for PostgreSQL with the rows generated by the server."""
    populate(connection, "postgresql", (), [Collection(INTUNE, "Intune Users", 1)], (), CASE_COMPONENTS)
    cursor = connection.cursor()
    cursor.execute(bulk_users_sql(count))
    cursor.execute(
        f"INSERT INTO CollectionMembers (CollectionID, ResourceID, ResourceType, SiteCode, IsDirect)"
        f" SELECT '{INTUNE}', {BULK_FIRST_ID} + i, 4, 'PS1', 1 FROM generate_series(0, {count - 1}, 2) AS i"
    )
    cursor.close()
    connection.commit()


def make_source(
    connection_string: str,
    collections: tuple[str, ...] = (INTUNE, INTUNE_PILOT),
    *,
    query_timeout: float = 30.0,
    fetch_size: int = 5000,
    username: str | None = None,
    password: str | None = None,
) -> ConfigMgrSource:
    return ConfigMgrSource(
        ConfigMgrConfig(
            connection_string=Secret(connection_string),
            intune_collection_ids=collections,
            query_timeout=query_timeout,
            username=username,
            password=Secret(password) if password is not None else None,
            fetch_size=fetch_size,
        )
    )
