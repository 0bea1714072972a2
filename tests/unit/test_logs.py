"""Log output as operators read it: logfmt and JSON lines, levels, and no secret in any line."""

from __future__ import annotations

import json
import logging
import sys
import threading

import pytest

from exporter.logs import setup_logging
from exporter.secrets import SecretMask

SECRET = "Sup3r-Secret-Pa55"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level, hook, thread_hook = list(root.handlers), root.level, sys.excepthook, threading.excepthook
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hook, thread_hook


def lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line]


def test_logfmt_line_has_time_level_logger_and_quoted_message(restore_logging, capsys):
    setup_logging("info", "logfmt")
    logging.getLogger("exporter.engine").warning('refresh of "ad" failed\tafter %d s', 3)
    (line,) = lines(capsys)
    fields = line.split(" ", 3)
    assert fields[0].startswith("ts=") and fields[0].endswith("Z")
    assert fields[1:3] == ["level=warn", "logger=exporter.engine"]
    assert fields[3] == 'msg="refresh of \\"ad\\" failed\\tafter 3 s"'


def test_json_line_is_one_object_per_record(restore_logging, capsys):
    setup_logging("debug", "json")
    logging.getLogger("exporter").debug("über %s", "ready")
    (line,) = lines(capsys)
    record = json.loads(line)
    assert record["level"] == "debug" and record["msg"] == "über ready" and record["logger"] == "exporter"
    assert set(record) == {"ts", "level", "logger", "msg"}


def test_levels_filter_and_library_chatter_stays_quiet(restore_logging, capsys):
    setup_logging("warn", "logfmt")
    logging.getLogger("exporter").info("not shown")
    logging.getLogger("exporter").error("shown")
    logging.getLogger("exporter").critical("also shown")
    assert [line.split(" ")[1] for line in lines(capsys)] == ["level=error", "level=error"]
    setup_logging("info", "logfmt")
    logging.getLogger("urllib3").info("connection pool chatter")
    assert lines(capsys) == []


def test_secrets_are_masked_in_messages_arguments_and_tracebacks(restore_logging, capsys):
    setup_logging("info", "json", [SECRET, "ab"])
    log = logging.getLogger("exporter.sources.ad")
    log.warning("bind with %s failed", SECRET)
    log.warning("password was " + SECRET)
    try:
        raise ValueError(f"server said: invalid credentials {SECRET!r} (PWD=ab;)")
    except ValueError:
        log.exception("refresh failed")
    log.info("stack", stack_info=True, extra={"unused": SECRET})
    output = capsys.readouterr().err
    assert SECRET not in output
    assert "PWD=ab;" not in output and "PWD=<secret>;" in output
    records = [json.loads(line) for line in output.splitlines()]
    assert records[0]["msg"] == "bind with <secret> failed"
    assert "ValueError: server said: invalid credentials '<secret>'" in records[2]["err"]
    assert "stack" in records[3]


def test_secret_forms_and_late_additions_are_masked(restore_logging, capsys):
    mask = setup_logging("info", "logfmt", SecretMask(["p}w;1"]))
    mask.add(["generated-user-label-key"])
    logging.getLogger("exporter").info("conn PWD={p}}w;1} key generated-user-label-key")
    (line,) = lines(capsys)
    assert "p}w" not in line and "generated-user-label-key" not in line
    assert line.endswith('msg="conn PWD=<secret> key <secret>"')


def test_bad_format_arguments_still_log_a_line(restore_logging, capsys):
    setup_logging("info", "logfmt", [SECRET])
    logging.getLogger("exporter").info("two %s %s", SECRET)
    (line,) = lines(capsys)
    assert "unformattable arguments" in line and SECRET not in line


def test_uncaught_exception_in_a_thread_is_logged_masked(restore_logging, capsys):
    setup_logging("info", "json", [SECRET])

    def crash() -> None:
        raise RuntimeError(f"token {SECRET} expired")

    thread = threading.Thread(target=crash, name="refresh-contoso-ad")
    thread.start()
    thread.join()
    (line,) = lines(capsys)
    record = json.loads(line)
    assert record["level"] == "error"
    assert record["msg"] == "uncaught RuntimeError in the thread 'refresh-contoso-ad'"
    assert "RuntimeError: token <secret> expired" in record["err"] and SECRET not in line
