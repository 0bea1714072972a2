"""Benchmark: the in-process part of a large estate — tables, evaluation, scrape, state file.

    python benchmarks/bench_pipeline.py [--users 100000 500000]

For each N it builds an AD, Entra and ConfigMgr table of N users with a realistic spread of stages,
then measures: the evaluation (join + stages + reasons), a summary at a moment (stuck counts), a
scrape of every collector, writing the state file (and writing it again with nothing changed), and a
restore into a fresh engine up to a ready snapshot — each with its wall time and the process's peak
RSS (VmHWM) and current RSS. Every N runs in a subprocess so peaks do not mix. It asserts nothing:
figures for issues and the README, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def build(n: int, now: float):  # type: ignore[no-untyped-def]
    from exporter.ids import immutable_id
    from exporter.model import AdTableBuilder, AdUser, CmTableBuilder, CmUser, EntraTableBuilder, EntraUser

    rng = random.Random(n)
    ad_builder, entra_builder, cm_builder = (
        AdTableBuilder("CONTOSO"),
        EntraTableBuilder(),
        CmTableBuilder(["PS100012"]),
    )
    domain = "S-1-5-21-1004336348-1177238915-682003330"
    for i in range(n):
        guid = uuid.UUID(int=rng.getrandbits(128)).bytes_le
        sid = f"{domain}-{1000 + i}"
        sam = f"user{i:06d}"
        upn = f"{sam}@contoso.com"
        ad_builder.add(AdUser(guid, sid, sam, upn, guid, now - rng.uniform(0, 60 * 86400)))
        fate = rng.random()
        if fate < 0.02:
            continue  # not synced
        entra_id = str(uuid.UUID(int=rng.getrandbits(128)))
        entra_builder.add(EntraUser(entra_id, upn, True, immutable_id(guid), sid, now - 86400, True))
        if fate < 0.04:
            continue  # not discovered
        in_collection = fate >= 0.10
        cloud = entra_id if fate >= 0.14 else None
        cm_builder.add(
            CmUser(
                2063597568 + i,
                f"CONTOSO\\{sam}",
                upn,
                sid,
                guid,
                now - 3600,
                cloud,
                ("PS100012",) if in_collection else (),
            )
        )
    for i in range(n // 25):  # cloud-only users
        entra_builder.add(
            EntraUser(
                str(uuid.UUID(int=rng.getrandbits(128))),
                f"admin{i}@contoso.onmicrosoft.com",
                False,
                None,
                None,
            )
        )
    return ad_builder.build().prepare(), entra_builder.build().prepare(), cm_builder.build().prepare()


class Static:
    def __init__(self, kind: str, data: object) -> None:
        self.kind, self.data = kind, data

    def describe(self) -> str:
        return f"static {self.kind}"

    def refresh(self, previous: object, deadline: float) -> object:
        return self.data

    def close(self) -> None:
        pass


def run_restore(directory: str) -> dict[str, float]:
    """A fresh process restoring the state file, as a restarted exporter does."""
    from exporter.config import Config, EstateConfig
    from exporter.engine import Engine
    from exporter.state import StateStore

    config = Config(estates=(EstateConfig(name="contoso"),))
    sources = [Static("ad", None), Static("entra", None), Static("configmgr", None)]
    engine = Engine(config, {"contoso": sources}, state_store=StateStore(Path(directory) / "state.json"))
    started = time.perf_counter()
    engine.restore()
    assert engine.snapshot().ready and engine.snapshot().estates[0].evaluation is not None
    return {
        "restore_to_ready_s": round(time.perf_counter() - started, 3),
        "restore_to_ready_peak_mib": round(_status("VmHWM"), 1),
        "restore_to_ready_rss_mib": round(_status("VmRSS"), 1),
    }


def run_one(n: int) -> dict[str, float]:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from collectors import ExporterCollector, default_collectors
    from exporter.config import Config, EstateConfig
    from exporter.engine import Engine
    from exporter.pipelines import implementation
    from exporter.pipelines.evaluation import EstateData, evaluate
    from exporter.state import StateStore

    figures: dict[str, float] = {"users": n}
    now = time.time()

    def step(name: str, started: float) -> None:
        figures[f"{name}_s"] = round(time.perf_counter() - started, 3)
        figures[f"{name}_peak_mib"] = round(_status("VmHWM"), 1)
        figures[f"{name}_rss_mib"] = round(_status("VmRSS"), 1)

    started = time.perf_counter()
    ad, entra, cm = build(n, now)
    step("build_tables", started)
    config = Config(estates=(EstateConfig(name="contoso"),))
    engine = Engine(config, {"contoso": [Static("ad", ad), Static("entra", entra), Static("configmgr", cm)]})
    settings = engine._estates["contoso"].settings
    pipeline = implementation("hybrid_mdm")
    data = EstateData(ad=ad, entra=entra, configmgr=cm)
    started = time.perf_counter()
    evaluation = evaluate(pipeline, data, settings, None, now)
    step("evaluate_first", started)
    started = time.perf_counter()
    evaluation = evaluate(pipeline, data, settings, evaluation.first_seen, now + 60)
    step("evaluate_again", started)
    started = time.perf_counter()
    evaluation.summary(now + 61)
    step("summary", started)
    engine.refresh_all()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(engine.snapshot, default_collectors(25)))
    started = time.perf_counter()
    body = generate_latest(registry)
    step("scrape", started)
    figures["scrape_bytes"] = len(body)
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(Path(tmp) / "state.json")
        figures["_dir"] = tmp  # type: ignore[assignment]
        engine._store = store
        started = time.perf_counter()
        engine.persist()
        step("state_write", started)
        figures["state_mib"] = round(
            sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 2**20, 1
        )
        started = time.perf_counter()
        engine.persist()
        step("state_write_unchanged", started)
        del engine, evaluation, data, ad, entra, cm
        fresh = Engine(
            config,
            {"contoso": [Static("ad", None), Static("entra", None), Static("configmgr", None)]},
            state_store=StateStore(Path(tmp) / "state.json"),
        )
        started = time.perf_counter()
        fresh.restore()
        assert fresh.snapshot().ready and fresh.snapshot().estates[0].evaluation is not None
        step("restore_to_ready", started)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[100_000, 500_000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--restore", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.restore:
        print(json.dumps(run_restore(args.restore)))
        return 0
    if args.one:
        print(json.dumps(run_one(args.one)))
        return 0
    print(f"{'users':>8} {'step':<24} {'seconds':>8} {'peak MiB':>9} {'RSS MiB':>8}")
    for n in args.users:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True
        )
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        for name in (
            "build_tables",
            "evaluate_first",
            "evaluate_again",
            "summary",
            "scrape",
            "state_write",
            "state_write_unchanged",
            "restore_to_ready",
        ):
            seconds, peak, rss = (figures[name + suffix] for suffix in ("_s", "_peak_mib", "_rss_mib"))
            print(f"{n:>8} {name:<24} {seconds:>8.3f} {peak:>9.1f} {rss:>8.1f}")
        print(f"{n:>8} state file {figures['state_mib']} MiB, scrape {figures['scrape_bytes']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
