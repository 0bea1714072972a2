"""Refreshes in a child process: a full read never competes with scrapes for the GIL.

A full read of a 500,000-user source is tens of seconds of decoding in Python. In the serving
process every such second is taken from the threads that answer ``/metrics`` (one GIL), and the
three sources' reads take it from each other, so a scrape that arrives during a refresh waits
behind them (p99 in the hundreds of milliseconds) and the reads share one core. So the engine runs
the refreshes that decode a whole backend in a child process, from where only the finished table
comes back:

- the child is forked from a ``forkserver`` (a clean single-threaded process started once, with
  the source modules imported), never from the threaded exporter itself;
- it builds the same source from the estate's config (:class:`Recipe`, set by the factory), runs
  ``refresh(previous, deadline)`` and writes the table in the state file's table format
  (:func:`exporter.state.write_table`) to a private scratch directory (``/dev/shm`` when there is
  one: memory, no disk); the parent reads it back and computes the join indexes;
- its log records are sent to the parent and logged there (same format, same secret masking); its
  Graph request statistics and the little a source remembers between refreshes (warnings given
  once, the NetBIOS name it discovered, group names) come back with the result;
- a deadline, an abort or the engine stopping kills the child: nothing of it is left to clean up
  in the serving process; and a child ends by itself when the exporter process is gone, even
  killed with SIGKILL (it watches the exporter's pidfd).

What runs where is the source's choice (``child_refresh``): ConfigMgr always refreshes in a child
(a change means a full read) with only the previous table's meta (its change check), and compares
the result with the held table in the parent (``settle``); AD users always refresh in a child too:
an incremental read is given only the held table's meta (its DC, USN and containers, marked
``CHANGES_ONLY``) and hands back only the users that changed plus the objectGUIDs that left, which
the parent merges into the held table (``settle``), so the decoding of a change set never runs
beside the serving threads and shipping costs what the change costs, not the table (shipping the
whole table both ways cost 6-8 CPU-seconds at 500,000 users). Entra users read in full in a child
and continue incrementally in the serving process: a delta item may carry only the properties that
changed, merged with the held user. Intune devices are always read in full.
Sources the factory did not build (the demo, test fakes) have no recipe and refresh in process.

The price: a fork per refresh, one extra token request per Graph refresh (the child has its own
token cache) and writing and reading the table once more (memory speed, a fraction of a second at
500,000 users). In exchange the serving process only reads finished tables, and the sources read
on both cores.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import select
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from exporter.config import EstateConfig
from exporter.model import SOURCE_REGISTRY, HttpStats, SourceData, SourceKind
from exporter.sources.base import Source, SourceError, http_stats_of
from exporter.tables import Table, defer_prepare

log = logging.getLogger(__name__)

# What the forkserver imports once, so that each child starts with the libraries loaded.
_PRELOAD = [
    "exporter.sources.isolated",
    "exporter.sources.factory",
    "exporter.sources.ad",
    "exporter.sources.entra",
    "exporter.sources.devices",
    "exporter.sources.configmgr",
    "exporter.state",
]
_SCRATCH_PREFIX = "ipx-refresh-"
_KILL_WAIT = 2.0  # seconds to wait for a killed child to be gone
CHILD_NICENESS = 10  # scheduler weight ~1/10 of the serving process's
# In the meta of the table a child is given: hand back only the changes (see the module doc). Such a
# result always comes back as a table, even an empty one: "nothing changed" is the parent's to say.
CHANGES_ONLY = "changes_only"


@dataclass(frozen=True)
class Recipe:
    """How a child process builds the same source: the estate's config and the source's kind."""

    estate: EstateConfig
    kind: SourceKind


@runtime_checkable
class ChildPlan(Protocol):
    def child_refresh(self, previous: SourceData | None) -> tuple[bool, SourceData | None]:
        """Whether this refresh runs in a child process, and what of ``previous`` it is given."""
        ...


@runtime_checkable
class Settles(Protocol):
    def settle(self, previous: SourceData | None, result: SourceData) -> SourceData:
        """The data to keep, given what a child read (e.g. ``previous`` when nothing changed)."""
        ...


@runtime_checkable
class CarriesOver(Protocol):
    def carry_over(self) -> dict[str, Any]:
        """What this source remembers between refreshes (picklable)."""
        ...

    def take_over(self, memory: dict[str, Any]) -> None: ...


def recipe_of(source: Source) -> Recipe | None:
    recipe = getattr(source, "isolation_recipe", None)
    return recipe if isinstance(recipe, Recipe) and isolation_available() else None


def isolation_available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def plan(source: Source, previous: SourceData | None) -> tuple[bool, SourceData | None]:
    """(run in a child, previous for it) for the next refresh of a source that has a recipe."""
    if isinstance(source, ChildPlan):
        return source.child_refresh(previous)
    return previous is None, None


_context_lock = threading.Lock()
_context: Any = None


def _forkserver() -> Any:
    global _context
    with _context_lock:
        if _context is None:
            remove_stale_scratch()  # once per process, before its first child
            context = multiprocessing.get_context("forkserver")
            # Never '__main__' (the default): the exporter's entry point is no module to re-run.
            context.set_forkserver_preload(_PRELOAD)
            _context = context
    _ensure_forkserver_running()
    return _context


def _ensure_forkserver_running() -> None:
    """Start the forkserver (with multiprocessing's resource tracker) unless it runs, from a thread
    at CHILD_NICENESS: a process inherits the niceness of the thread that forks it (Linux sets it per
    thread), so the forkserver's import of the source libraries (half a CPU-second, while the first
    scrapes arrive) and every child forked from it come second to the serving threads. Nothing else
    runs in that thread, which ends with the start. A running forkserver costs a thread start here."""
    failure: list[BaseException] = []

    def start() -> None:
        try:
            lower_priority(threading.get_native_id())
            multiprocessing.forkserver.ensure_running()
        except BaseException as exc:  # raised again in the refresh's thread
            failure.append(exc)

    thread = threading.Thread(target=start, name="forkserver-start", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def lower_priority(task: int = 0) -> None:
    """Give ``task`` (a thread id on Linux; 0: the calling process) at least CHILD_NICENESS."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, task, max(CHILD_NICENESS, os.getpriority(os.PRIO_PROCESS, task)))


def scratch_root() -> str:
    """Where the tables cross: memory-backed /dev/shm when writable, else the temporary directory."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


def remove_stale_scratch() -> None:
    """Scratch directories of exporter processes that no longer run (killed mid-refresh)."""
    root = Path(scratch_root())
    for directory in root.glob(f"{_SCRATCH_PREFIX}*"):
        pid = directory.name[len(_SCRATCH_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ============================================================================== the parent side
class ChildRefresh:
    """One refresh of one source in a child process (see the module docstring).

    ``run`` blocks until the child answers, fails, is aborted (``abort`` from another thread) or
    ``stop`` is set; then the child is gone.
    """

    def __init__(self, source: Source, recipe: Recipe, stop: threading.Event | None = None) -> None:
        self.source = source
        self.recipe = recipe
        self._stop = stop
        self._lock = threading.Lock()
        self._process: Any = None
        self._aborted = False

    def run(
        self, previous: SourceData | None, child_previous: SourceData | None, deadline: float
    ) -> SourceData:
        scratch = tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=scratch_root())
        try:
            answer = self._run_child(Path(scratch), child_previous, deadline)
            return self._result(answer, Path(scratch), previous, child_previous)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def abort(self) -> None:
        """Kill the child (the refresh then fails with reason timeout)."""
        with self._lock:
            self._aborted = True
            process = self._process
        if process is not None:
            _kill(process)

    # -- running the child
    def _run_child(
        self, scratch: Path, child_previous: SourceData | None, deadline: float
    ) -> tuple[Any, ...]:
        from exporter.state import write_table

        previous_spec = None
        if isinstance(child_previous, Table):
            path = scratch / "previous.tbl"
            write_table(path, child_previous)
            previous_spec = (str(path), dict(child_previous.meta))
        memory = self.source.carry_over() if isinstance(self.source, CarriesOver) else None
        context = _forkserver()
        receiver, sender = context.Pipe(duplex=False)
        result_path = str(scratch / "result.tbl")
        process = context.Process(
            target=child_main,
            args=(sender, self.recipe, previous_spec, result_path, deadline, _levels(), memory, os.getpid()),
            name=f"refresh-{self.recipe.estate.name}-{self.recipe.kind}",
            daemon=True,
        )
        with self._lock:
            if self._aborted:
                raise self._aborted_error()
            process.start()
            self._process = process
        sender.close()
        try:
            return self._answer(receiver, process)
        finally:
            receiver.close()
            with self._lock:
                self._process = None
            _kill(process)

    def _answer(self, receiver: Any, process: Any) -> tuple[Any, ...]:
        """The child's final message, relaying its log records meanwhile."""
        while True:
            ready = multiprocessing.connection.wait([receiver, process.sentinel], timeout=0.25)
            if self._stop is not None and self._stop.is_set():
                _kill(process)
                raise SourceError("other", f"{self.source.describe()}: the exporter is stopping")
            if receiver in ready:
                try:
                    message = receiver.recv()
                except (EOFError, OSError):
                    message = None
                if message is not None and message[0] == "log":
                    _relog(message[1])
                    continue
                if message is not None:
                    return tuple(message)
            elif not ready:
                continue
            # The child ended without an answer: killed (abort, deadline) or crashed.
            process.join(_KILL_WAIT)
            if self._aborted:
                raise self._aborted_error()
            raise SourceError(
                "other",
                f"{self.source.describe()}: the refresh process ended without a result "
                f"(exit code {process.exitcode})",
            )

    def _aborted_error(self) -> SourceError:
        return SourceError("timeout", f"{self.source.describe()}: the refresh was aborted at its deadline")

    # -- the answer
    def _result(
        self,
        answer: tuple[Any, ...],
        scratch: Path,
        previous: SourceData | None,
        child_previous: SourceData | None,
    ) -> SourceData:
        what, state = answer[0], answer[-1]
        self._take_state(state)
        if what == "error":
            raise SourceError(answer[1], answer[2])
        if what == "data":  # small data (the organization): pickled as it is
            data: SourceData = answer[1]
        elif what in ("same", "meta"):
            # Nothing read changed the data the child was given (or only its meta): keep what is held.
            if not isinstance(previous, Table) or child_previous is None:
                raise SourceError("other", f"{self.source.describe()}: the child kept data it was not given")
            data = previous
            if what == "meta":
                meta = {**previous.meta, **answer[1]}
                data = previous.derive(previous.columns(), previous.children, meta)
        else:
            from exporter.state import read_table

            data_type = SOURCE_REGISTRY[self.recipe.kind].data_type
            table = read_table(scratch / "result.tbl", data_type)
            (scratch / "result.tbl").unlink()
            table.meta.update(answer[1])
            data = table  # type: ignore[assignment]
        if isinstance(self.source, Settles):
            data = self.source.settle(previous, data)
        prepare = getattr(data, "prepare", None)
        return prepare() if callable(prepare) else data

    def _take_state(self, state: tuple[HttpStats | None, dict[str, Any] | None]) -> None:
        stats, memory = state
        if stats is not None:
            client = getattr(self.source, "client", None)
            absorb = getattr(client, "absorb", None)
            if callable(absorb):
                absorb(stats)
        if memory is not None and isinstance(self.source, CarriesOver):
            self.source.take_over(memory)


def _kill(process: Any) -> None:
    if process.is_alive():
        with contextlib.suppress(OSError, ValueError):
            process.kill()
    with contextlib.suppress(OSError, ValueError, AssertionError):
        process.join(_KILL_WAIT)


def _levels() -> dict[str, int]:
    """The parent's log levels, for the child to filter by before sending records over."""
    names = ["", "msal", "urllib3", "ldap3"]
    return {name: logging.getLogger(name or None).getEffectiveLevel() for name in names}


def _relog(fields: dict[str, Any]) -> None:
    record = logging.makeLogRecord(fields)
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


# ============================================================================== the child side
class _PipeHandler(logging.Handler):
    """Sends each record (rendered: message, traceback) to the parent."""

    def __init__(self, connection: Any) -> None:
        super().__init__()
        self._connection = connection
        self._send_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": record.getMessage(),
                "args": None,
                "created": record.created,
                "msecs": record.msecs,
                "exc_text": logging.Formatter().formatException(record.exc_info) if record.exc_info else None,
            }
            with self._send_lock:
                self._connection.send(("log", fields))
        except Exception:  # the parent is gone: nothing to tell
            pass


def child_main(
    connection: Any,
    recipe: Recipe,
    previous_spec: tuple[str, dict[str, Any]] | None,
    result_path: str,
    deadline: float,
    levels: dict[str, int],
    memory: dict[str, Any] | None,
    exporter_pid: int,
) -> None:
    """The child process: build the source, refresh, hand the result over (see the module doc)."""
    _end_with_exporter(exporter_pid)
    defer_prepare()  # the indexes are not handed over: the parent builds them from the result
    # A refresh is batch work: when both compete for a core, the serving process comes first. (The
    # forkserver runs at this niceness already; a forkserver started by an older exporter may not.)
    lower_priority()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_PipeHandler(connection))
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)
    source: Source | None = None
    try:
        from exporter.sources.factory import build_source

        source = build_source(recipe.estate, recipe.kind)
        if memory is not None and isinstance(source, CarriesOver):
            source.take_over(memory)
        previous = _read_previous(previous_spec, recipe.kind)
        try:
            data = source.refresh(previous, deadline)
        except SourceError as exc:
            connection.send(("error", exc.reason, exc.message, _state(source)))
            return
        connection.send(_answer(data, previous, Path(result_path), _state(source)))
    except BaseException as exc:  # every failure must reach the parent as an answer
        log.debug("refresh of %s failed", recipe.kind, exc_info=exc)
        with contextlib.suppress(Exception):
            message = f"unexpected {type(exc).__name__}: {exc}"
            connection.send(("error", "other", message, _state(source)))
    finally:
        if source is not None:
            with contextlib.suppress(Exception):
                source.close()
        connection.close()


def _end_with_exporter(exporter_pid: int) -> None:
    """End this child as soon as the exporter process is gone (even by SIGKILL): a refresh must
    never outlive it, hold its stderr or keep a backend busy. Not through the forkserver's end:
    every child holds the forkserver's liveness pipe, so the forkserver lives as long as they do."""

    def watch() -> None:
        try:
            with contextlib.closing(_PidFd(exporter_pid)) as exporter:
                exporter.wait()
        except OSError:  # no pidfd (old kernel): poll instead
            while _alive(exporter_pid) and os.getppid() != 1:
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exporter-watch", daemon=True).start()


class _PidFd:
    """A process's pidfd (Linux 5.3+): readable when the process ends."""

    def __init__(self, pid: int) -> None:
        self.fd = os.pidfd_open(pid)

    def wait(self) -> None:
        select.select([self.fd], [], [])

    def close(self) -> None:
        os.close(self.fd)


def _read_previous(spec: tuple[str, dict[str, Any]] | None, kind: SourceKind) -> SourceData | None:
    if spec is None:
        return None
    from exporter.state import read_table

    path, meta = spec
    table = read_table(Path(path), SOURCE_REGISTRY[kind].data_type)
    table.meta.update(meta)
    with contextlib.suppress(OSError):
        os.unlink(path)
    return table  # type: ignore[return-value]


def _answer(data: SourceData, previous: SourceData | None, path: Path, state: Any) -> tuple[Any, ...]:
    from exporter.state import content_key, write_table

    if not isinstance(data, Table):
        return ("data", data, state)
    if previous is not None and data is previous:
        return ("same", state)
    if (
        isinstance(previous, Table)
        and type(data) is type(previous)
        and not data.meta.get(CHANGES_ONLY)
        and content_key(data) == content_key(previous)
    ):
        return ("meta", dict(data.meta), state)
    write_table(path, data)
    return ("table", dict(data.meta), state)


def _state(source: Source | None) -> tuple[HttpStats | None, dict[str, Any] | None]:
    if source is None:
        return None, None
    memory = None
    if isinstance(source, CarriesOver):
        with contextlib.suppress(Exception):
            memory = source.carry_over()
    return http_stats_of(source), memory


__all__ = [
    "ChildRefresh",
    "Recipe",
    "child_main",
    "isolation_available",
    "plan",
    "recipe_of",
    "remove_stale_scratch",
    "scratch_root",
]
