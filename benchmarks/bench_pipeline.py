"""Benchmark: stage model, scrape and state file on a large synthetic estate.

    python benchmarks/bench_pipeline.py [--users 100000]

Prints wall time of each step and the process's peak RSS after it. It asserts nothing: figures
for issues and release notes, not a timed test.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from collectors import ExporterCollector, default_collectors
from exporter.config import Config, EstateConfig
from exporter.engine import Engine
from exporter.ids import immutable_id
from exporter.model import AdData, AdUser, CmUser, ConfigMgrData, EntraData, EntraUser
from exporter.state import StateStore


class Static:
    def __init__(self, kind, data):
        self.kind, self.data = kind, data

    def describe(self):
        return f"static {self.kind}"

    def refresh(self, previous):
        return self.data

    def close(self):
        pass


def build(n: int):
    now = time.time()
    ad_users, entra_users, cm_users = [], [], []
    for i in range(n):
        guid = uuid.UUID(int=i + 1).bytes_le
        sid = f"S-1-5-21-1-2-3-{1000 + i}"
        ad_users.append(
            AdUser(guid, sid, f"user{i}", f"user{i}@contoso.com", guid, now - i, 512, f"CN=user{i}")
        )
        if i % 50 == 0:
            continue  # not synced
        eid = str(uuid.UUID(int=10**12 + i))
        entra_users.append(
            EntraUser(eid, f"user{i}@contoso.com", True, immutable_id(guid), sid, f"user{i}", now - i)
        )
        if i % 40 == 0:
            continue
        cloud = None if i % 30 == 0 else eid
        cm_users.append(
            CmUser(
                16777216 + i,
                f"CONTOSO\\user{i}",
                f"user{i}@contoso.com",
                f"User {i}",
                sid,
                guid,
                512,
                now - i,
                cloud,
                i % 20 != 0,
            )
        )
    return (
        AdData(tuple(ad_users), "CONTOSO"),
        EntraData(tuple(entra_users), len(entra_users)),
        ConfigMgrData(tuple(cm_users)),
    )


def measure(label, fn):
    # Timed without tracemalloc (it slows Python code several times); memory is the growth of the
    # process's peak RSS during the step, which is what an operator's container limit sees.
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"{label:<42} {elapsed * 1000:9.1f} ms   peak RSS {rss_after / 1024:7.1f} MiB "
        f"(+{(rss_after - rss_before) / 1024:.1f})"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=100_000)
    args = parser.parse_args()
    print(f"synthetic estate: {args.users} AD users")
    ad, entra, cm = measure("build synthetic data", lambda: build(args.users))
    with tempfile.TemporaryDirectory() as directory:
        store = StateStore(Path(directory) / "state.json")
        config = Config(estates=(EstateConfig(name="bench"),))
        sources = {"bench": [Static("ad", ad), Static("entra", entra), Static("configmgr", cm)]}
        engine = Engine(config, sources, state_store=store)
        measure("first refresh of 3 sources (join + stages)", engine.refresh_all)
        measure("re-evaluation after one source refresh", lambda: engine.refresh("bench", "ad"))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ExporterCollector(engine.snapshot, default_collectors("upn", 25)))
        body = measure("scrape (/metrics body)", lambda: generate_latest(registry))
        print(f"{'  scrape size':<42} {len(body) / 1024:9.1f} KiB")
        measure("persist state file", engine.persist)
        print(f"{'  state file size':<42} {os.path.getsize(store.path) / 2**20:9.1f} MiB")
        restarted = Engine(config, {"bench": []}, state_store=store)
        measure("restore state file after restart", restarted.restore)
        view = engine.snapshot().estates[0].view
        print("stage counts:", dict(view.users))


if __name__ == "__main__":
    main()
