"""HTTP endpoints over real sockets: metrics, landing page, health, readiness, /stuck, TLS and basic auth."""

from __future__ import annotations

import base64
import gzip
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import bcrypt
import pytest
import trustme
from prometheus_client.registry import CollectorRegistry

from collectors import ExporterCollector, default_collectors
from exporter.httpserver import ExporterHTTPServer, parse_listen_address
from exporter.snapshot import Snapshot
from exporter.webapp import MetricsRenderer, build_app
from exporter.webconfig import WebConfigError, load_web_config
from tests.unit.test_collectors import full_engine


@pytest.fixture
def serve():
    servers = []

    def start(engine, web_config=None, user_label="upn"):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ExporterCollector(engine.snapshot, default_collectors(25)))
        app = build_app(MetricsRenderer(registry, engine.snapshot), engine.snapshot, user_label)
        server = ExporterHTTPServer(("127.0.0.1", 0), app, web_config or load_web_config(None))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def get(url, headers=None, context=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_endpoints(serve):
    port = serve(full_engine())
    base = f"http://127.0.0.1:{port}"
    status, headers, body = get(base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b'intune_provisioning_users{estate="contoso",provisioning_stage="intune_enabled"} 1.0' in body
    status, headers, body = get(base + "/metrics", {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip" and b"intune_exporter_build_info" in gzip.decompress(body)
    status, headers, body = get(base + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    assert get(base + "/-/healthy")[0] == 200
    assert get(base + "/-/ready")[0] == 200
    assert get(base + "/nope")[0] == 404
    status, _, page = get(base + "/")
    assert status == 200 and b'href="metrics"' in page and b"fake configmgr" in page
    assert b"contoso" in page  # what the page shows is tested with pages.py


def test_ready_only_once_every_source_has_data(serve):
    from exporter.config import Config, EstateConfig
    from exporter.engine import Engine
    from exporter.sources.base import SourceError
    from tests.builders import ad, ad_user
    from tests.fakes import FakeSource

    def down(previous):
        raise SourceError("network", "dc01 unreachable")

    source = FakeSource("ad", down)
    engine = Engine(Config(estates=(EstateConfig(name="e"),)), {"e": [source]})
    port = serve(engine)
    assert get(f"http://127.0.0.1:{port}/-/ready")[0] == 503
    engine.refresh_all()  # a failed first refresh brings no data: still not ready
    assert get(f"http://127.0.0.1:{port}/-/ready")[0] == 503
    source.behaviour = ad(ad_user("r"))
    engine.refresh_all()
    assert get(f"http://127.0.0.1:{port}/-/ready")[0] == 200
    source.behaviour = down
    engine.refresh_all()  # once it had data, a later failure keeps it ready (last good data is served)
    assert get(f"http://127.0.0.1:{port}/-/ready")[0] == 200


def test_stuck_json(serve):
    port = serve(full_engine(stuck_users=3))
    status, headers, body = get(f"http://127.0.0.1:{port}/stuck")
    assert status == 200 and headers["Content-Type"] == "application/json"
    document = json.loads(body)
    (estate,) = document["estates"]
    assert estate["estate"] == "contoso" and estate["available"]
    ad_created = estate["stages"]["ad_created"]
    assert ad_created["count"] == 3 and ad_created["stuck_after_seconds"] == 7200
    assert [u["user"] for u in ad_created["users"]] == [
        "col2@contoso.com",
        "col1@contoso.com",
        "col0@contoso.com",
    ]
    assert ad_created["users"][0]["waiting_seconds"] == 10 * 3600 + 2
    assert set(estate["stages"]) == {
        "ad_created",
        "entra_synced",
        "cm_discovered",
        "in_intune_collection",
        "connector_synced",
    }


def test_stuck_json_without_names(serve):
    port = serve(full_engine(stuck_users=3, user_label="none"), user_label="none")
    document = json.loads(get(f"http://127.0.0.1:{port}/stuck")[2])
    assert "users" not in document["estates"][0]["stages"]["ad_created"]
    assert document["estates"][0]["stages"]["ad_created"]["count"] == 3


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    ca = trustme.CA()
    directory = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    return ca, directory


def test_tls_and_basic_auth(serve, tls):
    _ca, directory = tls
    hashed = bcrypt.hashpw(b"scrape-pass", bcrypt.gensalt(rounds=4)).decode()
    web = directory / "web.yml"
    web.write_text(
        f"tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
        "http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
    )
    port = serve(full_engine(), load_web_config(str(web)))
    context = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    url = f"https://127.0.0.1:{port}"
    status, headers, _ = get(url + "/metrics", context=context)
    assert status == 401 and "Basic" in headers["WWW-Authenticate"]
    bad = {"Authorization": "Basic " + base64.b64encode(b"prometheus:wrong").decode()}
    assert get(url + "/metrics", bad, context)[0] == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"prometheus:scrape-pass").decode()}
    for path in ("/metrics", "/stuck"):
        status, headers, _body = get(url + path, good, context)
        assert status == 200 and headers["X-Frame-Options"] == "deny"
    assert get(url + "/stuck", context=context)[0] == 401
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        get(f"http://127.0.0.1:{port}/metrics")  # plain HTTP against a TLS port


def test_web_config_errors_name_the_key(tmp_path):
    # One example; tests/web/test_webconfig.py goes through every kind of mistake.
    web = tmp_path / "web.yml"
    web.write_text(
        "tls_server_config:\n  client_auth_type: Sometimes\nbasic_auth_users:\n  u: plain\nfoo: 1\n"
    )
    with pytest.raises(WebConfigError) as info:
        load_web_config(str(web))
    text = "\n".join(info.value.problems)
    assert "--web.config.file: foo: unknown key" in text
    assert "--web.config.file: tls_server_config.client_auth_type: must be one of" in text
    assert "--web.config.file: basic_auth_users.u: must be a bcrypt hash" in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":9863", ("0.0.0.0", 9863)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:9863", ("::1", 9863)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_listen_address(text, expected):
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["9863", "host:", "host:99999", "a:b:c"])
def test_bad_listen_address(text):
    with pytest.raises(ValueError):
        parse_listen_address(text)


def test_every_endpoint_answers_before_the_engine_exists(serve):
    """The CLI listens before the source clients are built: until then the app serves this snapshot."""
    starting = Snapshot(estates=(), taken_at=time.time(), restoring=True)
    port = serve(SimpleNamespace(snapshot=lambda: starting))
    base = f"http://127.0.0.1:{port}"
    assert get(base + "/-/healthy")[0] == 200
    assert get(base + "/-/ready")[0] == 503
    status, _, body = get(base + "/metrics")
    assert status == 200 and b"intune_exporter_build_info" in body
    assert get(base + "/")[0] == 200
    assert get(base + "/stuck")[0] == 200
    assert get(base + "/trace?user=jdoe")[0] == 404
