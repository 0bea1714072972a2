"""The ``intune_devices`` source: Intune managed devices over Microsoft Graph.

``GET /v1.0/deviceManagement/managedDevices?$select=...&$top=1000`` (DeviceManagementManagedDevices.Read.All),
paged, with the same retries, throttling and deadline handling as the users read (it shares the
tenant's :class:`~exporter.sources.graph.GraphClient`, but has a session of its own). Intune serves at
most 1,000 devices per page (observed by clients; ``$top`` is honoured up to that), so that is the
page size asked for. managedDevices has no delta query in v1.0: every refresh reads all devices.

A missing permission fails only this source, with reason ``auth`` and a message naming
DeviceManagementManagedDevices.Read.All; the users and organization sources keep working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlencode

from exporter.ids import guid_text
from exporter.model import DeviceTable, DeviceTableBuilder, SourceData, SourceKind
from exporter.sources.graph import GraphError, GraphSource, RetryBudget
from exporter.sources.graph_records import DEVICE_PROPERTIES, ShapeError, parse_device

DEVICE_PAGE_SIZE = 1000  # the most Intune puts on one page
_PATH = "/v1.0/deviceManagement/managedDevices"


class IntuneDevicesSource(GraphSource):
    """Every Intune managed device of the tenant (``kind = "intune_devices"``)."""

    kind: SourceKind = "intune_devices"

    def refresh(self, previous: SourceData | None, deadline: float | None = None) -> DeviceTable:
        with self.refreshing(deadline) as budget:
            builder = DeviceTableBuilder()
            self._read_into(builder, self.devices_url(), budget)
        table = builder.build()
        table.meta["read"] = "full"
        return table.prepare()

    def child_refresh(self, previous: SourceData | None) -> tuple[bool, SourceData | None]:
        """Every refresh reads every device: in a child process, without the previous table
        (exporter.sources.isolated)."""
        return True, None

    def devices_url(self, filter_expression: str | None = None) -> str:
        query: dict[str, Any] = {"$select": ",".join(DEVICE_PROPERTIES), "$top": DEVICE_PAGE_SIZE}
        if filter_expression is not None:
            query = {"$filter": filter_expression, **query}
        return self.client.url(f"{_PATH}?{urlencode(query, quote_via=quote, safe='$,')}")

    def find_devices(self, user_ids: Sequence[str], *, deadline: float) -> DeviceTable:
        """The devices whose primary user is one of ``user_ids`` (one ``userId eq`` query per user)."""
        wanted: list[str] = []
        for user_id in user_ids:
            try:
                text = guid_text(user_id.strip().strip("{}"))
            except ValueError:
                continue
            if text and text not in wanted:
                wanted.append(text)
        builder = DeviceTableBuilder()
        with self.refreshing(deadline) as budget:
            for user_id in wanted:
                self._read_into(builder, self.devices_url(f"userId eq '{user_id}'"), budget)
        table = builder.build()
        table.meta["read"] = "lookup"
        return table

    def _read_into(self, builder: DeviceTableBuilder, url: str, budget: RetryBudget) -> None:
        for page in self.client.get_pages("managedDevices", url, budget):
            for item in page:
                try:
                    builder.add(parse_device(item))
                except ShapeError as exc:
                    raise GraphError(
                        "data", self.client.mask(f"Graph ({self.client.graph_host}) returned {exc}")
                    ) from None
