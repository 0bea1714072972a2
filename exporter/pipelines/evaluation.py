"""Evaluating an estate: the part of the stage model every pipeline shares (pure, no I/O).

A pipeline (``exporter.pipelines.hybrid``, ``exporter.pipelines.cloud``) says, for every in-scope AD
user at once, how far along its chain the user got (:class:`Placement`: the stage, the backend's own
timestamp of entering it where there is one) and which reason conditions hold for the users at
each stage. This module turns that into an :class:`Evaluation`: first-seen times carried over from
the previous evaluation, the time each user entered its stage, and exactly one reason per user that
is not at the final stage: the FIRST reason of its stage whose condition holds. Who is stuck
depends on the clock, so :meth:`Evaluation.summary` computes it for a given moment.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from exporter.columns import I64, NO_KEY, U64, Bools, Floats, SortedIndex, guid_order_key
from exporter.model import (
    SOURCE_REGISTRY,
    AdTable,
    CmTable,
    DeviceTable,
    EntraTable,
    OrganizationData,
    SourceKind,
)
from exporter.pipelines.definitions import (
    DEFAULT_COMPLIANT_STATES,
    DEFAULT_DEVICE_STALE_AFTER,
    DEFAULT_INTUNE_SERVICE_PLANS,
    PipelineDefinition,
)

Stages = npt.NDArray[np.int8]
NOT_STUCK_YET = float("inf")


# ---------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class EstateData:
    """The last good data of every source of one estate (None: never read)."""

    ad: AdTable | None = None
    entra: EntraTable | None = None
    organization: OrganizationData | None = None
    configmgr: CmTable | None = None
    devices: DeviceTable | None = None

    def of(self, kind: SourceKind) -> object | None:
        return getattr(self, SOURCE_REGISTRY[kind].field)

    @staticmethod
    def of_sources(data: Mapping[SourceKind, object]) -> EstateData:
        """From the data of each source kind (the engine's view), through the one source registry."""
        fields: dict[str, Any] = {SOURCE_REGISTRY[kind].field: value for kind, value in data.items()}
        return EstateData(**fields)

    def present(self) -> frozenset[SourceKind]:
        return frozenset(kind for kind in SOURCE_REGISTRY if self.of(kind) is not None)


@dataclass(frozen=True)
class PipelineSettings:
    definition: PipelineDefinition
    stuck_after: Mapping[str, float]
    intune_service_plans: tuple[str, ...] = DEFAULT_INTUNE_SERVICE_PLANS
    compliant_states: tuple[str, ...] = DEFAULT_COMPLIANT_STATES
    device_stale_after: float = DEFAULT_DEVICE_STALE_AFTER


# ---------------------------------------------------------------------------- first seen
@dataclass(frozen=True, eq=False)
class FirstSeen:
    """When the exporter first saw each user at its current stage, keyed by the user's objectGUID key.

    It is the only evidence of when a user reached a stage no backend timestamps, and survives
    restarts through the state file. ``stage`` indexes the stages of ``pipeline``.
    """

    pipeline: str
    keys: U64  # sorted, unique
    stage: npt.NDArray[np.int8]
    since: Floats

    @staticmethod
    def empty(pipeline: str) -> FirstSeen:
        return FirstSeen(pipeline, np.zeros(0, np.uint64), np.zeros(0, np.int8), np.zeros(0, np.float64))

    @staticmethod
    def from_rows(pipeline: str, keys: U64, stage: npt.NDArray[np.int8], since: Floats) -> FirstSeen:
        order = np.argsort(keys, kind="stable")
        keys, stage, since = keys[order], stage[order], since[order]
        unique = np.ones(len(keys), dtype=np.bool_)
        unique[1:] = keys[1:] != keys[:-1]
        return FirstSeen(pipeline, keys[unique], stage[unique], since[unique])

    def __len__(self) -> int:
        return len(self.keys)

    def lookup_sorted(self, probe: SortedIndex, size: int) -> tuple[npt.NDArray[np.int8], Floats]:
        """Like :meth:`lookup` for every row of a table, given that table's sorted index of the key."""
        stage = np.full(size, -1, dtype=np.int8)
        since = np.full(size, np.nan)
        if len(self.keys) and len(probe.keys):
            position = np.minimum(np.searchsorted(self.keys, probe.keys), len(self.keys) - 1)
            hit = self.keys[position] == probe.keys
            stage[probe.order[hit]] = self.stage[position[hit]]
            since[probe.order[hit]] = self.since[position[hit]]
        return stage, since

    def lookup(self, probe: U64) -> tuple[npt.NDArray[np.int8], Floats]:
        """(stage, since) for each probe key; stage -1 where the user was never seen."""
        stage = np.full(len(probe), -1, dtype=np.int8)
        since = np.full(len(probe), np.nan)
        if len(self.keys) and len(probe):
            position = np.minimum(np.searchsorted(self.keys, probe), len(self.keys) - 1)
            hit = self.keys[position] == probe
            stage[hit] = self.stage[position[hit]]
            since[hit] = self.since[position[hit]]
        return stage, since


# ---------------------------------------------------------------------------- pipelines
@dataclass(frozen=True)
class Placement:
    """What a pipeline found for every AD row: stage index and the backend's entry timestamp (NaN:
    none, the first-seen time is used), plus whatever the pipeline needs later (``links``)."""

    stage: Stages
    evidence: Floats
    links: Mapping[str, Any] = field(default_factory=dict)


class Pipeline(Protocol):
    definition: PipelineDefinition
    # Sources whose data the stage metrics need (they are absent without them).
    required: frozenset[SourceKind]

    def place(self, data: EstateData, settings: PipelineSettings, now: float) -> Placement: ...

    def conditions(
        self,
        data: EstateData,
        settings: PipelineSettings,
        placement: Placement,
        stage: str,
        rows: I64,
        now: float,
    ) -> Mapping[str, Bools]:
        """For the users ``rows`` (all at ``stage``): each reason of that stage -> where it holds.

        Reasons not in the mapping hold nowhere, except the stage's last ("otherwise") reason.
        """
        ...

    def side_metrics(
        self, data: EstateData, settings: PipelineSettings, placement: Placement
    ) -> Mapping[str, Any]: ...


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Summary:
    """An evaluation seen at one moment: counts per stage and reason, who is stuck."""

    at: float
    users: Mapping[str, int]
    stuck: Mapping[str, int]
    stuck_reasons: Mapping[tuple[str, str], int]  # every (stage, reason) pair of the pipeline
    oldest_entry: Mapping[str, float | None]
    stuck_rows: I64  # AD rows of the stuck users, longest-waiting first


@dataclass(frozen=True, eq=False)
class Evaluation:
    """The result of evaluating one estate; immutable, shared by scrapes and pages."""

    settings: PipelineSettings
    data: EstateData
    evaluated_at: float
    stage: Stages  # per AD row
    entered: Floats  # per AD row: when the user entered its stage
    reason: npt.NDArray[np.int16]  # per AD row: index into definition.reasons, -1 at the final stage
    placement: Placement
    first_seen: FirstSeen
    side: Mapping[str, Any]
    _summaries: dict[int, Summary] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def definition(self) -> PipelineDefinition:
        return self.settings.definition

    @property
    def ad(self) -> AdTable:
        assert self.data.ad is not None
        return self.data.ad

    def stage_name(self, row: int) -> str:
        return self.definition.stages[int(self.stage[row])]

    def reason_name(self, row: int) -> str | None:
        index = int(self.reason[row])
        return None if index < 0 else self.definition.reasons[index].name

    def stuck_threshold(self) -> Floats:
        """Per stage index: seconds in stage after which a user is stuck (inf: never)."""
        stages = self.definition.stages
        limits = [self.settings.stuck_after.get(s, NOT_STUCK_YET) for s in stages[:-1]] + [NOT_STUCK_YET]
        return np.asarray(limits, dtype=np.float64)

    def stuck_mask(self, now: float) -> Bools:
        waited = now - self.entered
        return waited > self.stuck_threshold()[self.stage]

    def is_stuck(self, row: int, now: float) -> bool:
        return bool(now - float(self.entered[row]) > float(self.stuck_threshold()[int(self.stage[row])]))

    def summary(self, now: float) -> Summary:
        """Counts at ``now`` (memoised per second: every scrape in that second shares it)."""
        second = int(now)
        with self._lock:
            cached = self._summaries.get(second)
        if cached is not None:
            return cached
        result = _summarise(self, now)
        with self._lock:
            self._summaries.clear()
            self._summaries[second] = result
        return result


def _summarise(evaluation: Evaluation, now: float) -> Summary:
    definition = evaluation.definition
    stages = definition.stages
    stage = evaluation.stage
    stuck = evaluation.stuck_mask(now)
    users = np.bincount(stage, minlength=len(stages))
    stuck_counts = np.bincount(stage[stuck], minlength=len(stages))
    reason_counts = np.bincount(evaluation.reason[stuck].astype(np.int64), minlength=len(definition.reasons))
    oldest: dict[str, float | None] = {}
    for index, name in enumerate(stages):
        at_stage = evaluation.entered[stage == index]
        oldest[name] = float(at_stage.min()) if len(at_stage) else None
    stuck_rows = np.flatnonzero(stuck)
    if len(stuck_rows):
        high, low = guid_order_key(evaluation.ad.array("guid")[stuck_rows])
        stuck_rows = stuck_rows[np.lexsort((low, high, evaluation.entered[stuck_rows]))]
    return Summary(
        at=now,
        users={name: int(users[i]) for i, name in enumerate(stages)},
        stuck={name: int(stuck_counts[i]) for i, name in enumerate(stages)},
        stuck_reasons={(r.stage, r.name): int(reason_counts[i]) for i, r in enumerate(definition.reasons)},
        oldest_entry=oldest,
        stuck_rows=stuck_rows.astype(np.int64),
    )


# ---------------------------------------------------------------------------- the shared steps
def evaluate(
    pipeline: Pipeline,
    data: EstateData,
    settings: PipelineSettings,
    first_seen: FirstSeen | None,
    now: float,
) -> Evaluation:
    """Place every in-scope user, carry first-seen times over, pick each user's reason.

    The new first-seen table only keeps users that are still in scope, at their current stage: a
    user who moves on gets a fresh first-seen time, and one who left scope is forgotten.
    """
    ad = data.ad
    assert ad is not None, "a pipeline is evaluated only with AD data"
    definition = settings.definition
    placement = pipeline.place(data, settings, now)
    stage = placement.stage
    keys = ad.array("k_guid")
    by_guid = ad.index("k_guid")  # sorted once per AD table version: no sorting here
    previous = first_seen if first_seen is not None and first_seen.pipeline == definition.name else None
    if previous is not None:
        old_stage, old_since = previous.lookup_sorted(by_guid, ad.n)
        since = np.where(old_stage == stage, old_since, now)
    else:
        since = np.full(ad.n, now, dtype=np.float64)
    entered = np.where(np.isnan(placement.evidence), since, placement.evidence)
    reason = choose_reasons(pipeline, data, settings, placement, now)
    return Evaluation(
        settings=settings,
        data=data,
        evaluated_at=now,
        stage=stage,
        entered=entered,
        reason=reason,
        placement=placement,
        first_seen=_first_seen_of(definition.name, by_guid, keys, stage, since),
        side=pipeline.side_metrics(data, settings, placement),
    )


def _first_seen_of(pipeline: str, by_guid: SortedIndex, keys: U64, stage: Stages, since: Floats) -> FirstSeen:
    """The new first-seen table, already in key order thanks to the AD table's sorted index."""
    ordered = by_guid.keys
    if len(ordered) == len(keys) and not (len(ordered) > 1 and (ordered[1:] == ordered[:-1]).any()):
        return FirstSeen(pipeline, ordered, stage[by_guid.order], since[by_guid.order])
    return FirstSeen.from_rows(pipeline, keys.copy(), stage.copy(), since)  # duplicate or missing keys


def choose_reasons(
    pipeline: Pipeline, data: EstateData, settings: PipelineSettings, placement: Placement, now: float
) -> npt.NDArray[np.int16]:
    """The first reason of each user's stage whose condition holds (the last one always does)."""
    definition = settings.definition
    reason = np.full(len(placement.stage), -1, dtype=np.int16)
    for stage_index, stage_name in enumerate(definition.waiting_stages):
        rows = np.flatnonzero(placement.stage == stage_index).astype(np.int64)
        if not len(rows):
            continue
        holds = pipeline.conditions(data, settings, placement, stage_name, rows, now)
        candidates = definition.reasons_of(stage_name)
        chosen = np.full(len(rows), -1, dtype=np.int16)
        for candidate in candidates[:-1]:
            condition = holds.get(candidate.name)
            if condition is not None:
                chosen[(chosen < 0) & np.asarray(condition, dtype=np.bool_)] = definition.reasons.index(
                    candidate
                )
        chosen[chosen < 0] = definition.reasons.index(candidates[-1])  # the "otherwise" row
        reason[rows] = chosen
    return reason


# ---------------------------------------------------------------------------- helpers for pipelines
def chain(*conditions: Bools) -> Stages:
    """The stage index: how many of the chain's conditions hold together with every earlier one."""
    if not conditions:
        raise ValueError("a chain needs conditions")
    together = np.ones(len(conditions[0]), dtype=np.bool_)
    stage = np.zeros(len(conditions[0]), dtype=np.int8)
    for condition in conditions:
        together &= condition
        stage += together
    return stage


def first_match(size: int, *lookups: tuple[SortedIndex, SortedIndex]) -> I64:
    """Join by several keys in order of preference: the first key that finds a row wins."""
    result = np.full(size, -1, dtype=np.int64)
    for index, probe in lookups:
        found = index.lookup_sorted(probe, size)
        open_rows = result < 0
        result[open_rows] = found[open_rows]
    return result


def broadcast(value: bool, size: int) -> Bools:
    return np.full(size, value, dtype=np.bool_)


def guids_equal(
    left: np.ndarray[Any, Any], left_rows: I64, right: np.ndarray[Any, Any], right_rows: I64
) -> Bools:
    """Where both rows exist and the 16-byte values at them are equal."""
    both = (left_rows >= 0) & (right_rows >= 0)
    result = np.zeros(len(left_rows), dtype=np.bool_)
    if not both.any():
        return result
    a = np.ascontiguousarray(left[left_rows[both]]).view("<u8").reshape(-1, 2)
    b = np.ascontiguousarray(right[right_rows[both]]).view("<u8").reshape(-1, 2)
    result[both] = (a == b).all(axis=1)
    return result


def key_at(keys: U64, rows: I64) -> U64:
    """keys[rows], NO_KEY where a row is -1."""
    if len(keys) == 0:
        return np.full(len(rows), NO_KEY, dtype=np.uint64)
    result = keys[np.maximum(rows, 0)].copy()
    result[rows < 0] = NO_KEY
    return result
