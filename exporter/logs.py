"""Logging in logfmt or JSON, with every configured secret masked as a last line of defence.

Sources keep secrets out of their messages themselves (exporter.secrets.SecretMask); the handler
here masks every rendered line again (message, arguments and traceback), so a secret that slipped
through, in a library's exception text for instance, still never reaches the log. Uncaught
exceptions of the main thread and of worker threads go through the same handler instead of
being printed raw to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterable
from types import TracebackType

from exporter.secrets import SecretMask

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
log = logging.getLogger("exporter")


class SecretMaskFilter(logging.Filter):
    """Renders a record's message and traceback now and replaces every secret in them."""

    def __init__(self, mask: SecretMask) -> None:
        super().__init__()
        self.mask = mask

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # wrong arguments for the format: log what we have rather than raise
            message = f"{record.msg!s} (unformattable arguments {record.args!r})"
        record.msg, record.args = self.mask.mask(message), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.mask.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask.mask(record.stack_info)
        return True


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _level_name(record: logging.LogRecord) -> str:
    return {"WARNING": "warn", "CRITICAL": "error"}.get(record.levelname, record.levelname.lower())


def _fields(record: logging.LogRecord) -> dict[str, str]:
    fields = {
        "ts": _timestamp(record),
        "level": _level_name(record),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    if record.exc_text:
        fields["err"] = record.exc_text
    if record.stack_info:
        fields["stack"] = record.stack_info
    return fields


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields.items())


def _logfmt_value(value: str) -> str:
    if value and not any(c in value for c in ' ="\n\t\\'):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return '"' + escaped + '"'


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), ensure_ascii=False)


def setup_logging(level: str, fmt: str, secrets: Iterable[str] | SecretMask = ()) -> SecretMask:
    """Send every log record to stderr in ``fmt`` with ``secrets`` masked; returns the mask in use
    (add a secret that becomes known later with ``mask.add([...])``)."""
    mask = secrets if isinstance(secrets, SecretMask) else SecretMask(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    handler.addFilter(SecretMaskFilter(mask))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    # Library chatter (msal, urllib3, ldap3) stays at warning unless debugging.
    for noisy in ("msal", "urllib3", "ldap3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    return mask


def _log_uncaught(
    kind: type[BaseException], error: BaseException, trace: TracebackType | None, where: str = "main thread"
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)
        return
    log.error("uncaught %s in the %s", kind.__name__, where, exc_info=(kind, error, trace))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "unknown"
    error = args.exc_value if args.exc_value is not None else args.exc_type()
    _log_uncaught(args.exc_type, error, args.exc_traceback, f"thread {name!r}")
