"""Config validation: every problem is reported with its key path; secrets never leak."""

from __future__ import annotations

import textwrap

import pytest

from exporter.config import ConfigError, Secret, load_config, parse_config
from exporter.durations import format_duration, parse_duration

FULL = textwrap.dedent(
    """
    refresh_interval: 5m
    state_file: /tmp/state.json
    stuck_users_listed: 10
    user_label: sam
    estates:
      - name: contoso
        active_directory:
          url: ldaps://dc01.contoso.com:636
          bind_user: svc-intune@contoso.com
          bind_password: ${AD_PASSWORD}
          search_bases: ["OU=Staff,DC=contoso,DC=com"]
          source_anchor: mS-DS-ConsistencyGuid
          timeout: 30s
        entra:
          tenant_id: 11111111-1111-1111-1111-111111111111
          client_id: 22222222-2222-2222-2222-222222222222
          client_secret_file: secret.txt
        configmgr:
          connection_string: "DRIVER={ODBC Driver 18 for SQL Server};SERVER=cm01;DATABASE=CM_PS1;Trusted_Connection=yes"
          intune_collection_ids: ["ps100012"]
        stuck_after:
          ad_created: 90m
    """
)


def write(tmp_path, text, secret="s3cr3t-value"):
    (tmp_path / "secret.txt").write_text(secret + "\n")
    path = tmp_path / "config.yml"
    path.write_text(text)
    return path


def problems(tmp_path, text, env=None):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ=env or {})
    return info.value.problems


def test_full_config_loads_into_typed_objects(tmp_path):
    config = load_config(write(tmp_path, FULL), environ={"AD_PASSWORD": "p@ss-word"})
    assert config.refresh_interval == 300
    assert config.user_label == "sam" and config.stuck_users_listed == 10
    (estate,) = config.estates
    assert estate.active_directory.bind_password == Secret("p@ss-word")
    assert estate.active_directory.source_anchor == "mS-DS-ConsistencyGuid"
    assert estate.active_directory.timeout == 30
    assert estate.entra.client_secret.value == "s3cr3t-value"
    assert estate.configmgr.intune_collection_ids == ("PS100012",)
    assert estate.stuck_after["ad_created"] == 5400
    assert estate.stuck_after["entra_synced"] == 3600  # default
    assert set(config.secrets()) >= {"p@ss-word", "s3cr3t-value"}


def test_secret_never_prints():
    assert "hunter2" not in repr(Secret("hunter2")) and "hunter2" not in str(Secret("hunter2"))


def test_every_problem_is_listed_with_its_key_path(tmp_path):
    text = textwrap.dedent(
        """
        refresh_intervall: 5m
        user_label: email
        estates:
          - name: contoso
            active_directory:
              url: http://dc01
              bind_user: svc
              search_bases: []
              timeout: 5 minutes
            entra:
              tenant_id: t
            stuck_after:
              ad_created: 2hours
              cm_discoverd: 1h
        """
    )
    found = problems(tmp_path, text)
    expected = [
        "refresh_intervall: unknown key (did you mean 'refresh_interval'?)",
        "user_label: must be one of upn, sam, hash, none",
        "estates[0].active_directory.url: must be ldap://",
        "estates[0].active_directory.bind_password: required",
        "estates[0].active_directory.search_bases: must list at least one entry",
        "estates[0].active_directory.timeout: not a valid duration",
        "estates[0].entra.client_id: required",
        "estates[0].entra.client_secret: required",
        "estates[0].stuck_after.ad_created: not a valid duration",
        "estates[0].stuck_after.cm_discoverd: unknown key (did you mean 'cm_discovered'?)",
    ]
    for prefix in expected:
        assert any(p.startswith(prefix) for p in found), (prefix, found)


def test_missing_environment_variable_names_key_and_variable(tmp_path):
    found = problems(tmp_path, FULL)
    assert found == ["estates[0].active_directory.bind_password: environment variable AD_PASSWORD is not set"]


def test_secret_and_its_file_twin_are_exclusive_and_file_must_exist(tmp_path):
    text = FULL.replace(
        "client_secret_file: secret.txt", "client_secret: x\n      client_secret_file: nope.txt"
    )
    found = problems(tmp_path, text, {"AD_PASSWORD": "pw-1234"})
    assert found == [
        "estates[0].entra.client_secret: set either client_secret or client_secret_file, not both"
    ]
    text = FULL.replace("client_secret_file: secret.txt", "client_secret_file: nope.txt")
    found = problems(tmp_path, text, {"AD_PASSWORD": "pw-1234"})
    assert found == ["estates[0].entra.client_secret_file: file not found: nope.txt"]


def test_problems_never_contain_secret_values(tmp_path):
    text = FULL.replace("timeout: 30s", "timeout: 30s\n      page_size: 0")
    found = problems(tmp_path, text, {"AD_PASSWORD": "TopSecretPassword"})
    assert found == ["estates[0].active_directory.page_size: must be between 1 and 100000, got 0"]
    assert "TopSecretPassword" not in "\n".join(found)


def test_estates_required_unique_and_with_a_source(tmp_path):
    assert problems(tmp_path, "refresh_interval: 1m\n") == ["estates: required: list at least one estate"]
    found = problems(tmp_path, "estates:\n  - name: a\n  - name: a\n")
    assert "estates[0]: configure at least one of active_directory, entra, configmgr" in found
    assert "estates[1].name: duplicate estate name 'a'" in found


def test_invalid_yaml_is_reported(tmp_path):
    assert problems(tmp_path, "estates: [\n")[0].startswith("--config.file: not valid YAML")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yml")
    assert info.value.problems == [f"--config.file: file not found: {tmp_path / 'absent.yml'}"]


def test_entra_requires_https_and_certificate_needs_thumbprint(tmp_path):
    (tmp_path / "cert.pem").write_text("x")
    data = {
        "estates": [
            {
                "name": "e",
                "entra": {
                    "tenant_id": "t",
                    "client_id": "c",
                    "certificate_file": str(tmp_path / "cert.pem"),
                    "graph_url": "http://graph.local",
                },
            }
        ]
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={})
    assert info.value.problems == [
        "estates[0].entra.certificate_thumbprint: required",
        "estates[0].entra.graph_url: must be an https:// URL, got 'http://graph.local'",
    ]


def test_ntlm_needs_domain_user_and_start_tls_needs_ldap(tmp_path):
    data = {
        "estates": [
            {
                "name": "e",
                "active_directory": {
                    "url": "ldaps://dc:636",
                    "start_tls": True,
                    "authentication": "ntlm",
                    "bind_user": "svc@contoso.com",
                    "bind_password": "pw-12345",
                    "search_bases": ["DC=contoso,DC=com"],
                },
            }
        ]
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={})
    assert info.value.problems == [
        "estates[0].active_directory.start_tls: start_tls needs an ldap:// url (ldaps:// is TLS already)",
        "estates[0].active_directory.bind_user: NTLM needs DOMAIN\\user",
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("2h", 7200),
        ("1h30m", 5400),
        ("1d", 86400),
        ("1w", 604800),
        ("500ms", 0.5),
        ("0", 0),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "1m1h", "-1s", "1.5h", "h"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration():
    assert format_duration(5400) == "1h30m"
    assert format_duration(0) == "0s"
