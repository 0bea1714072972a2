"""What a scrape, a page or a trace sees: one immutable snapshot of every estate.

The engine publishes a new :class:`Snapshot` whenever a refresh finished or an evaluation completed;
readers take the current one and never wait on a backend, a refresh or an evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from exporter.labels import UserLabeler
from exporter.model import (
    ERROR_REASONS,
    AdTable,
    CmTable,
    DeviceTable,
    EntraTable,
    ErrorReason,
    HttpStats,
    OrganizationData,
    SourceKind,
)
from exporter.pipelines.evaluation import EstateData, Evaluation, PipelineSettings


@dataclass(frozen=True)
class SourceStatus:
    kind: SourceKind
    description: str
    up: bool = False
    refreshed: bool = False  # completed a refresh in this process, or restored from the state file
    last_success: float | None = None
    duration: float | None = None  # of the last refresh; grows while a refresh hangs
    records: int | None = None
    errors: Mapping[ErrorReason, int] = field(default_factory=lambda: dict.fromkeys(ERROR_REASONS, 0))
    last_error: str | None = None
    last_error_at: float | None = None
    http_stats: HttpStats | None = None
    warning: str | None = None  # something odd about the last good read (e.g. an AD search found nobody)
    full_read_at: float | None = None  # when the source last read everything (not incrementally)


@dataclass(frozen=True)
class EstateSnapshot:
    name: str
    settings: PipelineSettings
    sources: Mapping[SourceKind, SourceStatus]  # configured sources only
    data: EstateData = field(default_factory=EstateData)
    evaluation: Evaluation | None = None  # present once the pipeline's sources all have data

    @property
    def pipeline(self) -> str:
        return self.settings.definition.name

    @property
    def stuck_after(self) -> Mapping[str, float]:
        return self.settings.stuck_after

    @property
    def ad(self) -> AdTable | None:
        return self.data.ad

    @property
    def entra(self) -> EntraTable | None:
        return self.data.entra

    @property
    def organization(self) -> OrganizationData | None:
        return self.data.organization

    @property
    def configmgr(self) -> CmTable | None:
        return self.data.configmgr

    @property
    def devices(self) -> DeviceTable | None:
        return self.data.devices

    @property
    def ready(self) -> bool:
        """Every configured source has data (from a successful refresh or from the state file) and,
        where the pipeline's sources are configured, the stage metrics exist: a scrape right after
        /-/ready turned 200 must find them."""
        if not all(self.data.of(kind) is not None for kind in self.sources):
            return False
        from exporter.pipelines import implementation

        needs_evaluation = implementation(self.pipeline).required <= set(self.sources)
        return self.evaluation is not None or not needs_evaluation


@dataclass(frozen=True)
class Snapshot:
    estates: tuple[EstateSnapshot, ...]
    taken_at: float
    restoring: bool = False  # the state file is still being read
    labeler: UserLabeler = field(default_factory=UserLabeler)
    refreshing: Mapping[tuple[str, SourceKind], float] = field(default_factory=dict)  # monotonic start
    state_write_failures: int = 0
    state_write_seconds: float | None = None  # duration of the last completed state write

    @property
    def ready(self) -> bool:
        return not self.restoring and all(estate.ready for estate in self.estates)

    def estate(self, name: str) -> EstateSnapshot | None:
        for estate in self.estates:
            if estate.name == name:
                return estate
        return None
