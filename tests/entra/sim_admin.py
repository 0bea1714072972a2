"""Admin endpoints of the Graph simulator under ``/_sim/`` (same port, no authentication, loopback only),
for drivers in another process (benchmarks). Bodies are JSON; ``tenant_id`` may be left out when the
simulator holds one tenant.

==========================  =====================================================================
``GET /_sim/stats``         users, soft-deleted users, devices and change version per tenant
``GET /_sim/counters``      ``{"requests": {endpoint: n}, "statuses": {endpoint: {status: n}}}``
``POST /_sim/counters/reset``
``POST /_sim/users``        ``{"upsert": [user...], "patch": [{"id": ..., prop: value}...],
                            "delete": [id...], "hard_delete": [id...], "restore": [id...]}``
``POST /_sim/devices``      ``{"upsert": [device...], "patch": [{"id": ...}...], "delete": [id...]}``
``POST /_sim/churn``        ``{"patch": n | "fraction": f, "create": n, "soft_delete": n, "hard_delete": n,
                            "license_only": n, "devices": n, "seed": s, "set": {prop: value}}``: the
                            simulator picks the users (seeded); a patch toggles ``accountEnabled`` and
                            changes ``displayName``, ``department`` and ``jobTitle`` (or sets "set")
``POST /_sim/faults``       one fault: ``{"endpoint", "nth", "kind", ...Fault options}``
``DELETE /_sim/faults``     clear every fault
``POST /_sim/advance``      ``{"seconds": s}``: move the simulator clock (delta tokens age)
``POST /_sim/delta/invalidate``  ``{"status": 400 | 410}``
``POST /_sim/throttle``     ``{"enforce": bool, "budget": n, "limit_percentage": {endpoint: value}}``
``POST /_sim/config``       simulator knobs: ``{"delta_page_size": n, "delta_partial": bool, ...}``
==========================  =====================================================================
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any

from tests.entra import sim_synthetic
from tests.entra.sim_http import Reply, graph_error

if TYPE_CHECKING:
    from tests.entra.graph_sim import GraphSimulator
    from tests.entra.sim_http import Exchange
    from tests.entra.sim_model import SimTenant


def handle(sim: GraphSimulator, exchange: Exchange, route: str, body: bytes) -> Reply:
    if exchange.handler.client_address[0] not in {"127.0.0.1", "::1"}:
        return graph_error(403, "Forbidden", "The admin endpoints answer loopback clients only.")
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return graph_error(400, "BadRequest", "The body is not JSON.")
    key = (exchange.method, route.rstrip("/"))
    try:
        if key == ("GET", "stats"):
            return Reply(200, _stats(sim))
        if key == ("GET", "counters"):
            return Reply(200, {"requests": sim.request_counts(), "statuses": sim.status_counts()})
        if key == ("POST", "counters/reset"):
            sim.reset_counters()
            return Reply(200, {})
        if key == ("POST", "users"):
            return Reply(200, _apply_users(sim, _tenant(sim, data), data))
        if key == ("POST", "devices"):
            return Reply(200, _apply_devices(sim, _tenant(sim, data), data))
        if key == ("POST", "churn"):
            return Reply(200, _churn(sim, _tenant(sim, data), data))
        if key == ("POST", "faults"):
            options = {k: v for k, v in data.items() if k not in {"endpoint", "nth", "kind"}}
            sim.add_fault(data["endpoint"], int(data.get("nth", 1)), str(data["kind"]), **options)
            return Reply(200, {})
        if key == ("DELETE", "faults"):
            sim.clear_faults()
            return Reply(200, {})
        if key == ("POST", "advance"):
            sim.advance(float(data["seconds"]))
            return Reply(200, {"now": sim.now()})
        if key == ("POST", "delta/invalidate"):
            return Reply(
                200,
                {
                    "invalidated": sim.invalidate_delta_tokens(
                        data.get("tenant_id"), int(data.get("status", 400))
                    )
                },
            )
        if key == ("POST", "throttle"):
            _throttle(sim, data)
            return Reply(200, {})
        if key == ("POST", "config"):
            return Reply(200, _configure(sim, data))
    except (KeyError, TypeError, ValueError) as error:
        return graph_error(400, "BadRequest", f"{type(error).__name__}: {error}")
    return graph_error(404, "NotFound", f"No admin endpoint {exchange.method} /_sim/{route}.")


def _tenant(sim: GraphSimulator, data: dict[str, Any]) -> SimTenant:
    if "tenant_id" in data:
        return sim.tenants[data["tenant_id"]]
    if len(sim.tenants) != 1:
        raise KeyError("tenant_id (the simulator holds several tenants)")
    return next(iter(sim.tenants.values()))


def _stats(sim: GraphSimulator) -> dict[str, Any]:
    return {
        "tenants": {
            tenant_id: {
                "users": len(tenant.directory),
                "soft_deleted": tenant.directory.deleted_count,
                "devices": len(tenant.device_store),
                "version": tenant.directory.version,
            }
            for tenant_id, tenant in list(sim.tenants.items())
        }
    }


def _apply_users(sim: GraphSimulator, tenant: SimTenant, data: dict[str, Any]) -> dict[str, Any]:
    tid = tenant.tenant_id
    for user in data.get("upsert", []):
        sim.upsert_user(tid, user)
    for patch in data.get("patch", []):
        sim.patch_user(tid, patch["id"], **{k: v for k, v in patch.items() if k != "id"})
    for user_id in data.get("delete", []):
        sim.delete_user(tid, user_id)
    for user_id in data.get("hard_delete", []):
        sim.delete_user(tid, user_id, hard=True)
    for user_id in data.get("restore", []):
        sim.restore_user(tid, user_id)
    return {"version": tenant.directory.version, "users": len(tenant.directory)}


def _apply_devices(sim: GraphSimulator, tenant: SimTenant, data: dict[str, Any]) -> dict[str, Any]:
    tid = tenant.tenant_id
    for device in data.get("upsert", []):
        sim.upsert_device(tid, device)
    for patch in data.get("patch", []):
        sim.patch_device(tid, patch["id"], **{k: v for k, v in patch.items() if k != "id"})
    for device_id in data.get("delete", []):
        sim.delete_device(tid, device_id)
    return {"devices": len(tenant.device_store)}


def _churn(sim: GraphSimulator, tenant: SimTenant, data: dict[str, Any]) -> dict[str, Any]:
    """Change randomly chosen users (and devices) through the simulator's own mutation methods."""
    rng = random.Random(data.get("seed"))
    tid = tenant.tenant_id
    with sim.lock:
        ids = tenant.directory.ids()
        device_ids = tenant.device_store.ids()
    patch = int(data.get("patch", round(float(data.get("fraction", 0)) * len(ids))))
    wanted = {name: int(data.get(name, 0)) for name in ("soft_delete", "hard_delete", "license_only")}
    chosen = rng.sample(ids, min(len(ids), patch + sum(wanted.values())))
    stamp = rng.randrange(1 << 30)
    done = {"patch": 0, "create": 0, "soft_delete": 0, "hard_delete": 0, "license_only": 0, "devices": 0}
    for user_id in chosen[:patch]:
        props = data.get("set")
        if props is None:
            with sim.lock:
                current = tenant.directory.get(user_id) or {}
            props = {
                "accountEnabled": not current.get("accountEnabled", True),
                "displayName": f"{current.get('givenName') or 'User'} {stamp}",
                "department": f"Dept-{stamp % 97}",
                "jobTitle": f"Role {stamp}",
            }
        sim.patch_user(tid, user_id, **props)
        done["patch"] += 1
    rest = chosen[patch:]
    for name in ("soft_delete", "hard_delete", "license_only"):
        batch, rest = rest[: wanted[name]], rest[wanted[name] :]
        for user_id in batch:
            if name == "license_only":
                sim.patch_user(tid, user_id, licenseAssignmentStates=sim_synthetic.license_states(rng, stamp))
            else:
                sim.delete_user(tid, user_id, hard=name == "hard_delete")
            done[name] += 1
    start = sim_synthetic.next_free_index(ids)
    for index in range(start, start + int(data.get("create", 0))):
        sim.upsert_user(tid, sim_synthetic.user(index, rng))
        done["create"] += 1
    for device_id in rng.sample(device_ids, min(len(device_ids), int(data.get("devices", 0)))):
        sim.patch_device(tid, device_id, complianceState=rng.choice(sim_synthetic.COMPLIANCE_STATES))
        done["devices"] += 1
    return {**done, "version": tenant.directory.version, "users": len(tenant.directory)}


CONFIGURABLE = frozenset(
    {
        "token_lifetime",
        "subscriptions_page_size",
        "devices_page_size",
        "delta_page_size",
        "delta_token_lifetime",
        "delta_expired_status",
        "delta_partial",
        "delta_replay",
        "delta_duplicates",
    }
)


def _configure(sim: GraphSimulator, data: dict[str, Any]) -> dict[str, Any]:
    unknown = set(data) - CONFIGURABLE
    if unknown:
        raise KeyError(f"not configurable: {sorted(unknown)}")
    with sim.lock:
        for name, value in data.items():
            setattr(sim, name, type(getattr(sim, name))(value))
        return {name: getattr(sim, name) for name in sorted(CONFIGURABLE)}


def _throttle(sim: GraphSimulator, data: dict[str, Any]) -> None:
    if "enforce" in data:
        sim.throttle.enforce = bool(data["enforce"])
    if "budget" in data:
        sim.throttle.budget = None if data["budget"] is None else int(data["budget"])
    for endpoint, value in data.get("limit_percentage", {}).items():
        if value is None:
            sim.throttle.limit_percentage.pop(endpoint, None)
        else:
            sim.throttle.limit_percentage[endpoint] = float(value)
