"""Shared test helpers.

Tests that need a real component (Samba AD DC, PostgreSQL, ODBC drivers, Prometheus, Alertmanager,
promtool) call :func:`require_component`. On a developer machine a missing component skips the
test; with ``CI=true`` it fails, so CI can never pass by skipping the real tests.
"""

from __future__ import annotations

import os
import shutil

import pytest


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
