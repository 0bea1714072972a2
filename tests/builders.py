"""Small builders of model records and tables for unit tests (no backend involved)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence

from exporter.ids import immutable_id
from exporter.model import (
    AdTable,
    AdUser,
    CmComponent,
    CmTable,
    CmUser,
    EntraTable,
    EntraUser,
)

DOMAIN_SID = "S-1-5-21-1111111111-2222222222-3333333333"
NETBIOS = "CONTOSO"
COLLECTION = "PS100012"
_counter = itertools.count(1000)


def ad_user(
    sam: str,
    *,
    when_created: float | None = 1_000.0,
    upn: str | None = "",
    anchor: bytes | None = None,
    rid: int | None = None,
) -> AdUser:
    rid = rid if rid is not None else next(_counter)
    guid = uuid.uuid5(uuid.NAMESPACE_DNS, sam).bytes_le
    return AdUser(
        object_guid=guid,
        object_sid=f"{DOMAIN_SID}-{rid}",
        sam_account_name=sam,
        user_principal_name=f"{sam}@contoso.com" if upn == "" else upn,
        source_anchor=anchor if anchor is not None else guid,
        when_created=when_created,
    )


def entra_for(
    user: AdUser,
    *,
    by: str = "immutable_id",
    created: float | None = 2_000.0,
    sync_enabled: bool = True,
    object_id: str | None = None,
    upn: str | None = "",
    account_enabled: bool | None = True,
) -> EntraUser:
    return EntraUser(
        id=object_id or str(uuid.uuid5(uuid.NAMESPACE_URL, user.sam_account_name)),
        user_principal_name=user.user_principal_name if upn == "" else upn,
        on_premises_sync_enabled=sync_enabled,
        on_premises_immutable_id=immutable_id(user.source_anchor) if by == "immutable_id" else None,
        on_premises_security_identifier=user.object_sid if by in ("immutable_id", "sid") else None,
        created=created,
        account_enabled=account_enabled,
    )


def cm_for(
    user: AdUser,
    *,
    by: str = "sid",
    in_collection: bool = False,
    cloud_user_id: str | None = None,
    creation_date: float | None = 3_000.0,
    resource_id: int | None = None,
    domain: str = NETBIOS,
    upn: str | None = "",
) -> CmUser:
    return CmUser(
        resource_id=resource_id if resource_id is not None else next(_counter),
        unique_user_name=f"{domain}\\{user.sam_account_name}",
        user_principal_name=user.user_principal_name if upn == "" else upn,
        sid=user.object_sid if by == "sid" else None,
        object_guid=user.object_guid if by in ("sid", "guid") else None,
        creation_date=creation_date,
        cloud_user_id=cloud_user_id,
        collections=(COLLECTION,) if in_collection else (),
    )


def ad(*users: AdUser) -> AdTable:
    return AdTable.from_records(users, NETBIOS)


def entra(*users: EntraUser) -> EntraTable:
    return EntraTable.from_records(users)


def cm(*users: CmUser, components: Sequence[CmComponent] = ()) -> CmTable:
    return CmTable.from_records(users, components, collection_ids=(COLLECTION,))
