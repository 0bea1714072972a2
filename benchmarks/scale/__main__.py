"""Command line of the scale benchmark (see docs/scale.md).

python -m benchmarks.scale run --users 100000          # the whole measurement
python -m benchmarks.scale generate --users 100000     # only the estate files and truth.json
python -m benchmarks.scale serve --users 10000         # the three servers and a config, until Ctrl-C
python -m benchmarks.scale table a.json b.json         # Markdown table of runs written with --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path

from benchmarks.scale.estate import EstateParams, load_or_generate


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, required=True, help="AD accounts to generate (N)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, help="default /tmp/intune-scale/<users>")
    parser.add_argument("--connector-critical", action="store_true", help="SMS_CLOUD_USERSYNC critical")
    parser.add_argument(
        "--discovery-critical", action="store_true", help="SMS_AD_USER_DISCOVERY_AGENT critical"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="build, serve, drive the exporter, measure, check")
    _add_common(run)
    run.add_argument("--refresh-interval", type=float, help="seconds (default 60 + users/2000)")
    run.add_argument("--scrapers", type=int, default=20, help="concurrent /metrics scrapers (0: none)")
    run.add_argument("--scrape-every", type=float, default=1.0, help="seconds between scrape bursts")
    run.add_argument("--quiet-seconds", type=float, default=15.0, help="quiet window before the change set")
    run.add_argument("--no-solo", dest="solo", action="store_false", help="skip the one-source runs")
    run.add_argument("--no-floor", dest="floor", action="store_false", help="skip the decoding floor")
    run.add_argument("--no-restart", dest="restart", action="store_false", help="skip the restarts")
    run.add_argument("--no-churn", dest="churn", action="store_false", help="skip the 1%% change set")
    run.add_argument("--exporter-src", type=Path, help="run the exporter from this source tree")
    run.add_argument("--exporter-rev", help="run the exporter of this git revision (git archive)")
    run.add_argument(
        "--no-declare-fetch",
        dest="declare_fetch",
        action="store_false",
        help="no UseDeclareFetch=1: psqlODBC then reads every result set into memory at once",
    )
    run.add_argument(
        "--backend-nice",
        type=int,
        default=10,
        help="niceness of slapd, PostgreSQL, the Graph simulator and the change set (0: equal footing)",
    )
    run.add_argument(
        "--no-backend-idle",
        dest="backend_idle",
        action="store_false",
        help="servers and change set in the normal scheduling class, not SCHED_IDLE",
    )
    run.add_argument("--json", dest="json_out", type=Path, help="also write the results as JSON")
    generate = commands.add_parser("generate", help="only write the estate files and truth.json")
    _add_common(generate)
    serve = commands.add_parser("serve", help="start the servers and write an exporter config, until Ctrl-C")
    _add_common(serve)
    table = commands.add_parser("table", help="a Markdown table comparing the --json files of runs")
    table.add_argument("results", nargs="+", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "table":
        from benchmarks.scale.report import comparison_table

        documents = [json.loads(path.read_text()) for path in args.results]
        print("\n".join(comparison_table(documents)))
        return 0
    params = EstateParams(args.users, args.seed, args.connector_critical, args.discovery_critical)
    directory = args.data_dir or Path(f"/tmp/intune-scale/{args.users}")
    if args.command == "generate":
        document = load_or_generate(params, directory / "estate")
        print(json.dumps(document["truth"], indent=1))
        return 0
    if args.command == "serve":
        return serve(params, directory)
    from benchmarks.scale.run import Options, run

    options = Options(
        users=args.users,
        seed=args.seed,
        data_dir=args.data_dir,
        refresh_interval=args.refresh_interval,
        scrapers=args.scrapers,
        scrape_every=args.scrape_every,
        quiet_seconds=args.quiet_seconds,
        solo=args.solo,
        floor=args.floor,
        restart=args.restart,
        churn=args.churn,
        exporter_src=args.exporter_src,
        exporter_rev=args.exporter_rev,
        declare_fetch=args.declare_fetch,
        connector_critical=args.connector_critical,
        discovery_critical=args.discovery_critical,
        json_out=args.json_out,
        backend_nice=args.backend_nice,
        backend_idle=args.backend_idle,
    )
    results = run(options)
    return 0 if all(check.ok for check in results.checks) else 1


def serve(params: EstateParams, directory: Path) -> int:
    """The servers with the estate, and an exporter config for them, for trying things by hand."""
    from benchmarks.scale.exporter_proc import config_document, write_config
    from benchmarks.scale.run import running_servers, say

    document = load_or_generate(params, directory / "estate", log=say)
    with running_servers(directory, directory / "estate", int(document["highest_usn"])) as servers:
        config = directory / "serve.yml"
        write_config(
            config,
            config_document(
                servers.backends(declare_fetch=True),
                anchor=float(document["anchor"]),
                refresh_interval=300,
                state_file=directory / "serve-state.json",
                full_resync_interval=None,
            ),
        )
        say(f"exporter config: {config}\n  intune-provisioning-exporter --config.file {config}")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
