"""Shared test helpers.

Tests that need a real component (Samba AD DC, PostgreSQL, ODBC drivers, Prometheus, Alertmanager,
promtool) call :func:`require_component`. On a developer machine a missing component skips the
test; with ``CI=true`` it fails, so CI can never pass by skipping the real tests.

Session fixtures of servers that can only run once per machine live here, so that every test
directory shares the one instance: ``samba_dc`` (the Samba AD DC on the fixed ports 389/636) is used
by ``tests/ad`` and ``tests/integration``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.ad.samba import SambaDC


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_component(name: str, available: bool, hint: str = "") -> None:
    if available:
        return
    message = f"{name} is not available{': ' + hint if hint else ''} (scripts/test.sh installs it)"
    if in_ci():
        pytest.fail(f"CI=true and a required component is missing: {message}", pytrace=False)
    pytest.skip(message)


def require_executable(name: str, hint: str = "") -> str:
    path = shutil.which(name)
    require_component(name, path is not None, hint)
    assert path is not None
    return path


@pytest.fixture(scope="session")
def samba_dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDC]:
    """The one Samba AD DC of the test session (fixed ports 389/636: two cannot run at once)."""
    # Imported here so that test directories without AD never load ldap3 or trustme.
    from tests.ad.samba import run_samba_dc

    yield from run_samba_dc(tmp_path_factory)
