"""Command line: flags in the Prometheus exporter style, exit 2 on bad arguments or config."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.registry import CollectorRegistry

import exporter
from collectors import ExporterCollector, default_collectors
from exporter.config import Config, ConfigError, load_config
from exporter.engine import Engine
from exporter.httpserver import ExporterHTTPServer, parse_listen_address, serve_forever_in_thread
from exporter.logs import LEVELS, setup_logging
from exporter.memory import keep_large_blocks_mapped
from exporter.secrets import SecretMask
from exporter.snapshot import Snapshot
from exporter.sources.base import ConfigurationError, Source
from exporter.state import StateStore
from exporter.webapp import MetricsRenderer, build_app
from exporter.webconfig import WebConfigError, load_web_config

log = logging.getLogger("exporter")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
SWITCH_INTERVAL = 0.0002
STOP_POLL_INTERVAL = 0.25  # seconds: how soon the main thread notices a signal another thread took


class ArgumentParser(argparse.ArgumentParser):
    """Bad arguments exit 2 (the exporter convention), with the usage and the problem on stderr."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="intune-provisioning-exporter",
        description="Prometheus exporter for the hybrid AD -> Entra ID -> ConfigMgr -> Intune provisioning "
        "pipeline and Microsoft 365 license usage.",
    )
    parser.add_argument("--config.file", dest="config_file", default="config.yml", metavar="PATH")
    parser.add_argument("--web.listen-address", dest="listen_address", default=":9863", metavar="HOST:PORT")
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default=None,
        metavar="PATH",
        help="exporter-toolkit web config (TLS, bcrypt basic auth)",
    )
    parser.add_argument(
        "--config.check",
        dest="config_check",
        action="store_true",
        help="validate the config file, print every problem and exit 0 or 2",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run on the embedded simulated estate (no config file, no backend)",
    )
    parser.add_argument(
        "--demo.time-scale",
        dest="demo_time_scale",
        type=float,
        default=1.0,
        metavar="N",
        help="in --demo, let simulated time run N times faster than the wall clock",
    )
    parser.add_argument("--log.level", dest="log_level", default="info", choices=list(LEVELS))
    parser.add_argument("--log.format", dest="log_format", default="logfmt", choices=["logfmt", "json"])
    parser.add_argument("--version", action="version", version=f"%(prog)s {exporter.__version__}")
    return parser


def build_sources(config: Config) -> dict[str, list[Source]]:
    # Imported here so that --help, --config.check and --demo never load the backend libraries.
    from exporter.sources.factory import build_estate_sources

    return {estate.name: build_estate_sources(estate) for estate in config.estates}


def check_config(path: str) -> int:
    """Validate the file and build (but never connect) every source client, which catches what
    only the clients can check: unreadable CA files, certificates that do not match a thumbprint."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    mask = SecretMask(config.secrets())
    try:
        sources = build_sources(config)
    except ConfigurationError as exc:
        print(f"{path}: {mask.mask(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a client library refusing a value the schema let through: still the config's
        reason = f"{type(exc).__name__}: {mask.mask(str(exc))}"
        print(f"{path}: cannot build the clients: {reason}", file=sys.stderr)
        return EXIT_USAGE
    for estate_sources in sources.values():
        for source in estate_sources:
            source.close()
    print(f"{path}: OK")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["trace"]:
        from exporter.trace import main as trace_main

        return trace_main(arguments[1:])
    args = build_parser().parse_args(arguments)
    max_time_scale = 1e6  # a simulated day in 0.09 s; beyond that timestamps leave any sane range
    if not 0 < args.demo_time_scale <= max_time_scale:  # NaN fails every comparison
        print(
            f"--demo.time-scale: must be a number greater than 0 and at most {max_time_scale:g}, "
            f"got {args.demo_time_scale:g}",
            file=sys.stderr,
        )
        return EXIT_USAGE

    if args.config_check:
        return check_config(args.config_file)

    # No garbage collection while the exporter starts: importing the source libraries after the
    # listener opens made full collections of 35-51 ms while the first scrapes were being answered,
    # and they would have found nothing to free. serve() turns it on once the start is done.
    gc.disable()
    try:
        return serve(args)
    finally:
        gc.enable()


def serve(args: argparse.Namespace) -> int:
    """The exporter itself: listen, build the sources and the engine, run until SIGTERM/SIGINT."""
    try:
        address = parse_listen_address(args.listen_address)
        web_config = load_web_config(args.web_config_file)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except WebConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE

    clock = None
    history = None
    sources: dict[str, list[Source]] | None = None
    if args.demo:
        from exporter.demo import demo_setup
        from exporter.demo.child import simulate_in_child

        config, sources, clock, history = demo_setup(time_scale=args.demo_time_scale)
        simulate_in_child(sources)  # forked now, while this process has no other thread
        setup_logging(args.log_level, args.log_format)
        log.info("running on the embedded demo estate (time scale %g)", args.demo_time_scale)
    else:
        try:
            config = load_config(args.config_file)
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"{args.config_file}: {problem}", file=sys.stderr)
            return EXIT_USAGE
        setup_logging(args.log_level, args.log_format, config.secrets())

    # Serve before the source clients are built (their libraries take a while to import) and before
    # the state file is read: /-/healthy answers at once, /-/ready says 503 until the engine is ready.
    engines: list[Engine] = []
    starting = Snapshot(estates=(), taken_at=time.time(), restoring=True)

    def snapshot() -> Snapshot:
        return engines[0].snapshot() if engines else starting

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(snapshot, default_collectors(config.stuck_users_listed)))
    # The exporter's own memory, CPU and garbage collection (a 500k-user estate must show its RSS).
    runtime = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=runtime)
    PlatformCollector(registry=runtime)
    GCCollector(registry=runtime)
    metrics_renderer = MetricsRenderer(registry, snapshot, runtime)
    app = build_app(metrics_renderer, snapshot, config.user_label)
    # Work in the background (importing the source libraries right after this, later the decoding
    # of incremental reads, reading tables back, evaluations) holds the GIL; a serving thread that
    # waits for it waits up to one switch interval per hand-over, several per request, and the
    # accepting thread pays it once per connection of a burst (benchmarks/bench_convoy.py: twenty new
    # connections against a pure-Python background thread, slowest of a burst 98 ms at CPython's
    # 5 ms, 28 ms at 1 ms, 13-19 ms at 0.2 ms). The shorter interval costs the background work only
    # while a serving thread is waiting for the GIL.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        server = ExporterHTTPServer(address, app, web_config)
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.listen_address, exc.strerror or exc)
        return EXIT_FAILURE
    serve_forever_in_thread(server)

    if sources is None:
        try:
            sources = build_sources(config)
        except ConfigurationError as exc:
            log.error("%s", exc)
            server.shutdown()
            server.server_close()
            return EXIT_USAGE
    engine = Engine(
        config,
        sources,
        state_store=StateStore(config.state_file) if config.state_file else None,
        first_seen=history,
        **({"clock": clock} if clock else {}),
    )
    engines.append(engine)

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    # What exists now (modules, config, clients) lives as long as the process: keep it out of every
    # garbage collection, so a full collection during a refresh stays short; collections were off
    # until now (see main).
    gc.freeze()
    gc.enable()
    keep_large_blocks_mapped()
    engine.start()
    threading.Thread(
        target=metrics_renderer.keep_warm, args=(stop,), name="metrics-warm", daemon=True
    ).start()
    scheme = server.scheme
    log.info(
        "intune-provisioning-exporter %s listening on %s://%s:%d (%d estate(s))",
        exporter.__version__,
        scheme,
        *address,
        len(config.estates),
    )
    # Not one unbounded wait: Python runs signal handlers in the main thread only, and a SIGTERM the
    # kernel delivers to another thread (any thread may take a process-directed signal) does not wake a
    # main thread blocked on a lock, so the handler would run only after some later signal. An exporter
    # left running 30 s after its SIGTERM was seen twice (tests/test_restart.py, a restart benchmark).
    while not stop.wait(STOP_POLL_INTERVAL):
        pass
    server.shutdown()
    server.server_close()
    engine.stop()
    log.info("stopped")
    return EXIT_OK
