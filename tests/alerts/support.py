"""Helpers for the alert-rule tests: rule files, processes on loopback, polling with a deadline."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
ALERTS_DIR = REPO_ROOT / "alerts"
RULE_TESTS_DIR = ALERTS_DIR / "tests"
RUNBOOKS = REPO_ROOT / "docs" / "runbooks.md"
EXAMPLES_DIR = REPO_ROOT / "examples"
RUNBOOK_BASE_URL = (
    "https://github.com/intune-provisioning-exporter/intune-provisioning-exporter/blob/main/docs/runbooks.md"
)
_T = TypeVar("_T")


def rule_files() -> list[Path]:
    return sorted(ALERTS_DIR.glob("*.rules.yml"))


def rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.yml"))


def rule_groups(path: Path) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    return groups


def all_rules() -> Iterator[dict[str, Any]]:
    for path in rule_files():
        for group in rule_groups(path):
            yield from group["rules"]


def alerting_rules() -> list[dict[str, Any]]:
    return [rule for rule in all_rules() if "alert" in rule]


def recording_rule_names() -> set[str]:
    return {rule["record"] for rule in all_rules() if "record" in rule}


_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_seconds(text: str) -> float:
    """Seconds in a Prometheus duration such as ``1h30m``."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    headings = re.findall(r"^#{1,6} +(.+?) *$", RUNBOOKS.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {github_anchor(heading) for heading in headings}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(probe: Callable[[], _T | None], timeout: float, what: str, interval: float = 0.2) -> _T:
    """Call ``probe`` until it returns something other than None/False; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = probe()
            if result is not None and result is not False:
                return result
        except (OSError, ValueError) as exc:  # not up yet, or half-written answers
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def http_get_json(url: str) -> Any:
    return json.loads(http_get(url))


def is_ready(url: str) -> bool:
    try:
        http_get(url, timeout=2.0)
    except OSError:
        return False
    return True


@dataclass
class ManagedProcess:
    """A server started for a test, with its output in a log file for failure messages."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(
        cls, name: str, command: Sequence[str], log_path: Path, cwd: Path | None = None
    ) -> ManagedProcess:
        log = log_path.open("wb")
        try:
            process = subprocess.Popen(
                list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd
            )
        finally:
            log.close()  # the child holds its own descriptor
        return cls(name, process, log_path)

    def wait_ready(self, url: str, timeout: float) -> None:
        def probe() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            return is_ready(url)

        try:
            wait_until(probe, timeout, f"{self.name} at {url}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"({self.name}: no log)"
        return f"--- last lines of {self.name}'s log ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
