"""``intune-provisioning-exporter trace USER``: what happened to one user, read live from the backends.

No running exporter is needed and no directory is read in full: each source answers point look-ups
(an escaped LDAP filter, Graph ``$filter`` queries, parameterised SQL) for the user and the records
that could match or conflict with it. The answers become tiny tables, and the SAME pipeline
evaluation and explanation the exporter uses for /stuck and /trace run on them, so the CLI and the
exporter always agree. First-seen times come from the exporter's state file when it is configured.

Exit codes: 0 the user is at its pipeline's final stage, 1 found but not there (or a backend did not
answer, so that could not be confirmed; stderr says which), 2 bad arguments or config, 3 no in-scope
user matches (out-of-scope matches are reported on stderr).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from exporter.config import Config, ConfigError, EstateConfig, load_config
from exporter.durations import format_duration, human_duration
from exporter.model import AdTable, CmTable, DeviceTable, EntraTable, OrganizationData
from exporter.pipelines import implementation
from exporter.pipelines.evaluation import EstateData, FirstSeen, evaluate
from exporter.pipelines.explain import UserExplanation, explain, find_rows
from exporter.sources.base import ConfigurationError, Source, SourceError

log = logging.getLogger(__name__)
EXIT_ENABLED, EXIT_NOT_ENABLED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3
LOOKUP_TIMEOUT = 60.0


def build_parser() -> argparse.ArgumentParser:
    from exporter.cli import ArgumentParser

    parser = ArgumentParser(
        prog="intune-provisioning-exporter trace",
        description="Explain where one user is in its provisioning pipeline, why, and what to do. "
        "USER is a UPN, a sAMAccountName, DOMAIN\\sam, an objectGUID or an Entra object id.",
    )
    parser.add_argument("user", metavar="USER")
    parser.add_argument("--config.file", dest="config_file", default="config.yml", metavar="PATH")
    parser.add_argument("--estate", default=None, metavar="NAME", help="only look in this estate")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    parser.add_argument("--demo", action="store_true", help="trace a user of the embedded demo estate")
    return parser


@dataclass
class TraceResult:
    found: list[UserExplanation] = field(default_factory=list)
    out_of_scope: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # estates whose backends could not answer


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if not args.user.strip():
        print("trace: USER must not be empty", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
    if args.demo:
        result = trace_demo(args.user, args.estate)
    else:
        try:
            config = load_config(args.config_file)
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"{args.config_file}: {problem}", file=sys.stderr)
            return EXIT_USAGE
        if args.estate and args.estate not in {e.name for e in config.estates}:
            print(f"--estate: no estate named {args.estate!r} in {args.config_file}", file=sys.stderr)
            return EXIT_USAGE
        try:
            result = trace_config(config, args.user, args.estate)
        except ConfigurationError as exc:
            print(f"{args.config_file}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    for note in result.out_of_scope:
        print(f"out of scope: {note}", file=sys.stderr)
    for failure in result.failed:
        print(f"cannot trace in {failure}", file=sys.stderr)
    if not result.found:
        if result.failed:
            # Not "no match": a backend did not answer, so the user's stage is unknown (not enabled).
            return EXIT_NOT_ENABLED
        print(f"no in-scope user matches {args.user!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.format == "json":
        documents = [r.document() for r in result.found]
        print(json.dumps(documents[0] if len(documents) == 1 else documents, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(render_text(r) for r in result.found))
    final = all(r.reason is None for r in result.found)
    return EXIT_ENABLED if final else EXIT_NOT_ENABLED


# ============================================================================ text output
def render_text(r: UserExplanation) -> str:
    width = max(len(s.stage) for s in r.steps)
    lines = [
        f"{r.estate} — {r.upn or r.sam}  [{r.pipeline}]",
        f"  sAMAccountName {r.sam} · objectGUID {r.object_guid} · objectSid {r.object_sid}",
        "",
    ]
    for step in r.steps:
        mark = "✓" if step.done else "✗"
        lines.append(f"  {mark} {step.stage.ljust(width)}  {step.evidence}")
    lines.append("")
    since = (
        time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(r.entered)) if r.entered == r.entered else "unknown"
    )
    waited = human_duration(r.waiting)
    if r.reason is None:
        lines.append(f"  Done: at {r.stage} since {since}.")
        return "\n".join(lines)
    limit = f"; stuck after {format_duration(r.stuck_after)}" if r.stuck_after is not None else ""
    state = "Stuck" if r.stuck else "Waiting"
    lines += [
        f"  {state} at {r.stage} for {waited} (since {since}{limit})",
        f"  Reason   {r.reason}",
        f"  Detail   {r.detail}",
        f"  Action   {r.action}",
    ]
    return "\n".join(lines)


# ============================================================================ demo
def trace_demo(user: str, estate_name: str | None) -> TraceResult:
    from exporter.demo import demo_setup
    from exporter.engine import Engine

    config, sources, clock, history = demo_setup()
    engine = Engine(config, sources, clock=clock, first_seen=history)
    engine.refresh_all()
    snapshot = engine.snapshot()
    result = TraceResult()
    for estate in snapshot.estates:
        if (estate_name and estate.name != estate_name) or estate.evaluation is None:
            continue
        for row in find_rows(estate.evaluation, user):
            result.found.append(explain(estate.evaluation, row, snapshot.taken_at, estate.name))
    return result


# ============================================================================ live backends
def trace_config(config: Config, user: str, estate_name: str | None) -> TraceResult:
    from exporter.sources.factory import build_estate_sources

    result = TraceResult()
    now = time.time()
    for estate in config.estates:
        if estate_name and estate.name != estate_name:
            continue
        if estate.active_directory is None:
            continue
        sources = build_estate_sources(estate)
        try:
            found, notes = trace_estate(
                estate, {s.kind: s for s in sources}, user, now, _first_seen(config, estate)
            )
        except SourceError as exc:
            result.failed.append(f"{estate.name}: {exc.reason}: {exc.message}")
            continue
        finally:
            for source in sources:
                source.close()
        result.found.extend(found)
        result.out_of_scope.extend(f"{estate.name}: {note}" for note in notes)
    return result


def _first_seen(config: Config, estate: EstateConfig) -> FirstSeen | None:
    if not config.state_file:
        return None
    from exporter.state import StateStore

    try:
        return StateStore(config.state_file).load_first_seen(estate.name)
    except Exception as exc:  # the trace works without it, with "first seen now"
        log.warning("cannot read first-seen times from %s: %s", config.state_file, exc)
        return None


def _call(source: Source | None, method: str, **kwargs: Any) -> Any:
    if source is None:
        return None
    return getattr(source, method)(deadline=time.monotonic() + LOOKUP_TIMEOUT, **kwargs)


def trace_estate(
    estate: EstateConfig,
    sources: dict[str, Source],
    user: str,
    now: float,
    first_seen: FirstSeen | None,
) -> tuple[list[UserExplanation], list[str]]:
    """Point look-ups in every source of one estate, then the shared evaluation and explanation."""
    from exporter.engine import settings_of

    settings = settings_of(estate)
    ad_source, entra_source = sources.get("ad"), sources.get("entra")
    ad_table, notes = _call(ad_source, "find_users", text=user)
    if ad_table.n == 0 and _is_guid(user) and entra_source is not None:
        # An Entra object id: find the Entra user, then its AD account by SID or immutable id.
        entra_user = _call(entra_source, "find_related", ids=[user.strip().strip("{}")])
        sids, guids = _identities_of(entra_user)
        if sids or guids:
            ad_table, more = _call(ad_source, "find_users", sids=sids, guids=guids)
            notes = notes + more
    if ad_table.n == 0:
        return [], notes
    entra = _entra_related(entra_source, ad_table)
    configmgr = None
    cm_source = sources.get("configmgr")
    if cm_source is not None:
        configmgr = _call(
            cm_source,
            "find_related",
            sids=[ad_table.text("sid", r) for r in range(ad_table.n)],
            guids=[bytes(ad_table.array("guid")[r].tobytes()) for r in range(ad_table.n)],
            names=[f"{ad_table.netbios_domain}\\{ad_table.text('sam', r)}" for r in range(ad_table.n)],
            upns=[u for u in (ad_table.text("upn", r) for r in range(ad_table.n)) if u],
        )
        entra = _with_cloud_user_ids(entra_source, entra, configmgr)
    organization = None
    org_source = sources.get("entra_organization")
    if org_source is not None:
        organization = org_source.refresh(None, time.monotonic() + LOOKUP_TIMEOUT)
    devices = None
    device_source = sources.get("intune_devices")
    if device_source is not None and entra is not None:
        ids = [entra.id_text(r) for r in range(entra.n) if entra.array("synced")[r]]
        devices = _call(device_source, "find_devices", user_ids=ids)
    data = EstateData(
        ad=ad_table.prepare(),
        entra=_prepared(entra),
        organization=organization if isinstance(organization, OrganizationData) else None,
        configmgr=_prepared(configmgr),
        devices=_prepared(devices),
    )
    pipeline = implementation(settings.definition.name)
    if not pipeline.required <= data.present():
        missing = sorted(pipeline.required - data.present())
        raise SourceError(
            "other", f"cannot evaluate the {settings.definition.name} chain without {', '.join(missing)}"
        )
    evaluation = evaluate(pipeline, data, settings, first_seen, now)
    return [explain(evaluation, row, now, estate.name) for row in range(ad_table.n)], notes


def _prepared(table: Any) -> Any:
    return table.prepare() if table is not None else None


def _entra_related(source: Source | None, ad: AdTable) -> EntraTable | None:
    if source is None:
        return None
    anchors = [base64.b64encode(ad.blob("anchor").raw(r) or b"").decode("ascii") for r in range(ad.n)]
    table: EntraTable = _call(
        source,
        "find_related",
        immutable_ids=anchors,
        sids=[ad.text("sid", r) for r in range(ad.n)],
        upns=[u for u in (ad.text("upn", r) for r in range(ad.n)) if u],
    )
    return table


def _with_cloud_user_ids(
    source: Source | None, entra: EntraTable | None, cm: CmTable | None
) -> EntraTable | None:
    """Add the Entra users the ConfigMgr records' CloudUserIDs name (for cloud_user_id_other_user)."""
    if source is None or entra is None or cm is None:
        return entra
    known = {entra.id_text(r) for r in range(entra.n)}
    wanted = sorted({c for c in (cm.cloud_text(r) for r in range(cm.n)) if c and c not in known})
    if not wanted:
        return entra
    extra: EntraTable = _call(source, "find_related", ids=wanted)
    return EntraTable.concat([entra, extra], meta={**entra.meta, **extra.meta}) if extra.n else entra


def _identities_of(entra: EntraTable) -> tuple[list[str], list[bytes]]:
    sids = [s for s in (entra.text("sid", r) for r in range(entra.n)) if s]
    guids = []
    for r in range(entra.n):
        immutable = entra.text("imm", r)
        if immutable:
            try:
                raw = base64.b64decode(immutable, validate=True)
            except ValueError:
                continue
            if len(raw) == 16:
                guids.append(raw)
    return sids, guids


def _is_guid(text: str) -> bool:
    try:
        uuid.UUID(text.strip().strip("{}"))
    except ValueError:
        return False
    return True


__all__ = ["DeviceTable", "TraceResult", "main", "render_text", "trace_estate"]
