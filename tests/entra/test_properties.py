"""Which user properties each pipeline asks Graph for: licence states only where the cloud chain needs them
(a hybrid estate's read must not depend on properties its chain never looks at)."""

from __future__ import annotations

from exporter.config import parse_config
from exporter.sources.entra import EntraUsersSource
from exporter.sources.factory import build_estate_sources


def users_source(pipeline: str) -> EntraUsersSource:
    config = parse_config(
        {
            "estates": [
                {
                    "name": "e",
                    "pipeline": pipeline,
                    "active_directory": {
                        "url": "ldaps://dc1.example.com",
                        "bind_user": "svc@example.com",
                        "bind_password": "secret-1",
                        "search_bases": ["DC=example,DC=com"],
                    },
                    "entra": {"tenant_id": "t", "client_id": "c", "client_secret": "s-123"},
                }
            ]
        },
        environ={},
    )
    sources = build_estate_sources(config.estates[0])
    try:
        return next(s for s in sources if isinstance(s, EntraUsersSource))
    finally:
        for source in sources:
            source.close()


def test_hybrid_estates_do_not_select_licence_states():
    source = users_source("hybrid_mdm")
    assert "licenseAssignmentStates" not in source.properties
    assert "usageLocation" not in source.properties
    assert "licenseAssignmentStates" not in source.users_url() and "assignedLicenses" in source.users_url()


def test_cloud_estates_select_licence_states_and_usage_location():
    source = users_source("cloud")
    assert {"licenseAssignmentStates", "usageLocation"} <= set(source.properties)
