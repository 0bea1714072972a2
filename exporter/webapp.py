"""The exporter's routes: what each path answers, from the engine's current snapshot.

The transport (``exporter.httpserver``) parses requests, applies basic auth and the configured
headers, and turns an exception here into a 500; this module only maps a :class:`Request` to a
:class:`Response`. A request never reaches a backend: every route reads the current snapshot.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
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
Encoder = Callable[[CollectorRegistry], bytes]

log = logging.getLogger(__name__)

TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
JSON = "application/json"
TITLE = "intune-provisioning-exporter"
RUNTIME_MAX_AGE = 1.0  # seconds a rendering of the runtime metrics (process CPU, memory, GC) is reused
OPENMETRICS_EOF = b"# EOF\n"


class MetricsRenderer:
    """The /metrics bodies: the snapshot's metrics rendered once per snapshot, the runtime metrics
    (process CPU and memory, GC) at most ``RUNTIME_MAX_AGE`` seconds old.

    Rendering the snapshot's metrics costs milliseconds of pure-Python CPU under the GIL (8 ms for
    the demo's three estates), and they only change with the snapshot: rendered once, a scrape
    costs a copy and the runtime metrics' 0.2 ms. :meth:`keep_warm` renders each new snapshot in
    the background, for every format scraped so far, so no scrape waits for that rendering; a
    scrape that arrives first still renders it once for every request that arrives meanwhile.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        snapshot: Callable[[], Snapshot],
        runtime: CollectorRegistry | None = None,
    ) -> None:
        self._registry = registry
        self._snapshot = snapshot
        self._runtime = runtime
        self._lock = threading.Lock()
        self._parts: dict[str, SharedRendering] = {}  # content type -> the snapshot's metrics
        self._bodies: dict[tuple[str, bool], SharedRendering] = {}  # (content type, gzip) -> body

    def render(self, accept: str, accept_encoding: str) -> tuple[bytes, str, bool]:
        """(body, content type, gzip-compressed) for a request's Accept and Accept-Encoding."""
        encoder, content_type = choose_encoder(accept)
        compress = "gzip" in accept_encoding
        with self._lock:
            body = self._bodies.get((content_type, compress))
            if body is None:
                part = self._part(encoder, content_type)
                render = partial(self._body, part, encoder, compress)
                body = SharedRendering(render, self._snapshot, RUNTIME_MAX_AGE)
                self._bodies[(content_type, compress)] = body
        return body.get(), content_type, compress

    def warm(self) -> None:
        """Render the current snapshot's metrics in every format scraped so far."""
        with self._lock:
            parts = list(self._parts.values())
        for part in parts:
            part.get()

    def keep_warm(self, stop: threading.Event, interval: float = 0.1) -> None:
        """:meth:`warm` for each new snapshot, until ``stop`` is set (the body of a daemon thread)."""
        seen: object = None
        while not stop.wait(interval):
            current = self._snapshot()
            if current is seen:
                continue
            try:
                self.warm()
            except Exception:  # the scrape that renders it reports the failure; keep watching
                log.exception("rendering the metrics of a new snapshot failed")
            seen = current

    def _part(self, encoder: Encoder, content_type: str) -> SharedRendering:
        part = self._parts.get(content_type)
        if part is None:
            part = SharedRendering(partial(encoder, self._registry), self._snapshot, math.inf)
            self._parts[content_type] = part
        return part

    def _body(self, part: SharedRendering, encoder: Encoder, compress: bool) -> bytes:
        body = part.get()
        if self._runtime is not None:
            live = encoder(self._runtime)
            if body.endswith(OPENMETRICS_EOF) and live.endswith(OPENMETRICS_EOF):
                body = body[: -len(OPENMETRICS_EOF)]  # one exposition, one end marker
            body += live
        return gzip.compress(body, compresslevel=6) if compress else body


def build_app(metrics_renderer: MetricsRenderer, snapshot: Callable[[], Snapshot], user_label: str) -> App:
    """Every path the exporter serves; add a route by adding an entry here."""

    def metrics(request: Request) -> Response:
        body, content_type, compressed = metrics_renderer.render(
            request.header("accept"), request.header("accept-encoding")
        )
        return Response(200, body, content_type, {"Content-Encoding": "gzip"} if compressed else {})

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


class SharedRendering:
    """One rendering serves every request that arrives while it is under way, and is reused for up
    to ``max_age`` seconds while ``version()`` (the engine's snapshot) is the same object; a new
    snapshot is rendered at once. Twenty scrapers arriving together wait for one rendering, not
    for twenty one after another."""

    def __init__(
        self, render: Callable[[], bytes], version: Callable[[], object] = object, max_age: float = 0.0
    ) -> None:
        self._render = render
        self._version = version
        self._max_age = max_age
        self._lock = threading.Lock()
        self._current: Future[bytes] | None = None
        self._last: tuple[object, float, bytes] | None = None  # (version, started at, body)

    def get(self) -> bytes:
        version = self._version()
        with self._lock:
            if self._last is not None:
                last_version, started, body = self._last
                if last_version is version and time.monotonic() - started < self._max_age:
                    return body
            leader = self._current is None
            if leader:
                self._current = Future()
            current: Future[bytes] = self._current  # type: ignore[assignment]
        if leader:
            self._lead(current, version)
        return current.result()

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
