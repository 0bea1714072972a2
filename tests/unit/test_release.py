"""Replaced tables are freed piece by piece by the releaser, only once nothing else refers to them."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable

import numpy as np

from exporter.release import Releaser, dismantle
from exporter.tables import Col, Table


class Kids(Table):
    COLUMNS = (Col("row", "i8"),)
    __slots__ = ()


class Parent(Table):
    COLUMNS = (Col("x", "f8"), Col("y", "i8"))
    CHILDREN = {"kids": Kids}
    __slots__ = ()


def parent(rows: int = 1000, kids: Kids | None = None) -> Parent:
    if kids is None:
        kids = Kids({"row": np.arange(rows, dtype=np.int64)})
    return Parent({"x": np.ones(rows), "y": np.arange(rows, dtype=np.int64)}, children={"kids": kids})


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_table_still_referenced_elsewhere_stays_whole_until_that_reference_goes() -> None:
    releaser = Releaser(poll_interval=0.01)
    table = parent()
    table.cached("index", lambda: np.arange(1000))
    column, kid_column = weakref.ref(table.column("x")), weakref.ref(table.children["kids"].column("row"))
    releaser.release(table)
    time.sleep(0.2)  # twenty looks: the caller's reference is still there
    assert releaser.pending() == 1
    assert table.n == 1000 and float(table.array("x").sum()) == 1000.0
    assert table.children["kids"].n == 1000 and table.cached("index", lambda: None) is not None
    del table
    assert eventually(lambda: releaser.pending() == 0)
    gc.collect()
    assert column() is None and kid_column() is None


def test_pieces_shared_with_the_new_table_survive() -> None:
    releaser = Releaser(poll_interval=0.01)
    old = parent()
    new = Parent({"x": old.column("x"), "y": np.zeros(1000, dtype=np.int64)}, children=dict(old.children))
    releaser.release(old)
    del old
    assert eventually(lambda: releaser.pending() == 0)
    assert float(new.array("x").sum()) == 1000.0
    assert new.children["kids"].n == 1000 and int(new.children["kids"].array("row")[-1]) == 999


def test_a_table_referenced_elsewhere_for_too_long_is_let_go_intact() -> None:
    releaser = Releaser(poll_interval=0.01, give_up_after=0.1)
    table = parent()
    releaser.release(table)
    assert eventually(lambda: releaser.pending() == 0)
    assert table.n == 1000 and table.column("x") is not None and table.children["kids"].n == 1000


def test_dismantle_drops_every_piece() -> None:
    table = parent()
    table.cached("index", lambda: np.arange(10))
    pieces = [weakref.ref(table.column("x")), weakref.ref(table.children["kids"].column("row"))]
    dismantle(table)
    assert not table.children and not table.columns()
    gc.collect()
    assert all(piece() is None for piece in pieces)
