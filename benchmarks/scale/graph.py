"""The Graph simulator as a separate process, and what the driver asks of it.

The simulator runs in its own process so that its CPU and memory never count as the exporter's,
and so that it does not share the driver's GIL. It answers the identity platform (token) and Graph
on one HTTPS port; the driver reads its request counters and applies changes through its admin
routes (``GET /_sim/counters``, ``POST /_sim/users``).

It is the test simulator's standalone mode (``python -m tests.entra.graph_sim serve``, with
``/users/delta``), fed one JSON tenant document built from the generated files.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.scale.estate import EstateFiles
from benchmarks.scale.priority import niced

REPO = Path(__file__).resolve().parents[2]
TENANT_DOCUMENT = "graph_tenant_document.json"
NOT_GRAPH = {"admin"}  # the driver's own calls


def tenant_document(estate_dir: Path) -> Path:
    """One JSON document (tenant, organization, licences, users) for the simulator's --tenant-file,
    streamed from the generated files without parsing the users."""
    target = estate_dir / TENANT_DOCUMENT
    users = estate_dir / EstateFiles.GRAPH_USERS
    if target.exists() and target.stat().st_mtime >= users.stat().st_mtime:
        return target
    head = json.loads((estate_dir / EstateFiles.GRAPH_TENANT).read_text())
    partial = target.with_suffix(".tmp")
    with partial.open("w", encoding="utf-8") as out, users.open(encoding="utf-8") as lines:
        out.write(json.dumps(head)[:-1] + ', "users": [')
        for number, line in enumerate(lines):
            out.write(("," if number else "") + line.rstrip("\n"))
        out.write("]}")
    partial.replace(target)
    return target


class GraphService:
    def __init__(self, estate_dir: Path, root: Path) -> None:
        self.estate_dir = estate_dir
        self.root = root
        self.ca_file = root / "ca.pem"
        self.port = 0
        self._process: subprocess.Popen[str] | None = None
        tenant = json.loads((estate_dir / EstateFiles.GRAPH_TENANT).read_text())
        self.tenant_id: str = tenant["tenant_id"]
        self.client_id: str = tenant["client_id"]
        self.client_secret: str = tenant["client_secret"]

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        document = tenant_document(self.estate_dir)
        self._process = subprocess.Popen(
            niced(
                [
                    *(sys.executable, "-m", "tests.entra.graph_sim", "serve", "--port", "0"),
                    *("--cert-dir", str(self.root), "--tenant-file", str(document)),
                ]
            ),
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()  # the tenant loads first: a while at 500k users
        try:
            announced = json.loads(line)  # {"port", "base_url", "ca_file", ...}
            self.port, self.ca_file = int(announced["port"]), Path(announced["ca_file"])
        except (ValueError, KeyError, TypeError):
            self.stop()
            raise RuntimeError(f"the Graph simulator did not start: {line!r}") from None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _call(self, method: str, route: str, body: Any = None) -> Any:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(f"{self.base_url}/_sim/{route}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, context=context, timeout=300) as response:
            return json.loads(response.read())

    def request_counts(self) -> dict[str, int]:
        """Requests answered per endpoint since start (the driver's admin calls left out)."""
        counts: dict[str, int] = self._call("GET", "counters")["requests"]
        return {endpoint: n for endpoint, n in counts.items() if endpoint not in NOT_GRAPH}

    def apply(
        self,
        *,
        upsert: list[dict[str, Any]] | None = None,
        patch: list[dict[str, Any]] | None = None,
        delete: list[str] | None = None,
    ) -> None:
        self._call("POST", "users", {"upsert": upsert or [], "patch": patch or [], "delete": delete or []})
