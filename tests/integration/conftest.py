"""Session fixtures of the acceptance tests: the hybrid estates on the real backends, built once and
shared by test_hybrid_acceptance.py, test_trace_cli.py and test_cloud_acceptance.py (which runs the
``hq`` estate again next to a cloud estate).

The exporter runs once over both hybrid estates (behind basic auth); everything the tests check is
gathered while it runs, then it is stopped with SIGTERM so that its state file holds the first-seen
times the ``trace`` command then reads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ad.samba import SambaDC
from tests.entra import tenant_data
from tests.integration import hybrid_estate as he
from tests.integration.harness import (
    Exporter,
    Graph,
    Samples,
    require_sqlite_odbc,
    start_graph,
    write_web_config,
)

WEB_USER, WEB_PASSWORD = "prometheus", "scrape-Pa55-word"


@dataclass
class HybridBackends:
    graph: Graph
    bind_user: str
    estates: dict[str, he.BuiltEstate]
    samba_ca: str
    workdir: Path
    secret_file: Path
    env: dict[str, str]

    def estate_yaml(self, name: str, odbc_extra: str = "") -> str:
        return he.hybrid_estate_yaml(
            self.estates[name],
            bind_user=self.bind_user,
            samba_ca=self.samba_ca,
            graph=self.graph,
            secret_file=self.secret_file,
            odbc_extra=odbc_extra,
        )


@pytest.fixture(scope="session")
def acceptance_graph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Graph]:
    graph = start_graph(tmp_path_factory.mktemp("accept-graph"))
    yield graph
    graph.sim.stop()


@pytest.fixture(scope="session")
def hybrid_backends(
    samba_dc: SambaDC, acceptance_graph: Graph, tmp_path_factory: pytest.TempPathFactory
) -> HybridBackends:
    require_sqlite_odbc()
    workdir = tmp_path_factory.mktemp("accept-hybrid")
    bind_user, estates = he.build_estates(samba_dc, acceptance_graph, workdir)
    secret_file = workdir / "client-secret"
    secret_file.write_text(tenant_data.CLIENT_SECRET + "\n")
    return HybridBackends(
        graph=acceptance_graph,
        bind_user=bind_user,
        estates=estates,
        samba_ca=samba_dc.ca_file,
        workdir=workdir,
        secret_file=secret_file,
        env={"ACCEPT_AD_PASSWORD": he.SERVICE_PASSWORD},
    )


@dataclass
class HybridRun:
    backends: HybridBackends
    config: Path
    state_file: Path
    samples: Samples
    stuck: dict[str, Any]
    traces: dict[str, tuple[int, Any]]  # query -> (status, body) of /trace?format=json
    pages: dict[str, tuple[int, str]]  # label -> (status, body) of other requests
    log: str
    exit_code: int
    started_at: float  # just before the exporter started


# Queries whose /trace answer the tests check besides every in-scope sAMAccountName.
OUT_OF_SCOPE_QUERIES = ("h.off", "h.away", "nobody@test.local", "TEST\\h.away")


@pytest.fixture(scope="session")
def hybrid_run(hybrid_backends: HybridBackends) -> HybridRun:
    """Run the exporter over both hybrid estates, gather what it answers, stop it."""
    workdir = hybrid_backends.workdir
    state_file = workdir / "state.json"
    config = workdir / "config.yml"
    config.write_text(
        he.config_yaml(
            [hybrid_backends.estate_yaml(spec.name) for spec in he.ESTATES],
            state_file=state_file,
            user_label="sam",
        )
    )
    web_config = write_web_config(workdir, WEB_USER, WEB_PASSWORD)
    started_at = time.time()
    exporter = Exporter(
        config,
        workdir / "exporter.log",
        hybrid_backends.env,
        web_config=web_config,
        auth=(WEB_USER, WEB_PASSWORD),
    )
    try:
        exporter.wait_ready()
        samples = exporter.wait_evaluated([spec.name for spec in he.ESTATES])
        stuck = exporter.get_json("/stuck")
        queries = [s.sam for spec in he.ESTATES for s in spec.in_scope()] + list(OUT_OF_SCOPE_QUERIES)
        hq = hybrid_backends.estates["hq"]
        queries += [he.identifier(hq, sam, how) for _, sam, how in he.IDENTIFIERS]
        traces = {query: exporter.trace(query) for query in queries}
        pages = {
            "trace-html-stuck": exporter.get("/trace?user=h.upnmis"),
            "trace-html-unknown": exporter.get("/trace?user=nobody%40test.local"),
            "trace-no-auth": exporter.get("/trace?user=h.upnmis&format=json", auth=False),
            "trace-wrong-auth": exporter.get("/trace?user=h.upnmis&format=json", auth=(WEB_USER, "wrong")),
            "trace-unknown-no-auth": exporter.get("/trace?user=nobody&format=json", auth=False),
            "metrics-no-auth": exporter.get("/metrics", auth=False),
            "stuck-no-auth": exporter.get("/stuck", auth=False),
            "trace-estate-filter": exporter.get("/trace?user=b.pending&estate=hq&format=json"),
        }
    finally:
        exit_code = exporter.stop()
    return HybridRun(
        backends=hybrid_backends,
        config=config,
        state_file=state_file,
        samples=samples,
        stuck=stuck,
        traces=traces,
        pages=pages,
        log=exporter.log(),
        exit_code=exit_code,
        started_at=started_at,
    )
