"""The demo's simulation process answers exactly what the estates answer in process."""

from __future__ import annotations

import pickle

import pytest

from exporter.demo import demo_setup
from exporter.demo.child import simulate_in_child
from exporter.demo.common import DAY
from exporter.demo.sources import DemoGraphSource, DemoSource
from exporter.sources.base import SourceError

START = 1_764_000_000.0


def read_all(sources: dict[str, list[DemoSource]]) -> dict[tuple[str, str], object]:
    """Every source's read: its table's columns (pickled, to compare), or the error's reason."""
    results: dict[tuple[str, str], object] = {}
    for estate, estate_sources in sources.items():
        for source in estate_sources:
            try:
                data = source.refresh(None)
            except SourceError as exc:
                results[(estate, source.kind)] = ("error", exc.reason, str(exc))
                continue
            columns = data.columns() if hasattr(data, "columns") else data
            results[(estate, source.kind)] = (type(data).__name__, pickle.dumps(columns))
    return results


def test_reads_in_the_simulation_process_equal_reads_in_process():
    now = [START]
    _, in_process, _, _ = demo_setup(clock=lambda: now[0], seed=3)
    _, in_child, _, _ = demo_setup(clock=lambda: now[0], seed=3)
    simulation = simulate_in_child(in_child)
    errors = []
    try:
        # Later reads see hires made since (the estate's people list grows in the child), and the
        # fabrikam ConfigMgr fails every sixth read with a timeout, in both.
        for offset in (0.0, 0.5 * DAY, 3 * DAY, 3 * DAY, 3 * DAY, 3 * DAY, 3 * DAY, 9 * DAY):
            now[0] = START + offset
            expected, actual = read_all(in_process), read_all(in_child)
            assert actual.keys() == expected.keys()
            for key in expected:
                assert actual[key] == expected[key], key
            errors += [result for result in actual.values() if result[0] == "error"]  # type: ignore[index]
        assert errors and all(reason == "timeout" for _, reason, _ in errors)  # the timeouts came through
        for estate_sources in in_child.values():
            for source in estate_sources:
                if isinstance(source, DemoGraphSource):
                    twin = next(s for s in in_process[source.estate.name] if s.kind == source.kind)
                    assert source.http_stats() == twin.http_stats()  # counted in the child, seen here
    finally:
        simulation.close()


def test_a_gone_simulation_process_is_a_source_error():
    _, sources, _, _ = demo_setup(clock=lambda: START, seed=1)
    simulate_in_child(sources).close()
    with pytest.raises(SourceError, match="simulation process is gone") as raised:
        sources["contoso"][0].refresh(None)
    assert raised.value.reason == "other"
