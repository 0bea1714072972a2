"""Config validation: every problem is reported with its key path; secrets never leak."""

from __future__ import annotations

import dataclasses
import os
import textwrap

import pytest
from pydantic import TypeAdapter

from exporter.config import (
    ActiveDirectoryConfig,
    Config,
    ConfigError,
    EstateConfig,
    Secret,
    load_config,
    parse_config,
)
from exporter.durations import format_duration, parse_duration
from exporter.pipelines.definitions import (
    CLOUD,
    DEFAULT_COMPLIANT_STATES,
    DEFAULT_DEVICE_STALE_AFTER,
    DEFAULT_INTUNE_SERVICE_PLANS,
    HYBRID_MDM,
)

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


# ------------------------------------------------------------------ python-built configs
def test_objects_built_in_python_take_seconds_and_support_replace():
    config = Config(estates=(EstateConfig(name="e"),), refresh_interval=0.05, refresh_timeout=0.2)
    assert config.refresh_interval == 0.05 and config.effective_refresh_timeout == 0.2
    assert config.estates[0].stuck_after == HYBRID_MDM.default_stuck_after
    ad = ActiveDirectoryConfig(
        url="ldaps://dc", bind_user="u", bind_password=Secret("pw"), search_bases=("DC=x",), timeout=7.5
    )
    changed = dataclasses.replace(ad, timeout=3.0)
    assert changed.timeout == 3.0 and changed.bind_password == ad.bind_password
    with pytest.raises(dataclasses.FrozenInstanceError):
        ad.timeout = 1.0  # type: ignore[misc]


def test_secret_equality_and_hash_follow_the_value():
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")
    assert hash(Secret("a")) == hash(Secret("a"))
    assert Secret("a") != "a"
    assert Secret("hunter2").value == "hunter2"


def test_defaults_of_the_new_keys(tmp_path):
    config = load_config(write(tmp_path, FULL), environ={"AD_PASSWORD": "pw-1234"})
    assert config.full_resync_interval == 86400
    assert config.user_label_key is None
    (estate,) = config.estates
    assert estate.pipeline == "hybrid_mdm"
    assert estate.entra.devices is None and estate.entra.group_names is True
    assert estate.intune_service_plans == DEFAULT_INTUNE_SERVICE_PLANS
    assert estate.compliant_states == DEFAULT_COMPLIANT_STATES
    assert estate.device_stale_after == DEFAULT_DEVICE_STALE_AFTER


CLOUD_ESTATE = textwrap.dedent(
    """
    full_resync_interval: 0s
    user_label: hash
    user_label_key_file: key.txt
    estates:
      - name: fabrikam
        pipeline: cloud
        active_directory:
          url: ldaps://dc01.fabrikam.com
          bind_user: svc@fabrikam.com
          bind_password: pw-12345
          search_bases: ["OU=Staff,DC=fabrikam,DC=com"]
        entra:
          tenant_id: t
          client_id: c
          client_secret: s-12345
          devices: true
          group_names: "no"
        intune_service_plans: [INTUNE_A]
        compliant_states: [compliant, configManager]
        device_stale_after: 14d
        stuck_after: {intune_licensed: 2d}
    """
)


def test_cloud_estate_with_its_keys_and_pipeline_defaults(tmp_path):
    (tmp_path / "key.txt").write_text("0123456789abcdef0123\n")
    config = load_config(write(tmp_path, CLOUD_ESTATE), environ={})
    assert config.full_resync_interval == 0
    assert config.user_label_key == Secret("0123456789abcdef0123")
    (estate,) = config.estates
    assert estate.pipeline == "cloud" and estate.configmgr is None
    assert estate.intune_service_plans == ("INTUNE_A",)
    assert estate.compliant_states == ("compliant", "configManager")
    assert estate.device_stale_after == 14 * 86400
    assert estate.entra.devices is True and estate.entra.group_names is False
    assert dict(estate.stuck_after) == {**CLOUD.default_stuck_after, "intune_licensed": 2 * 86400}
    assert "0123456789abcdef0123" in config.secrets()


def test_cloud_estate_needs_ad_and_entra_and_knows_only_its_stages(tmp_path):
    text = textwrap.dedent(
        """
        estates:
          - name: fabrikam
            pipeline: cloud
            configmgr:
              connection_string: "DSN=cm"
              intune_collection_ids: [PS100012]
            compliant_states: [Compliant, bogus]
            stuck_after: {cm_discovered: 1h, device_enroled: 1h}
        """
    )
    found = problems(tmp_path, text)
    assert "estates[0].active_directory: required for pipeline: cloud" in found
    assert "estates[0].entra: required for pipeline: cloud" in found
    assert any(
        p.startswith("estates[0].compliant_states[0]: must be one of") and "'compliant'" in p for p in found
    )
    assert any(
        p.startswith("estates[0].compliant_states[1]: must be one of unknown, compliant") for p in found
    )
    assert any(
        p.startswith("estates[0].stuck_after.device_enroled: unknown key (did you mean 'device_enrolled'?)")
        for p in found
    )
    assert any(
        p.startswith("estates[0].stuck_after.cm_discovered: unknown key")
        and "ad_created, entra_synced, intune_licensed, device_enrolled" in p
        for p in found
    )


def test_cloud_only_keys_on_a_hybrid_estate_are_named(tmp_path):
    text = FULL.replace(
        "    stuck_after:", "    device_stale_after: 7d\n    intune_service_plans: [X]\n    stuck_after:"
    )
    found = problems(tmp_path, text, {"AD_PASSWORD": "pw-1234"})
    assert found == [
        "estates[0].device_stale_after: only applies to pipeline: cloud (this estate's is hybrid_mdm)",
        "estates[0].intune_service_plans: only applies to pipeline: cloud (this estate's is hybrid_mdm)",
    ]


def test_user_label_key_must_be_long_enough_and_never_printed(tmp_path):
    (tmp_path / "key.txt").write_text("tiny-key\n")
    found = problems(tmp_path, CLOUD_ESTATE)
    assert found == [
        "user_label_key: must be at least 16 characters (a random key, e.g. from `openssl rand -hex 32`)"
    ]
    assert "tiny-key" not in "\n".join(found)


# --------------------------------------------------------------- defects found by the probe
@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("refresh_interval", "300y", "refresh_interval: must be at most 7d, got 300y"),
        ("refresh_interval", "0s", "refresh_interval: must be at least 1s, got 0s"),
        ("refresh_timeout", "300y", "refresh_timeout: must be at most 1d, got 300y"),
        ("full_resync_interval", "8d", "full_resync_interval: must be at most 7d, got 8d"),
        ("timeout", "300y", "estates[0].active_directory.timeout: must be at most 1d, got 300y"),
        (
            "query_timeout",
            "100000000000000000d",
            "estates[0].configmgr.query_timeout: must be at most 1d, got 100000000000000000d",
        ),
        ("ad_created", "366d", "estates[0].stuck_after.ad_created: must be at most 365d, got 366d"),
        ("timeout", "10", "estates[0].active_directory.timeout: needs a unit, like 10s or 10m"),
        ("refresh_interval", "1" * 200 + "s", "refresh_interval: not a valid duration"),
    ],
)
def test_absurd_durations_are_rejected_naming_the_key(tmp_path, key, value, expected):
    text = FULL.replace("refresh_interval: 5m", "refresh_interval: 5m\nfull_resync_interval: 1h")
    text = {
        "refresh_interval": text.replace("refresh_interval: 5m", f"refresh_interval: {value}"),
        "refresh_timeout": text + f"refresh_timeout: {value}\n",
        "full_resync_interval": text.replace("full_resync_interval: 1h", f"full_resync_interval: {value}"),
        "timeout": text.replace("timeout: 30s", f"timeout: {value}"),
        "query_timeout": text.replace(
            'intune_collection_ids: ["ps100012"]',
            f'intune_collection_ids: ["ps100012"]\n      query_timeout: {value}',
        ),
        "ad_created": text.replace("ad_created: 90m", f"ad_created: {value}"),
    }[key]
    found = problems(tmp_path, text, {"AD_PASSWORD": "pw-1234"})
    assert len(found) == 1 and found[0].startswith(expected), found


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"caf\xe9: 1\n", "is not UTF-8 text (byte 0xe9 at line 1, column 4)"),
        (bytes(range(128, 256)), "is not UTF-8 text (byte 0x80 at line 1, column 1)"),
        ("estates: []\n".encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
    ],
)
def test_a_config_file_that_is_not_utf8_is_named(tmp_path, content, message):
    path = tmp_path / "config.yml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"--config.file: {path} {message}"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfes\x00e\x00c\x00", "secret.bin is UTF-16 text; save it as UTF-8"),
        (b"p\xe9ss", "secret.bin is not UTF-8 text (byte 0xe9 at line 1, column 2)"),
        (b"pass\x00word\x01", "file holds control characters (is it a binary file?): secret.bin"),
        (b"  \n\n", "file is empty"),
    ],
)
def test_a_secret_file_that_is_not_text_is_named_with_its_key(tmp_path, content, message):
    (tmp_path / "secret.bin").write_bytes(content)
    text = FULL.replace("client_secret_file: secret.txt", "client_secret_file: secret.bin")
    found = problems(tmp_path, text, {"AD_PASSWORD": "pw-1234"})
    assert found == [f"estates[0].entra.client_secret_file: {message}"]


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    (tmp_path / "secret.bin").write_bytes("\ufeffs3cr3t\n".encode())
    text = FULL.replace("client_secret_file: secret.txt", "client_secret_file: secret.bin")
    path = write(tmp_path, text)
    path.write_bytes("\ufeff".encode() + path.read_bytes())
    config = load_config(path, environ={"AD_PASSWORD": "pw-1234"})
    assert config.estates[0].entra.client_secret == Secret("s3cr3t")


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "."])
def test_a_secret_file_that_is_no_regular_file_is_refused_without_reading_it(tmp_path, special):
    if special == "fifo":
        os.mkfifo(tmp_path / "fifo")  # opening it would block until a writer comes
    text = FULL.replace("client_secret_file: secret.txt", f"client_secret_file: {special}")
    found = problems(tmp_path, text, {"AD_PASSWORD": "pw-1234"})
    assert found == [f"estates[0].entra.client_secret_file: not a regular file: {special}"]


def test_duplicate_keys_are_refused_with_key_and_lines(tmp_path):
    found = problems(tmp_path, "refresh_interval: 5m\nestates: []\nrefresh_interval: 1m\n")
    assert found == ["refresh_interval: duplicate key (lines 1 and 3)"]
    text = FULL.replace("ad_created: 90m", "{ad_created: 90m, ad_created: 2h}")
    text = text.replace("stuck_after:\n      {", "stuck_after: {")
    found = problems(tmp_path, text, {"AD_PASSWORD": "pw-1234"})
    assert found == ["estates[0].stuck_after.ad_created: duplicate key (line 22, columns 19 and 36)"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "top level: must be a mapping, got a list"),
        ("just text\n", "top level: must be a mapping, got a string"),
        ("state_file: ''\nestates: []\n", "state_file: must not be empty"),
        ("a: &a [*a]\n", "a[0]: a YAML alias refers to a value that contains it"),
        ("estates: \x00\n", "--config.file: not valid YAML: character 0x00 at offset 9 is not allowed"),
        (
            "stuck_users_listed: " + "9" * 5000 + "\n",
            "--config.file: not valid YAML: a number with thousands",
        ),
        ("estates: " + "[" * 3000 + "]" * 3000 + "\n", "--config.file: not valid YAML: nested too deeply"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
            "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
            "--config.file: more than 100000 values once YAML aliases are expanded",
        ),
    ],
)
def test_malformed_documents_are_named(tmp_path, text, expected):
    found = problems(tmp_path, text)
    assert any(problem.startswith(expected) for problem in found), found


def test_state_file_needs_an_existing_directory(tmp_path):
    found = problems(
        tmp_path,
        FULL.replace("/tmp/state.json", str(tmp_path / "no" / "state.json")),
        {"AD_PASSWORD": "pw-1234"},
    )
    assert found == [f"state_file: directory {tmp_path / 'no'} does not exist"]
    found = problems(tmp_path, FULL.replace("/tmp/state.json", str(tmp_path)), {"AD_PASSWORD": "pw-1234"})
    assert found == [f"state_file: not a regular file: {tmp_path}"]


# Every one of these is a mistake a user can make; each must name its key (and never crash).
BAD_VALUES = [
    ("stuck_users_listed", "-1", "stuck_users_listed: must be between 0 and 10000, got -1"),
    ("stuck_users_listed", "1" * 40, "stuck_users_listed: must be between 0 and 10000"),
    ("stuck_users_listed", ".inf", "stuck_users_listed: must be an integer, got inf"),
    ("stuck_users_listed", "[1]", "stuck_users_listed: must be an integer, got [1]"),
    ("stuck_users_listed", "true", "stuck_users_listed: must be an integer, got True"),
    ("refresh_interval", ".nan", "refresh_interval: must be a duration like 30s, 5m or 2h, got nan"),
    ("refresh_interval", "true", "refresh_interval: must be a duration like 30s, 5m or 2h, got True"),
    ("refresh_interval", "{a: 1}", "refresh_interval: must be a duration like 30s, 5m or 2h, got {'a': 1}"),
    ("user_label", "UPN", "user_label: must be one of upn, sam, hash, none, got 'UPN' (did you mean 'upn'?)"),
    ("user_label", "[upn]", "user_label: must be one of upn, sam, hash, none, got ['upn']"),
    ("state_file", "[a]", "state_file: must be a string, got a list"),
    ("state_file", "!!binary aGVsbG8=", "state_file: must be a string, got bytes"),
    ("estates", "{name: x}", "estates: must be a non-empty list of estates, got a mapping"),
    ("estates", "[null]", "estates[0]: must be a mapping, got null"),
    ("estates", "[[]]", "estates[0]: must be a mapping, got a list"),
    ("estates[0].name", "'a b'", "estates[0].name: may only contain letters"),
    ("estates[0].name", "[x]", "estates[0].name: must be a string, got a list"),
    ("estates[0].pipeline", "Cloud", "estates[0].pipeline: must be one of hybrid_mdm, cloud, got 'Cloud'"),
    ("estates[0].stuck_after", "[]", "estates[0].stuck_after: must be a mapping, got a list"),
    (
        "estates[0].active_directory",
        "some text",
        "estates[0].active_directory: must be a mapping, got a string",
    ),
    ("ad.url", "ldaps://dc:ssl", "estates[0].active_directory.url: must be ldap://host[:port] or ldaps://"),
    ("ad.url", '"ldap://dc\\x00"', "estates[0].active_directory.url: must not contain control characters"),
    ("ad.start_tls", "maybe", "estates[0].active_directory.start_tls: must be true or false, got 'maybe'"),
    ("ad.start_tls", "2", "estates[0].active_directory.start_tls: must be true or false, got 2"),
    ("ad.page_size", "1.5", "estates[0].active_directory.page_size: must be an integer, got 1.5"),
    ("ad.page_size", "'many'", "estates[0].active_directory.page_size: must be an integer, got 'many'"),
    ("ad.search_bases", "[null]", "estates[0].active_directory.search_bases[0]: must be a non-empty string"),
    ("ad.search_bases", "{a: 1}", "estates[0].active_directory.search_bases: must be a list of strings"),
    ("ad.bind_password", "[x]", "estates[0].active_directory.bind_password: must be a string, got a list"),
    (
        "ad.bind_password",
        "12345",
        "estates[0].active_directory.bind_password: must be a string, got an integer",
    ),
    ("ad.ca_file", "/dev/zero", "estates[0].active_directory.ca_file: not a regular file: /dev/zero"),
    ("ad.ca_file", "missing.pem", "estates[0].active_directory.ca_file: file not found: missing.pem"),
    ("ad.authentication", "NTLM", "estates[0].active_directory.authentication: must be one of simple, ntlm"),
    ("ad.user_filter", "'(a'", "estates[0].active_directory.user_filter: is not a valid LDAP filter"),
    (
        "ad.bind_pasword",
        "x",
        "estates[0].active_directory.bind_pasword: unknown key (did you mean 'bind_password'?)",
    ),
    ("ad.bind_password_fil", "x", "estates[0].active_directory.bind_password_fil: unknown key (did you mean"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_VALUES)
def test_bad_values_name_their_key(tmp_path, key, value, expected):
    base = textwrap.dedent(
        """
        estates:
          - name: contoso
            active_directory:
              url: ldaps://dc01:636
              bind_user: svc
              bind_password: pw-12345
              search_bases: [DC=contoso,DC=com]
        """
    )
    if key.startswith("ad."):
        text = base + f"      {key[3:]}: {value}\n"
        text = text.replace("      url: ldaps://dc01:636\n", "") if key == "ad.url" else text
        text = text.replace("      bind_password: pw-12345\n", "") if key == "ad.bind_password" else text
        text = (
            text.replace("      search_bases: [DC=contoso,DC=com]\n", "")
            if key == "ad.search_bases"
            else text
        )
    elif key.startswith("estates[0]."):
        field = key.split(".", 1)[1]
        text = base.replace("  - name: contoso\n", f"  - name: contoso\n    {field}: {value}\n")
        if field == "name":
            text = text.replace("  - name: contoso\n", "  -\n")
        if field == "active_directory":
            text = text.split("    active_directory:")[0] + f"    active_directory: {value}\n"
    elif key == "estates":
        text = f"estates: {value}\n"
    else:
        text = base + f"{key}: {value}\n"
    found = problems(tmp_path, text)
    assert any(p.startswith(expected) for p in found), found


def test_a_secret_that_leaks_into_another_key_is_masked_in_problems(tmp_path):
    text = FULL.replace("timeout: 30s", "timeout: ${AD_PASSWORD}")
    found = problems(tmp_path, text, {"AD_PASSWORD": "hunter2-secret"})
    assert found == [
        "estates[0].active_directory.timeout: not a valid duration '<secret>' (use Prometheus syntax such as 30s, 5m, 2h, 1d)"
    ]


def test_secrets_lists_every_secret_including_the_connection_string_password(tmp_path):
    text = FULL.replace("Trusted_Connection=yes", "UID=svc;PWD={p}}w;d}").replace(
        'intune_collection_ids: ["ps100012"]', 'intune_collection_ids: ["ps100012"]\n      password: cm-pass'
    )
    config = load_config(write(tmp_path, text), environ={"AD_PASSWORD": "ad-pass"})
    secrets = config.secrets()
    assert {"ad-pass", "s3cr3t-value", "cm-pass", "p}w;d"} <= set(secrets)
    assert any("PWD={p}}w;d}" in s for s in secrets)  # the whole connection string


def test_environment_variables_reach_every_type(tmp_path):
    text = FULL.replace(
        "timeout: 30s", "timeout: ${T}\n      page_size: ${P}\n      start_tls: ${S}"
    ).replace("ldaps://dc01.contoso.com:636", "ldap://dc01.contoso.com")
    config = load_config(
        write(tmp_path, text), environ={"AD_PASSWORD": "pw-1234", "T": "2m", "P": "50", "S": "yes"}
    )
    ad = config.estates[0].active_directory
    assert (ad.timeout, ad.page_size, ad.start_tls) == (120, 50, True)
    found = problems(
        tmp_path, text.replace("${P}", "${NOPE}"), {"AD_PASSWORD": "pw-1234", "T": "2m", "S": "yes"}
    )
    assert found == ["estates[0].active_directory.page_size: environment variable NOPE is not set"]


def test_every_key_is_documented():
    schema = TypeAdapter(Config).json_schema()
    sections = [schema, *schema["$defs"].values()]
    for section in sections:
        for name, prop in section["properties"].items():
            assert prop.get("description"), name


def test_cloud_estate_needs_licences_and_devices_from_entra(tmp_path):
    """The cloud chain's stages need subscribedSkus and managed devices: turning them off is an error."""
    import textwrap

    from exporter.config import ConfigError, load_config

    path = tmp_path / "config.yml"
    path.write_text(
        textwrap.dedent(
            """
            estates:
              - name: northwind
                pipeline: cloud
                active_directory: {url: "ldaps://dc1:636", bind_user: a@b, bind_password: x, search_bases: ["DC=x"]}
                entra: {tenant_id: t, client_id: c, client_secret: s, licenses: false, devices: false}
            """
        )
    )
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        assert "estates[0].entra.licenses: must be true for pipeline: cloud" in "\n".join(exc.problems)
        assert any(p.startswith("estates[0].entra.devices: must be true") for p in exc.problems)
    else:
        raise AssertionError("accepted a cloud estate without licences and devices")
