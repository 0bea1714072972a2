"""Licence data of the Entra users table that /users/delta cannot keep fresh, and group names.

- :func:`replace_licences`: the table with the licences (assignedLicenses, licenseAssignmentStates)
  of many users replaced at once, in one pass over the child tables (the licence sweep reads them
  for every user; rebuilding each user's record would cost a scan of the children per user).
- :class:`GroupNames`: display names of licence-assigning groups, looked up one by one with
  ``GET /groups/{id}`` (GroupMember.Read.All); bounded, refreshed daily, and remembering a missing
  permission so that it is not asked for on every refresh.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from exporter.model import (
    AssignedLicense,
    AssignedLicenseTable,
    EntraTable,
    LicenseState,
    LicenseStateTable,
    plans_text,
)
from exporter.tables import Table, TableBuilder

Licences = tuple[tuple[AssignedLicense, ...], tuple[LicenseState, ...]]


def replace_licences(table: EntraTable, fresh: Mapping[bytes, Licences]) -> tuple[EntraTable, int]:
    """``table`` with the licences of the users in ``fresh`` (raw object id -> licences) replaced, and
    how many of the table's users that covered. Users ``fresh`` does not name keep theirs; ids the
    table does not hold are ignored (a user created since the delta round arrives with the next one).
    """
    raw = table.array("id").tobytes()
    row_of = {raw[16 * row : 16 * row + 16]: row for row in range(table.n)}
    covered = np.zeros(table.n, dtype=np.bool_)
    licenses = TableBuilder(AssignedLicenseTable)
    states = TableBuilder(LicenseStateTable)
    for user_id, (assigned, license_states) in fresh.items():
        row = row_of.get(user_id)
        if row is None:
            continue
        covered[row] = True
        for lic in assigned:
            licenses.add({"row": row, "sku": lic.sku_id, "disabled": plans_text(lic.disabled_plans)})
        for state in license_states:
            states.add(
                {
                    "row": row,
                    "sku": state.sku_id,
                    "state": state.state,
                    "error": state.error,
                    "group": state.assigned_by_group,
                    "disabled": plans_text(state.disabled_plans),
                    "updated": float("nan") if state.last_updated is None else state.last_updated,
                }
            )
    children = dict(table.children)
    children["licenses"] = _kept_and_new(table, "licenses", covered, AssignedLicenseTable(licenses.columns()))
    children["states"] = _kept_and_new(table, "states", covered, LicenseStateTable(states.columns()))
    return table.derive(table.columns(), children, dict(table.meta)), int(covered.sum())


def _kept_and_new(table: EntraTable, name: str, covered: np.ndarray[Any, Any], new: Table) -> Table:
    """A child table: the entries of users not ``covered``, then the ``new`` entries."""
    old = table.children[name]
    keep = np.flatnonzero(~covered[old.array("row")]) if old.n else np.zeros(0, dtype=np.int64)
    return type(old).concat([old.take(keep), new])


def used_groups(table: EntraTable) -> list[str]:
    """The ids of the groups that assign a licence state of any user of the table."""
    groups = table.children["states"].cat("group")
    codes = np.unique(groups.codes[groups.codes >= 0])
    return sorted(groups.vocab[int(code)] for code in codes)


@dataclass
class _Entry:
    name: str | None  # None: the group does not exist (any more)
    at: float


class GroupNames:
    """Group id -> display name, at most ``capacity`` entries (least recently used go first), each
    looked up again after ``max_age``; after a 403 nothing is asked for ``denied_retry`` seconds."""

    def __init__(
        self,
        *,
        capacity: int = 1000,
        max_age: float = 86400.0,
        denied_retry: float = 3600.0,
        per_refresh: int = 50,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.capacity = capacity
        self.max_age = max_age
        self.denied_retry = denied_retry
        self.per_refresh = per_refresh
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._denied_at: float | None = None
        self._seeded = False

    def seed(self, names: Mapping[str, str], at: float | None) -> None:
        """Names restored with the table (once, before the first look-up of this process)."""
        if self._seeded:
            return
        self._seeded = True
        when = self._clock() if at is None else at
        for group_id, name in list(names.items())[: self.capacity]:
            self._entries.setdefault(group_id, _Entry(name, when))

    @property
    def denied(self) -> bool:
        return self._denied_at is not None and self._clock() - self._denied_at < self.denied_retry

    def due(self, group_ids: Iterable[str]) -> list[str]:
        """The groups to look up now: unknown or stale ones, at most ``per_refresh``."""
        if self.denied:
            return []
        now = self._clock()
        wanted = [
            group_id
            for group_id in group_ids
            if (entry := self._entries.get(group_id)) is None or now - entry.at >= self.max_age
        ]
        return wanted[: min(self.per_refresh, self.capacity)]

    def store(self, group_id: str, name: str | None) -> None:
        self._denied_at = None
        self._entries[group_id] = _Entry(name, self._clock())
        self._entries.move_to_end(group_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def deny(self) -> None:
        self._denied_at = self._clock()

    def names(self, group_ids: Iterable[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for group_id in group_ids:
            entry = self._entries.get(group_id)
            if entry is not None:
                self._entries.move_to_end(group_id)
                if entry.name is not None:
                    found[group_id] = entry.name
        return found
