"""Real servers over real sockets for the web tests: the transport in this process with a small
app, and certificates from two unrelated CAs for client-certificate tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from exporter.httpserver import App, ExporterHTTPServer, Limits, Request, Response
from exporter.webconfig import WebConfig, load_web_config


def hello_app(request: Request) -> Response:
    if request.path == "/big":
        return Response(200, b"x" * 4_000_000, "text/plain")
    if request.path == "/boom":
        raise RuntimeError("the app failed")
    return Response(
        200, f"hello {request.method} {request.path} {dict(request.query)}\n".encode(), "text/plain"
    )


StartServer = Callable[..., ExporterHTTPServer]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    servers: list[ExporterHTTPServer] = []

    def start(
        web_config: WebConfig | str | None = None, app: App = hello_app, limits: Limits | None = None
    ) -> ExporterHTTPServer:
        if not isinstance(web_config, WebConfig):
            web_config = load_web_config(web_config)
        server = ExporterHTTPServer(("127.0.0.1", 0), app, web_config, limits)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@dataclass
class Certificates:
    directory: Path
    server_ca: trustme.CA
    client_ca: trustme.CA  # the CA that client_ca_file names
    stranger_ca: trustme.CA  # an unrelated CA: its certificates verify against nothing configured

    def client_pair(self, ca: trustme.CA, name: str, *sans: str) -> tuple[str, str]:
        """A client certificate (and key) for ``sans`` issued by ``ca``, as file paths."""
        issued = ca.issue_cert(*(sans or ("client.example",)))
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        return str(cert), str(key)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("web-tls")
    server_ca, client_ca, stranger_ca = trustme.CA(), trustme.CA(), trustme.CA()
    issued = server_ca.issue_cert("127.0.0.1", "localhost")
    issued.private_key_pem.write_to_path(str(directory / "server.key"))
    issued.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    server_ca.cert_pem.write_to_path(str(directory / "server-ca.pem"))
    client_ca.cert_pem.write_to_path(str(directory / "client-ca.pem"))
    return Certificates(directory, server_ca, client_ca, stranger_ca)
