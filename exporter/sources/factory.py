"""Builds the real source clients of an estate from its validated config."""

from __future__ import annotations

import logging

from exporter.config import EstateConfig
from exporter.model import SourceKind
from exporter.sources.base import ConfigurationError, Source
from exporter.sources.isolated import Recipe

# Sources whose refreshes may run in a child process (exporter.sources.isolated): those that read
# a whole table. The organization source reads three small documents.
ISOLATED_KINDS: frozenset[SourceKind] = frozenset({"ad", "entra", "configmgr", "intune_devices"})

log = logging.getLogger(__name__)


def reads_devices(estate: EstateConfig) -> bool:
    """Whether the estate's Intune managed devices are read: ``entra.devices`` when set, else only
    for the ``cloud`` pipeline (whose chain needs them)."""
    if estate.entra is None:
        return False
    if estate.entra.devices is not None:
        return bool(estate.entra.devices)
    return estate.pipeline == "cloud"


def build_estate_sources(estate: EstateConfig) -> list[Source]:
    """The source clients of an estate. Those that read a whole table carry the recipe the engine
    needs to run their refreshes in a child process (``isolation_recipe``)."""
    sources = _build(estate)
    for source in sources:
        if source.kind in ISOLATED_KINDS:
            source.isolation_recipe = Recipe(estate, source.kind)  # type: ignore[attr-defined]
    return sources


def build_source(estate: EstateConfig, kind: SourceKind) -> Source:
    """The one source of ``kind`` of an estate (what a refresh child builds), the others closed."""
    found: Source | None = None
    for source in _build(estate, preflight=False):
        if source.kind == kind and found is None:
            found = source
        else:
            source.close()
    if found is None:
        raise ConfigurationError(f"estate {estate.name} has no {kind} source")
    return found


def _build(estate: EstateConfig, *, preflight: bool = True) -> list[Source]:
    # Each client module is imported only when its section is configured, so an estate without
    # ConfigMgr never touches pyodbc and one without AD never imports ldap3.
    sources: list[Source] = []
    if estate.active_directory is not None:
        from exporter.sources.ad import ActiveDirectorySource

        sources.append(ActiveDirectorySource(estate.active_directory))
    if estate.entra is not None:
        from exporter.sources.entra import build_entra_sources

        sources.extend(
            build_entra_sources(
                estate.entra,
                devices=reads_devices(estate),
                license_refresh_interval=estate.entra.license_refresh_interval,
                # Licence states are what the cloud chain's licence stage and reasons are made of.
                license_states=estate.pipeline == "cloud",
            )
        )
    if estate.configmgr is not None:
        from exporter.sources.configmgr import ConfigMgrSource

        configmgr = ConfigMgrSource(estate.configmgr)
        try:
            if preflight:
                configmgr.preflight()
        except ConfigurationError as exc:
            # Said loudly at start, but not fatal: the other sources and estates keep working and
            # every refresh of this one fails with reason "other" until the driver is installed.
            log.error("estate %s: %s", estate.name, exc)
        sources.append(configmgr)
    return sources
