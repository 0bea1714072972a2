"""The exporter under test: its config file and its process, driven from the outside."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.scale.estate import (
    INTUNE_COLLECTIONS,
    NETBIOS,
    SERVICE_DN,
    STAFF_OU,
    STUCK_MARGIN,
    USER_FILTER,
)
from benchmarks.scale.metrics import Scrape, fetch, try_fetch
from benchmarks.scale.slapd import SERVICE_PASSWORD, free_port

REPO = Path(__file__).resolve().parents[2]
ESTATE = "scale"
SOURCE_KINDS = {"ad": ("ad",), "entra": ("entra", "entra_organization"), "configmgr": ("configmgr",)}


@dataclass(frozen=True)
class Backends:
    """Where the three servers are, as the exporter's config needs them."""

    ldaps_url: str
    ldap_ca_file: Path
    graph_url: str
    graph_ca_file: Path
    tenant_id: str
    client_id: str
    client_secret: str
    odbc_connection_string: str


def stuck_after(anchor: float, now: float) -> dict[str, str]:
    """Old evidence is stuck and fresh is not (see estate.py); stages without evidence: 0s."""
    evidence = f"{int(now - anchor + STUCK_MARGIN)}s"
    return {
        "ad_created": evidence,
        "entra_synced": evidence,
        "cm_discovered": evidence,
        "in_intune_collection": "0s",
        "connector_synced": "0s",
    }


def config_document(
    backends: Backends,
    *,
    anchor: float,
    refresh_interval: float,
    state_file: Path | None,
    sources: Iterable[str] = ("ad", "entra", "configmgr"),
    full_resync_interval: str | None = "24h",
) -> dict[str, object]:
    chosen = set(sources)
    estate: dict[str, object] = {"name": ESTATE}
    if "ad" in chosen:
        estate["active_directory"] = {
            "url": backends.ldaps_url,
            "bind_user": SERVICE_DN,  # OpenLDAP binds by DN only
            "bind_password": SERVICE_PASSWORD,
            "ca_file": str(backends.ldap_ca_file),
            "search_bases": [STAFF_OU],
            "user_filter": USER_FILTER,  # objectCategory as a DN (OpenLDAP has no short form)
            "netbios_domain": NETBIOS,  # OpenLDAP has no CN=Partitions to discover it from
            "page_size": 1000,
            "timeout": "300s",
        }
    if "entra" in chosen:
        estate["entra"] = {
            "tenant_id": backends.tenant_id,
            "client_id": backends.client_id,
            "client_secret": backends.client_secret,
            "authority_host": backends.graph_url,
            "graph_url": backends.graph_url,
            "ca_file": str(backends.graph_ca_file),
            "timeout": "300s",
        }
    if "configmgr" in chosen:
        estate["configmgr"] = {
            "connection_string": backends.odbc_connection_string,
            "intune_collection_ids": list(INTUNE_COLLECTIONS),
            "query_timeout": "600s",
        }
    estate["stuck_after"] = stuck_after(anchor, time.time())
    document: dict[str, object] = {
        "refresh_interval": f"{int(refresh_interval)}s",
        # A slow full read on a busy machine must not time out and be retried from scratch: the
        # default limit is refresh_interval.
        "refresh_timeout": "3600s",
        "estates": [estate],
    }
    if state_file is not None:
        document["state_file"] = str(state_file)
    if full_resync_interval is not None:
        document["full_resync_interval"] = full_resync_interval
    return document


def write_config(path: Path, document: dict[str, object]) -> None:
    # JSON is YAML: no YAML writer needed, and nothing is misquoted.
    path.write_text(json.dumps(document, indent=2))


class ExporterProcess:
    def __init__(
        self, command: list[str], config: Path, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.command = command
        self.config = config
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_config(self) -> tuple[int, str]:
        result = subprocess.run(
            [*self.command, "--config.file", str(self.config), "--config.check"],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.config.parent,
        )
        return result.returncode, (result.stdout + result.stderr).strip()

    def start(self) -> float:
        log = self.log_path.open("ab")
        self.started_at = time.time()
        self.process = subprocess.Popen(
            [
                *self.command,
                "--config.file",
                str(self.config),
                "--web.listen-address",
                f"127.0.0.1:{self.port}",
                "--log.level",
                "info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            # Not the checkout: `python -m` puts the working directory first on sys.path, which
            # would shadow the exporter tree under test (--exporter-src/--exporter-rev).
            cwd=self.config.parent,
        )
        log.close()
        return self.started_at

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_until(self, path: str, wanted: set[int | None], timeout: float, poll: float = 0.02) -> float:
        """Wall time at which GET path first answered with a status in ``wanted``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the exporter exited ({self.exit_code()}); see {self.log_path}")
            status, _ = try_fetch(self.base_url + path, timeout=5)
            if status in wanted:
                return time.time()
            time.sleep(poll)
        raise TimeoutError(f"{path} did not answer {sorted(map(str, wanted))} within {timeout:g}s")

    def wait_http(self, timeout: float) -> float:
        return self.wait_until("/-/healthy", {200, 503, 401, 404, 500}, timeout)

    def wait_ready(self, timeout: float, poll: float = 0.1) -> float:
        return self.wait_until("/-/ready", {200}, timeout, poll)

    def scrape(self) -> Scrape:
        return Scrape(fetch(self.base_url + "/metrics", timeout=120))

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self, timeout: float = 120.0) -> tuple[float, int | None]:
        """SIGTERM; (seconds until the process exited, exit code)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return time.monotonic() - started, code

    def kill(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait()


def exporter_command(source_dir: Path | None) -> tuple[list[str], dict[str, str]]:
    """``python -m exporter``, from a given source tree (a snapshot) or the installed package."""
    env = {"PYTHONPATH": str(source_dir)} if source_dir is not None else {}
    compile_tree(source_dir)
    probe = os.environ.get("IPX_GILPROBE")  # a file: run under benchmarks.scale.gilprobe, writing there
    if probe:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (env.get("PYTHONPATH"), str(REPO))))
        threshold = os.environ.get("IPX_GILPROBE_THRESHOLD", "0.015")  # seconds
        command = [sys.executable, "-m", "benchmarks.scale.gilprobe", "--out", probe]
        return [*command, "--threshold", threshold, "--"], env
    return [sys.executable, "-m", "exporter"], env


def compile_tree(source_dir: Path | None) -> None:
    """Byte-compile the exporter that will run, as ``pip install`` does. This machine sets
    PYTHONDONTWRITEBYTECODE=1, so a source tree would be compiled at every start: 0.2 s more CPU,
    and single ``compile()`` calls of up to 17 ms that hold the GIL while the first scrapes arrive
    (GIL probe), which an installed exporter never pays."""
    if source_dir is None:
        spec = importlib.util.find_spec("exporter")
        if spec is None or spec.origin is None:
            return
        source_dir = Path(spec.origin).parent.parent
    packages = [str(source_dir / name) for name in ("exporter", "collectors") if (source_dir / name).is_dir()]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], check=True, capture_output=True)


def snapshot_exporter(revision: str, target: Path, repo: Path) -> Path:
    """exporter/ and collectors/ of a git revision, for benchmarking it while the tree changes."""
    if target.exists():
        subprocess.run(["rm", "-rf", str(target)], check=True)
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", revision, "exporter", "collectors"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target
