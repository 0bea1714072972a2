"""Throttling as Microsoft Graph shows it: resource units, the limit-percentage header, and 429s.

Facts from learn.microsoft.com/graph/throttling-limits ("Identity and access service limits"):

- Each request to the directory costs resource units (RU): ``GET users`` 2, ``GET subscribedSkus`` 3, any
  other identity GET 1; ``$select`` takes 1 off, ``$expand`` adds 1, ``$top`` below 20 takes 1 off; never
  below 1. So a ``/users`` page with ``$select`` costs 1.
- The app+tenant budget is 3,500 / 5,000 / 8,000 RU per 10 seconds for tenants of under 50 / 50-500 /
  over 500 users.
- Regular answers carry ``x-ms-resource-unit`` (the cost) and, only once the app used more than 0.8 of
  its budget, ``x-ms-throttle-limit-percentage`` (0.8 .. 1.8).
- Throttled answers are 429 with ``Retry-After`` and ``x-ms-throttle-scope``
  (``Tenant_Application/ReadWrite/{appId}/{tenantId}``) and ``x-ms-throttle-information``
  (e.g. ``ResourceUnitLimitExceeded``).

Intune is another service: its device endpoints allow 2,000 requests per 20 seconds per app and tenant
(domain.md) and are not documented to send the RU headers, so the simulator sends none there by default.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

IDENTITY_ENDPOINTS = frozenset(
    {"users", "usersDelta", "user", "usersCount", "group", "organization", "subscribedSkus", "subscriptions"}
)
INTUNE_ENDPOINTS = frozenset({"managedDevices", "managedDevice"})
_BASE_COST = {"users": 2, "subscribedSkus": 3}
IDENTITY_WINDOW = 10.0
INTUNE_WINDOW = 20.0
INTUNE_REQUEST_BUDGET = 2000


def resource_units(endpoint: str, query: dict[str, str]) -> int:
    cost = _BASE_COST.get(endpoint, 1)
    if "$select" in query:
        cost -= 1
    if "$expand" in query:
        cost += 1
    top = query.get("$top", "")
    if top.isdigit() and int(top) < 20:
        cost -= 1
    return max(1, cost)


def tenant_budget(user_count: int) -> int:
    if user_count < 50:
        return 3500
    return 5000 if user_count <= 500 else 8000


@dataclass
class _Window:
    seconds: float
    spent: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def add(self, now: float, units: int) -> int:
        self._expire(now)
        self.spent.append((now, units))
        self.total += units
        return self.total

    def retry_after(self, now: float) -> float:
        self._expire(now)
        return max(1.0, self.spent[0][0] + self.seconds - now) if self.spent else 1.0

    def _expire(self, now: float) -> None:
        while self.spent and self.spent[0][0] <= now - self.seconds:
            self.total -= self.spent.popleft()[1]


@dataclass
class Verdict:
    headers: dict[str, str]
    throttled: bool = False
    retry_after: float = 0.0


class ThrottleModel:
    """Meters requests per app and tenant; decides the headers and, if enforced, the 429s.

    Configure per endpoint: ``resource_unit_headers[endpoint]`` (send ``x-ms-resource-unit``),
    ``limit_percentage[endpoint]`` (always send this ``x-ms-throttle-limit-percentage``). ``enforce``
    answers 429 once a budget is spent; ``budget`` overrides the tenant-size RU budget.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.resource_unit_headers: dict[str, bool] = {name: True for name in IDENTITY_ENDPOINTS}
        self.limit_percentage: dict[str, float] = {}
        self.enforce = False
        self.budget: int | None = None
        self.intune_budget = INTUNE_REQUEST_BUDGET
        self._windows: dict[tuple[str, str, str], _Window] = {}

    def meter(
        self,
        endpoint: str,
        query: dict[str, str],
        *,
        tenant_id: str,
        app_id: str,
        user_count: int,
        now: float,
    ) -> Verdict:
        intune = endpoint in INTUNE_ENDPOINTS
        units = 1 if intune else resource_units(endpoint, query)
        budget = self.intune_budget if intune else (self.budget or tenant_budget(user_count))
        key = ("intune" if intune else "identity", tenant_id, app_id)
        window = self._windows.setdefault(key, _Window(INTUNE_WINDOW if intune else IDENTITY_WINDOW))
        used = window.add(now, units)
        ratio = used / budget
        headers: dict[str, str] = {}
        if self.resource_unit_headers.get(endpoint, False):
            headers["x-ms-resource-unit"] = str(units)
        forced = self.limit_percentage.get(endpoint)
        if forced is not None:
            headers["x-ms-throttle-limit-percentage"] = f"{forced:.1f}"
        elif ratio > 0.8 and not intune:
            headers["x-ms-throttle-limit-percentage"] = f"{min(ratio, 1.8):.1f}"
        if self.enforce and used > budget:
            retry_after = window.retry_after(now)
            headers["x-ms-throttle-scope"] = f"Tenant_Application/ReadWrite/{app_id}/{tenant_id}"
            headers["x-ms-throttle-information"] = (
                "RequestLimitExceeded" if intune else "ResourceUnitLimitExceeded"
            )
            return Verdict(headers, throttled=True, retry_after=retry_after)
        return Verdict(headers)
