"""The identity half both chains share: AD account -> synced Entra ID user (stages 1 and 2)."""

from __future__ import annotations

import numpy as np

from exporter.columns import I64, Bools
from exporter.model import AdTable, EntraTable, OrganizationData
from exporter.pipelines.evaluation import first_match


def match_entra(ad: AdTable, entra: EntraTable) -> I64:
    """Stage 2 join: a synced Entra user whose onPremisesImmutableId is base64 of the source anchor,
    else whose onPremisesSecurityIdentifier is the objectSid."""
    return first_match(
        ad.n,
        (entra.synced_index("k_imm"), ad.index("k_imm")),
        (entra.synced_index("k_sid"), ad.index("k_sid")),
    )


def cloud_user_conflict(ad: AdTable, entra: EntraTable, rows: I64) -> Bools:
    """A not-synced Entra user carries the user's immutable id, objectSid or UPN (any case)."""
    held = np.zeros(len(rows), dtype=np.bool_)
    for key in ("k_imm", "k_sid", "k_upn"):
        held |= entra.other_index(key).contains(ad.array(key)[rows])
    return held


def conflicting_entra_row(ad: AdTable, entra: EntraTable, row: int) -> tuple[int, str] | None:
    """The not-synced Entra user behind entra_cloud_user_conflict, and which identifier it holds."""
    for key, what in (("k_imm", "immutable id"), ("k_sid", "SID"), ("k_upn", "UPN")):
        found = entra.other_index(key).rows_with(int(ad.array(key)[row]))
        if len(found):
            return int(found[0]), what
    return None


def entra_sync_pending(ad: AdTable, organization: OrganizationData | None, rows: I64) -> Bools:
    """Entra Connect's last sync (when known) is older than the account."""
    if organization is None or organization.last_sync is None:
        return np.zeros(len(rows), dtype=np.bool_)
    created = ad.array("created")[rows]
    with np.errstate(invalid="ignore"):
        return np.asarray(organization.last_sync < created, dtype=np.bool_)  # NaN (unknown) -> False
