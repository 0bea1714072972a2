"""Command line of the fault soak (docs/hardening.md): ``python -m benchmarks.soak [options]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from benchmarks.soak.faults import KINDS
from benchmarks.soak.report import analyse, render, write_json
from benchmarks.soak.run import Options, Soak, say
from benchmarks.soak.statefile import DAMAGES


def build_parser() -> argparse.ArgumentParser:
    defaults = Options()
    parser = argparse.ArgumentParser(prog="scripts/fault-soak.sh", description=__doc__)
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="length of the fault phase")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="fault plan, damages and estate")
    parser.add_argument("--users", type=int, default=defaults.users, help="AD accounts in the estate")
    parser.add_argument("--interval", type=float, default=defaults.interval, help="refresh_interval, seconds")
    parser.add_argument("--timeout", type=float, default=defaults.timeout, help="refresh_timeout, seconds")
    parser.add_argument(
        "--backend-timeout",
        type=float,
        default=defaults.backend_timeout,
        help="AD/Graph/SQL timeouts, seconds",
    )
    parser.add_argument(
        "--full-resync", type=float, default=defaults.full_resync, help="full_resync_interval, seconds"
    )
    parser.add_argument(
        "--state-rounds", type=int, default=defaults.state_rounds, help="damaged restarts (13 kinds)"
    )
    parser.add_argument("--data-dir", type=Path, default=defaults.data_dir, help="servers, logs, state file")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write the results as JSON")
    parser.add_argument(
        "--faults",
        type=_names(KINDS),
        default=(),
        help="only these fault kinds, comma-separated (to reproduce one)",
    )
    parser.add_argument(
        "--damages",
        type=_names({d.name: d for d in DAMAGES}),
        default=(),
        help="only these state-file damages, comma-separated",
    )
    parser.add_argument(
        "--exporter-rev",
        help="run the exporter of this git revision (e.g. HEAD: not the files being edited in the tree)",
    )
    return parser


def _names(known: Mapping[str, object]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return names

    return parse


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout + 2.5 > args.interval:
        print("--timeout must leave 2.5s of the interval (the abort grace) free", file=sys.stderr)
        return 2
    options = Options(**vars(args))
    soak = Soak(options)
    results = soak.run()
    analysis = analyse(results, soak.monitor)
    for line in render(results, analysis):
        print(line)
    if options.json_out is not None:
        write_json(options.json_out, results, analysis)
        say(f"results written to {options.json_out}")
    return 1 if analysis.problems else 0


if __name__ == "__main__":
    sys.exit(main())
