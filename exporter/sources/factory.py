"""Builds the real source clients of an estate from its validated config."""

from __future__ import annotations

from exporter.config import EstateConfig
from exporter.sources.base import Source


def build_estate_sources(estate: EstateConfig) -> list[Source]:
    # Each client module is imported only when its section is configured, so an estate without
    # ConfigMgr never touches pyodbc and one without AD never imports ldap3.
    sources: list[Source] = []
    if estate.active_directory is not None:
        from exporter.sources.ad import ActiveDirectorySource

        sources.append(ActiveDirectorySource(estate.active_directory))
    if estate.entra is not None:
        from exporter.sources.entra import build_entra_sources

        sources.extend(build_entra_sources(estate.entra))
    if estate.configmgr is not None:
        from exporter.sources.configmgr import ConfigMgrSource

        sources.append(ConfigMgrSource(estate.configmgr))
    return sources
