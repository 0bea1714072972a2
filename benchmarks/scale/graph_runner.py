"""Serve a generated tenant with the test suite's Graph simulator, in a process of its own.

    python -m benchmarks.scale.graph_runner --estate DIR --ca-file CA.pem [--port N]

For checkouts whose simulator has no standalone mode (graph.py prefers that one): it loads
``graph_users.jsonl`` and ``graph_tenant.json`` into :class:`tests.entra.graph_sim.GraphSimulator`
and answers the two admin routes the driver uses, as the standalone simulator does (loopback only):

- ``GET /_sim/counters``: ``{"requests": {endpoint: n}}`` since start;
- ``POST /_sim/users``: ``{"upsert": [user, ...], "patch": [{"id", ...props}], "delete": [id, ...]}``.

It prints ``READY <port>`` on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

from benchmarks.scale.estate import EstateFiles, graph_users
from tests.entra.graph_sim import GraphSimulator, SimApp, SimTenant

ADMIN_PREFIX = "/_sim/"


class BenchGraphSimulator(GraphSimulator):
    """The test simulator plus the admin routes above."""

    def __init__(self, ca: Any) -> None:
        super().__init__(ca)
        self._admin_lock = threading.Lock()

    def handle(self, handler: Any, method: str) -> None:
        if not handler.path.startswith(ADMIN_PREFIX):
            super().handle(handler, method)
            return
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length) or b"{}") if length else {}
        route = handler.path[len(ADMIN_PREFIX) :]
        if route == "counters" and method == "GET":
            answer: Any = {"requests": self.request_counts()}
        elif route == "users" and method == "POST":
            answer = self.apply(body)
        else:
            answer = {"error": f"no admin route {method} {handler.path}"}
        payload = json.dumps(answer).encode("utf-8")
        handler.send_response(200 if "error" not in answer else 404)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def request_counts(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for record in self.log:
                counts[record.endpoint] = counts.get(record.endpoint, 0) + 1
            return counts

    def apply(self, change: dict[str, Any]) -> dict[str, int]:
        with self._admin_lock:
            tenant = next(iter(self.tenants.values()))
            deleted = set(change.get("delete") or ())
            patches = {p["id"]: p for p in change.get("patch") or ()}
            users = []
            for user in tenant.users:
                if user["id"] in deleted:
                    continue
                patch = patches.get(user["id"])
                users.append({**user, **patch} if patch else user)
            users.extend(change.get("upsert") or ())
            with self._lock:
                tenant.users = users
            return {"users": len(users)}


def load_tenant(directory: Path) -> SimTenant:
    raw = json.loads((directory / EstateFiles.GRAPH_TENANT).read_text())
    return SimTenant(
        tenant_id=raw["tenant_id"],
        users=list(graph_users(directory)),
        organization=raw["organization"],
        skus=raw["skus"],
        subscriptions=raw["subscriptions"],
        apps={raw["client_id"]: SimApp(raw["client_id"], raw["client_secret"])},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--estate", type=Path, required=True)
    parser.add_argument("--ca-file", type=Path, required=True, help="where to write the CA certificate")
    args = parser.parse_args(argv)
    import trustme

    ca = trustme.CA(organization_name="Scale benchmark Graph CA")
    ca.cert_pem.write_to_path(str(args.ca_file))
    sim = BenchGraphSimulator(ca)
    sim.add_tenant(load_tenant(args.estate))
    sim.start()
    print(f"READY {sim.port}", flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
