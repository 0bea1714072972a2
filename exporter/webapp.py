"""The exporter's routes: what each path answers, from the engine's current snapshot.

The transport (``exporter.httpserver``) parses requests, applies basic auth and the configured
headers, and turns an exception here into a 500; this module only maps a :class:`Request` to a
:class:`Response`. A request never reaches a backend: every route reads the current snapshot.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from exporter.engine import Snapshot
from exporter.httpserver import App, Request, Response
from exporter.pages import landing_page, stuck_document

Route = Callable[[Request], Response]

TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
JSON = "application/json"
TITLE = "intune-provisioning-exporter"


def build_app(registry: CollectorRegistry, snapshot: Callable[[], Snapshot], user_label: str) -> App:
    """Every path the exporter serves; add a route by adding an entry here."""

    def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.header("accept"))
        body = encoder(registry)
        if "gzip" in request.header("accept-encoding"):
            return Response(200, gzip.compress(body), content_type, {"Content-Encoding": "gzip"})
        return Response(200, body, content_type)

    def landing(request: Request) -> Response:
        return Response(200, landing_page(snapshot(), TITLE).encode(), HTML)

    def healthy(request: Request) -> Response:
        return Response(200, b"Healthy\n", TEXT)

    def ready(request: Request) -> Response:
        if snapshot().ready:
            return Response(200, b"Ready\n", TEXT)
        return Response(503, b"Not ready: waiting for the first refresh of every source\n", TEXT)

    def stuck(request: Request) -> Response:
        document = stuck_document(snapshot(), user_label)
        return Response(200, json.dumps(document, indent=2).encode(), JSON)

    routes: dict[str, Route] = {
        "/metrics": metrics,
        "/": landing,
        "/-/healthy": healthy,
        "/-/ready": ready,
        "/stuck": stuck,
    }

    def app(request: Request) -> Response:
        route = routes.get(request.path)
        if route is None:
            return Response(404, b"Not Found\n", TEXT)
        return route(request)

    return app
