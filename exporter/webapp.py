"""The exporter's routes: what each path answers, from the engine's current snapshot.

The transport (``exporter.httpserver``) parses requests, applies basic auth and the configured
headers, and turns an exception here into a 500; this module only maps a :class:`Request` to a
:class:`Response`. A request never reaches a backend: every route reads the current snapshot.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial

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

    renderings: dict[tuple[str, bool], SharedRendering] = {}
    renderings_lock = threading.Lock()

    def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.header("accept"))
        compress = "gzip" in request.header("accept-encoding")
        with renderings_lock:
            rendering = renderings.get((content_type, compress))
            if rendering is None:
                render = partial(_exposition, encoder, registry, compress)
                rendering = renderings[(content_type, compress)] = SharedRendering(render)
        body = rendering.get()
        return Response(200, body, content_type, {"Content-Encoding": "gzip"} if compress else {})

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


def _exposition(
    encoder: Callable[[CollectorRegistry], bytes], registry: CollectorRegistry, compress: bool
) -> bytes:
    body = encoder(registry)
    return gzip.compress(body, compresslevel=6) if compress else body


class SharedRendering:
    """Requests that arrive while a rendering is under way wait for it and share its result.

    Rendering the exposition costs a few milliseconds of CPU under the GIL; twenty scrapers arriving
    together would otherwise queue for twenty renderings. Each response still reflects the registry
    as of a moment no earlier than one rendering before its request, and nothing is kept once the
    rendering is delivered (no stale cache).
    """

    def __init__(self, render: Callable[[], bytes]) -> None:
        self._render = render
        self._lock = threading.Lock()
        self._current: Future[bytes] | None = None

    def get(self) -> bytes:
        with self._lock:
            current = self._current
            leader = current is None
            if current is None:
                current = self._current = Future()
        if leader:
            try:
                current.set_result(self._render())
            except BaseException as exc:
                current.set_exception(exc)
            finally:
                with self._lock:
                    self._current = None
        return current.result()
