"""The Graph simulator as a separate process, and what the driver asks of it.

The simulator runs in its own process so that its CPU and memory never count as the exporter's,
and so that it does not share the driver's GIL. It answers the identity platform (token) and Graph
on one HTTPS port; the driver reads its request counters and applies changes through admin routes.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.scale.estate import EstateFiles

REPO = Path(__file__).resolve().parents[2]


class GraphService:
    def __init__(self, estate_dir: Path, root: Path) -> None:
        self.estate_dir = estate_dir
        self.root = root
        self.ca_file = root / "graph-ca.pem"
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

    def start(self, timeout: float = 300.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.scale.graph_runner",
                "--estate",
                str(self.estate_dir),
                "--ca-file",
                str(self.ca_file),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        deadline = time.monotonic() + timeout
        line = self._process.stdout.readline()  # the tenant loads first: a while at 500k users
        if not line.startswith("READY ") or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"the Graph simulator did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _call(self, method: str, route: str, body: Any = None) -> Any:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(f"{self.base_url}/_bench/{route}", data=data, method=method)
        with urllib.request.urlopen(request, context=context, timeout=120) as response:
            return json.loads(response.read())

    def request_counts(self) -> dict[str, int]:
        counts: dict[str, int] = self._call("GET", "counters")["requests"]
        return counts

    def apply(
        self,
        *,
        upsert: list[dict[str, Any]] | None = None,
        patch: list[dict[str, Any]] | None = None,
        delete: list[str] | None = None,
    ) -> None:
        self._call("POST", "users", {"upsert": upsert or [], "patch": patch or [], "delete": delete or []})
