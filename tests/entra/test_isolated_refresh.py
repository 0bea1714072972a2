"""Refreshes in a child process (exporter.sources.isolated), against the Graph simulator.

The engine runs the full reads of the sources the factory built in a forkserver child; what comes
back must be exactly what the same refresh in process gives, with the child's Graph statistics
and log records in the parent, and a deadline, an abort or a failure must end the child and the
refresh the way an in-process refresh ends.
"""

from __future__ import annotations

import logging
import multiprocessing.forkserver
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter.config import parse_config
from exporter.engine import Engine
from exporter.model import EntraTable
from exporter.sources.base import SourceError
from exporter.sources.entra import EntraUsersSource
from exporter.sources.factory import build_estate_sources, build_source
from exporter.sources.isolated import CHILD_NICENESS, ChildRefresh, _forkserver, plan, recipe_of, scratch_root
from tests.entra import tenant_data
from tests.entra.graph_sim import GraphSimulator


def _config(tmp_path: Path, sim: GraphSimulator, ca_file: str, **extra: Any) -> Any:
    entra = {
        "tenant_id": tenant_data.TENANT_ID,
        "client_id": tenant_data.CLIENT_ID,
        "client_secret": tenant_data.CLIENT_SECRET,
        "authority_host": sim.base_url,
        "graph_url": sim.base_url,
        "ca_file": ca_file,
        "timeout": "10s",
        "licenses": False,
    }
    document = {"estates": [{"name": "e", "pipeline": "hybrid_mdm", "entra": entra}], **extra}
    return parse_config(document, base_dir=tmp_path)


def _users(config: Any) -> EntraUsersSource:
    sources = build_estate_sources(config.estates[0])
    users = next(s for s in sources if s.kind == "entra")
    for other in sources:
        if other is not users:
            other.close()
    assert isinstance(users, EntraUsersSource)
    return users


def _same_table(first: EntraTable, second: EntraTable) -> None:
    assert first.n == second.n
    assert [first.record(r) for r in range(first.n)] == [second.record(r) for r in range(second.n)]
    for name, value in first.columns().items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, second.column(name), equal_nan=value.dtype.kind == "f"), name


def test_a_full_read_in_a_child_equals_the_read_in_process(
    sim: GraphSimulator, ca_file: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = tenant_data.users(2500, cloud_every=7)
    config = _config(tmp_path, sim, ca_file)
    source = _users(config)
    try:
        recipe = recipe_of(source)
        assert recipe is not None and plan(source, None) == (True, None)
        before = sim.request_counts().get("users", 0)
        with caplog.at_level(logging.INFO):
            table = ChildRefresh(source, recipe).run(None, None, time.monotonic() + 60)
        assert sim.request_counts()["users"] - before == 3  # pages of 999
        # The child's requests are counted in the parent's client, its log records logged here.
        assert source.http_stats().requests[("users", "200")] == 3
        assert source.http_stats().token_requests == 1
        in_process = build_source(config.estates[0], "entra").refresh(None, time.monotonic() + 60)
        assert isinstance(table, EntraTable) and isinstance(in_process, EntraTable)
        _same_table(table, in_process)
        assert table.meta["read"] == "full" and table.meta["delta_link"]
        assert table.cached("index:k_id", lambda: None) is not None  # prepared in the parent
        assert not list(Path(scratch_root()).glob("ipx-refresh-*"))
        # An incremental read goes on in process, from the table the child read.
        assert plan(source, table) == (False, None)
    finally:
        source.close()


def test_a_failed_refresh_in_a_child_fails_with_its_reason_and_message(
    sim: GraphSimulator, ca_file: str, tmp_path: Path
) -> None:
    sim.tenants[tenant_data.TENANT_ID].apps[tenant_data.CLIENT_ID].permissions = frozenset()
    source = _users(_config(tmp_path, sim, ca_file))
    try:
        recipe = recipe_of(source)
        assert recipe is not None
        with pytest.raises(SourceError) as failure:
            ChildRefresh(source, recipe).run(None, None, time.monotonic() + 60)
        assert failure.value.reason == "auth"
        assert "User.Read.All" in failure.value.message
        assert source.http_stats().requests.get(("usersDelta", "403"), 0) >= 1
    finally:
        source.close()


def test_an_aborted_child_ends_at_once_and_leaves_nothing(
    sim: GraphSimulator, ca_file: str, tmp_path: Path
) -> None:
    sim.add_fault("users", 1, "hang")
    source = _users(_config(tmp_path, sim, ca_file))
    try:
        recipe = recipe_of(source)
        assert recipe is not None
        child = ChildRefresh(source, recipe)
        outcome: dict[str, BaseException] = {}

        def run() -> None:
            try:
                child.run(None, None, time.monotonic() + 60)
            except BaseException as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 20
        while not sim.requests_to("users") and time.monotonic() < deadline:
            time.sleep(0.05)
        aborted = time.monotonic()
        child.abort()
        worker.join(10)
        assert not worker.is_alive() and time.monotonic() - aborted < 3
        error = outcome["error"]
        assert isinstance(error, SourceError) and error.reason == "timeout"
        assert not list(Path(scratch_root()).glob("ipx-refresh-*"))
    finally:
        sim.clear_faults()
        source.close()


def test_the_engine_refreshes_factory_sources_in_children_and_times_them_out(
    sim: GraphSimulator, ca_file: str, tmp_path: Path
) -> None:
    sim.tenants[tenant_data.TENANT_ID].users = tenant_data.users(50)
    config = _config(tmp_path, sim, ca_file, refresh_timeout="3s")
    source = _users(config)
    engine = Engine(config, {"e": [source]})
    try:
        engine.refresh("e", "entra")
        status = engine.snapshot().estates[0].sources["entra"]
        assert status.up and status.records == 50
        assert source.http_stats().requests[("users", "200")] == 1
        # The next refresh is incremental: in process, and bounded by the same deadline.
        sim.add_fault("usersDelta", sim.request_counts()["usersDelta"] + 1, "hang")
        started = time.monotonic()
        engine.refresh("e", "entra")
        status = engine.snapshot().estates[0].sources["entra"]
        assert not status.up and status.last_error is not None and "timeout" in status.last_error
        assert time.monotonic() - started < 8
    finally:
        sim.clear_faults()
        source.close()


def _report_niceness(connection: Any) -> None:
    connection.send(os.getpriority(os.PRIO_PROCESS, 0))


def test_the_forkserver_and_its_children_run_at_the_refresh_niceness() -> None:
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    context = _forkserver()
    pid = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert int(fields[16]) >= CHILD_NICENESS  # field 19 of stat: nice
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller  # not lowered here
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_report_niceness, args=(sender,), daemon=True)
    child.start()
    try:
        assert receiver.poll(30)
        assert receiver.recv() == CHILD_NICENESS  # not lowered twice
    finally:
        child.join(10)
