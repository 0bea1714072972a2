"""The exporter's routes: what each path answers, from the engine's current snapshot.

The transport (``exporter.httpserver``) parses requests, applies basic auth and the configured
headers, and turns an exception here into a 500; this module only maps a :class:`Request` to a
:class:`Response`. A request never reaches a backend: every route reads the current snapshot.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from exporter.engine import Snapshot
from exporter.httpserver import App, Request, Response
from exporter.pages import TraceNotFound, landing_page, stuck_document, trace_documents, trace_page

Route = Callable[[Request], Response]

TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
JSON = "application/json"
TITLE = "intune-provisioning-exporter"
RENDERING_MAX_AGE = 1.0  # seconds a /metrics rendering is reused while the snapshot is unchanged
RENDERING_STALE_FOR = 10.0  # ... and served while a fresh one renders in the background


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
                rendering = SharedRendering(render, snapshot, RENDERING_MAX_AGE, RENDERING_STALE_FOR)
                renderings[(content_type, compress)] = rendering
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

    def trace(request: Request) -> Response:
        user = (request.query.get("user") or [""])[0].strip()
        estate = (request.query.get("estate") or [""])[0].strip() or None
        if not user:
            return Response(400, b"Bad Request: ?user=UPN, sAMAccountName, DOMAIN\\sam or GUID\n", TEXT)
        current = snapshot()
        if (request.query.get("format") or [""])[0] == "json":
            try:
                documents = trace_documents(current, user, estate)
            except TraceNotFound:
                missing = {"error": "no in-scope user matches", "user": user}
                return Response(404, json.dumps(missing).encode(), JSON)
            body = documents[0] if len(documents) == 1 else documents
            return Response(200, json.dumps(body, indent=2, ensure_ascii=False).encode(), JSON)
        status, page = trace_page(current, user, estate)
        return Response(status, page.encode(), HTML)

    routes: dict[str, Route] = {
        "/metrics": metrics,
        "/": landing,
        "/-/healthy": healthy,
        "/-/ready": ready,
        "/stuck": stuck,
        "/trace": trace,
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
    """One rendering of the exposition serves every request that arrives while it is under way, and
    is reused for up to ``max_age`` seconds while the engine's snapshot is the same object.

    Rendering costs a few milliseconds of pure-Python CPU under the GIL; twenty scrapers arriving
    together would otherwise queue behind twenty renderings. The exporter's own metrics are a
    function of the snapshot, so a new snapshot is rendered at once; only the process and runtime
    metrics (CPU seconds, memory, GC counts) can be older. Between ``max_age`` and ``stale_for``
    seconds a rendering of the same snapshot is still served, at once, while a fresh one renders in
    the background for the next request: scrapers that arrive often never wait for a rendering,
    and those metrics are at most ``stale_for`` seconds old.
    """

    def __init__(
        self,
        render: Callable[[], bytes],
        version: Callable[[], object] = object,
        max_age: float = 0.0,
        stale_for: float = 0.0,
    ) -> None:
        self._render = render
        self._version = version
        self._max_age = max_age
        self._stale_for = max(stale_for, max_age)
        self._lock = threading.Lock()
        self._current: Future[bytes] | None = None
        self._last: tuple[object, float, bytes] | None = None  # (snapshot, started at, body)

    def get(self) -> bytes:
        version = self._version()
        with self._lock:
            kept = self._kept(version)
            if kept is not None:
                body, fresh = kept
                if fresh or self._current is not None:
                    return body
                # Served as it is; the next request gets the rendering started here.
                behind: Future[bytes] = Future()
                self._current = behind
            else:
                leader = self._current is None
                if self._current is None:
                    self._current = Future()
                current: Future[bytes] = self._current
        if kept is not None:
            threading.Thread(target=self._lead, args=(behind, version), name="render", daemon=True).start()
            return kept[0]
        if leader:
            self._lead(current, version)
        return current.result()

    def _kept(self, version: object) -> tuple[bytes, bool] | None:
        """(the last rendering, whether it is fresh) when it may be served for ``version``."""
        if self._last is None:
            return None
        last_version, started, body = self._last
        age = time.monotonic() - started
        if last_version is not version or age >= self._stale_for:
            return None
        return body, age < self._max_age

    def _lead(self, current: Future[bytes], version: object) -> None:
        started = time.monotonic()
        try:
            body = self._render()
        except BaseException as exc:
            current.set_exception(exc)
            with self._lock:
                self._current = None
            return
        with self._lock:
            self._last = (version, started, body)
            self._current = None
        current.set_result(body)
