"""Run the Graph simulator as a process of its own, for benchmarks.

    python -m tests.entra.graph_sim serve --port 0 --cert-dir DIR --synthetic-users 500000 --seed 1
    python -m tests.entra.graph_sim serve --port 8443 --cert-dir DIR --tenant-file tenant.json

It writes the CA certificate to ``DIR/ca.pem``, prints one JSON line ``{"port", "base_url", "ca_file",
"tenant_id", "client_id", "client_secret", "users", "devices"}`` and serves until it gets SIGTERM or
SIGINT. The admin endpoints under ``/_sim/`` (:mod:`tests.entra.sim_admin`) change data and read counters.

A tenant file is JSON lines (one user object per line; a line with ``"@type": "managedDevice"`` is a
device, ``"@type": "group"`` a group) or one JSON document: a list of users, or an object with any of
``users``, ``devices``, ``groups``, ``organization``, ``skus``, ``subscriptions``, ``tenant_id``,
``client_id``, ``client_secret``, ``permissions``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.entra import sim_synthetic, tenant_data
from tests.entra.graph_sim import GraphSimulator
from tests.entra.sim_model import SimApp, SimTenant
from tests.entra.sim_store import UserStore

DEFAULT_PERMISSIONS = (
    "User.Read.All",
    "Organization.Read.All",
    "DeviceManagementManagedDevices.Read.All",
    "GroupMember.Read.All",
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import trustme
    except ImportError:
        print("the simulator needs trustme: pip install trustme", file=sys.stderr)
        return 2
    cert_dir = Path(args.cert_dir)
    cert_dir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file = cert_dir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tenant, secret = build_tenant(args)
    sim = GraphSimulator(ca, port=args.port)
    sim.log = deque(maxlen=args.log_limit)
    sim.delta_page_size = args.delta_page_size
    sim.devices_page_size = args.devices_page_size
    sim.add_tenant(tenant)
    sim.start()
    client_id = next(iter(tenant.apps))
    print(
        json.dumps(
            {
                "port": sim.port,
                "base_url": sim.base_url,
                "ca_file": str(ca_file.resolve()),
                "tenant_id": tenant.tenant_id,
                "client_id": client_id,
                "client_secret": secret,
                "users": len(tenant.directory),
                "devices": len(tenant.device_store),
            }
        ),
        flush=True,
    )
    done = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: done.set())
    done.wait()
    sim.stop()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.entra.graph_sim", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a tenant until killed")
    serve.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    serve.add_argument("--cert-dir", required=True, help="where ca.pem is written")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--tenant-file", help="users as JSON lines, or a JSON tenant document")
    source.add_argument("--synthetic-users", type=int, help="generate this many users (and their devices)")
    serve.add_argument("--seed", type=int, default=1)
    serve.add_argument(
        "--device-share", type=float, default=0.9, help="share of synthetic users with a device"
    )
    serve.add_argument("--tenant-id", default=tenant_data.TENANT_ID)
    serve.add_argument("--client-id", default=tenant_data.CLIENT_ID)
    serve.add_argument("--client-secret", default=tenant_data.CLIENT_SECRET)
    serve.add_argument("--permissions", default=",".join(DEFAULT_PERMISSIONS), help="comma-separated")
    serve.add_argument("--log-limit", type=int, default=10_000, help="requests kept in the request log")
    serve.add_argument("--delta-page-size", type=int, default=200, help="users per users/delta page")
    serve.add_argument("--devices-page-size", type=int, default=1000, help="managed devices per page")
    return parser


def build_tenant(args: argparse.Namespace) -> tuple[SimTenant, str]:
    spec: dict[str, Any] = {}
    devices: Any
    groups: list[dict[str, Any]] = []
    if args.tenant_file:
        spec, users, devices, groups = _read_tenant_file(Path(args.tenant_file))
    else:
        users = sim_synthetic.users(args.synthetic_users, args.seed)
        devices = sim_synthetic.devices(args.synthetic_users, args.seed, args.device_share)
    directory = UserStore(users)  # reading JSON lines also collects their devices and groups
    secret = str(spec.get("client_secret", args.client_secret))
    client_id = str(spec.get("client_id", args.client_id))
    permissions = spec.get("permissions") or args.permissions.split(",")
    tenant = SimTenant(
        str(spec.get("tenant_id", args.tenant_id)),
        organization=spec.get("organization") or tenant_data.organization(),
        skus=spec.get("skus") or tenant_data.default_skus(),
        subscriptions=spec.get("subscriptions") or tenant_data.default_subscriptions(),
        apps={client_id: SimApp(client_id, secret, None, frozenset(p.strip() for p in permissions))},
        devices=devices,
        groups=groups or [tenant_data.group()],
    )
    tenant.directory = directory
    return tenant, secret


def _read_tenant_file(path: Path) -> tuple[dict[str, Any], Any, Any, list[dict[str, Any]]]:
    if path.suffix == ".jsonl":
        devices: list[dict[str, Any]] = []
        groups: list[dict[str, Any]] = []
        return {}, _jsonl_users(path, devices, groups), devices, groups
    document = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(document, list):
        return {}, document, [], []
    return document, document.get("users", []), document.get("devices", []), document.get("groups", [])


def _jsonl_users(
    path: Path, devices: list[dict[str, Any]], groups: list[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """Users one by one (500,000 need not sit in memory as dicts); devices and groups are collected."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            record = json.loads(line)
            kind = record.pop("@type", "user")
            if kind == "managedDevice":
                devices.append(record)
            elif kind == "group":
                groups.append(record)
            else:
                yield record
