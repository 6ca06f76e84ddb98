"""The HTTP inference server every inference instance runs.

    python -m inference.server --model DIR_OR_S3_URI --port 8080 [--max-batch-tokens 8192 ...]

Endpoints: ``POST /v1/classify``, ``GET /healthz`` (alive), ``GET /readyz`` (model loaded and
warmed, not draining), ``GET /metrics`` (Prometheus), ``GET /v1/model`` (manifest, variant,
provider in use, limits), ``GET /openapi.json``, and ``POST /admin/swap {"uri": ...}`` (hot
swap, loopback only; the instance agent calls it during a rollout).

What it guarantees:
- admission is bounded: past ``max_inflight_requests`` a request is answered 429 at once;
- bad input is a 4xx naming the problem (``inference.serve_errors``), never a 500;
- on SIGTERM, /readyz turns 503, admitted requests all finish, the process exits 0;
- a hot swap loads and warms the new model beside the old one and switches atomically;
  texts already queued finish on the model they were admitted under; an artifact that fails
  verification is refused and the old model keeps serving.

``create_app(settings)`` builds the ASGI app (tests run it in-process or as a subprocess).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from inference.batching import Batcher
from inference.serve_errors import ServeError
from inference.serve_settings import FIELD_NAMES, Settings, SettingsError, cli_to_env

log = logging.getLogger("nlpfleet.server")

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
ALLOWED_FIELDS = {"inputs", "top_k"}
# Latency buckets from 1 ms to 10 s: the autoscaler reads p99 against a 100 ms target.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The Prometheus series the autoscaler and operators read (one registry per app)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory, open fds
        self.requests = Counter("nlpfleet_requests", "Classify requests by HTTP status", ["code"], registry=r)
        self.errors = Counter("nlpfleet_errors", "Failed requests by error kind", ["kind"], registry=r)
        self.inflight = Gauge(
            "nlpfleet_inflight_requests", "Admitted classify requests not answered yet", registry=r
        )
        self.queue = Gauge(
            "nlpfleet_queue_depth", "Texts admitted and not yet handed to a model runner", registry=r
        )
        self.latency = Histogram(
            "nlpfleet_request_latency_seconds",
            "Latency of admitted classify requests",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.texts = Counter("nlpfleet_texts", "Texts classified", registry=r)
        self.batch_size = Histogram(
            "nlpfleet_batch_size", "Texts per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.batch_tokens = Histogram(
            "nlpfleet_batch_padded_tokens",
            "Padded tokens per batch (longest x count)",
            buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "nlpfleet_batch_run_seconds", "Model run time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        # Against the process's CPU (process_cpu_seconds_total), what the model runs cost and
        # what serving around them (HTTP, JSON, tokenization, batching) costs.
        self.model_cpu = Counter(
            "nlpfleet_model_cpu_seconds",
            "CPU time of model runs (padding, session run, scores), all runner threads",
            registry=r,
        )
        self.ready = Gauge(
            "nlpfleet_ready", "1 when the model is loaded and warm and the server not draining", registry=r
        )
        self.model_info = Gauge(
            "nlpfleet_model_info",
            "The model being served",
            ["name", "version", "variant", "provider"],
            registry=r,
        )
        self.swaps = Counter("nlpfleet_swaps", "Hot swaps by result", ["result"], registry=r)
        self._by_code: dict[int, Counter] = {}

    # BatchMetrics protocol (inference.batching)
    def observe_batch(self, size: int, padded_tokens: int, run_s: float, cpu_s: float) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(padded_tokens)
        self.batch_seconds.observe(run_s)
        self.model_cpu.inc(cpu_s)
        self.texts.inc(size)

    def count_request(self, code: int) -> None:
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self.requests.labels(str(code))
        child.inc()


class State:
    """Mutable state of one server: the model in use, readiness, draining, admission count."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.model = None  # inference.runtime.Classifier once loaded
        self.load_error: str | None = None
        self.draining = False  # SIGTERM received: /readyz 503
        self.refusing = False  # past the drain grace: new work gets 503
        self.inflight = 0
        self.swap_lock = asyncio.Lock()
        self.fetched: set[Path] = set()  # artifacts this process downloaded from S3
        self.batcher: Batcher | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def ready(self) -> bool:
        return self.model is not None and not self.draining

    def set_model(self, clf) -> None:
        # One assignment on the event loop thread: requests see either the old or the new model.
        if self.batcher is not None:
            self.batcher.max_batch_tokens = self.settings.batch_tokens_for(
                clf.providers_in_use[0], clf.max_tokens
            )
        old, self.model = self.model, clf
        if old is not None:
            self.metrics.model_info.remove(old.name, old.version, old.variant, old.providers_in_use[0])
        self.metrics.model_info.labels(clf.name, clf.version, clf.variant, clf.providers_in_use[0]).set(1)
        self.metrics.ready.set(1 if self.ready else 0)

    def admit(self) -> bool:
        """Take an in-flight slot, or refuse at once: waiting here is what lets latency and
        memory grow without bound under overload."""
        if self.inflight >= self.settings.max_inflight_requests:
            return False
        self.inflight += 1
        self.idle.clear()
        return True

    def release(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


def is_loopback(host: str) -> bool:
    """Whether a client address is this machine's loopback (the only callers of /admin/swap)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(e: ServeError, metrics: Metrics | None = None) -> JSONResponse:
    if metrics is not None:
        metrics.errors.labels(e.kind).inc()
    return JSONResponse(e.body(), status_code=e.status)


def parse_classify(body: bytes, settings: Settings, n_labels: int) -> tuple[list[str], int]:
    """Validate a classify request body; return (texts, top_k) or raise ``ServeError``.

    >>> s = Settings.from_env({"NLPFLEET_MODEL": "/m"})
    >>> parse_classify(b'{"inputs": ["hi"], "top_k": 2}', s, 77)
    (['hi'], 2)
    >>> parse_classify(b'{"inputs": []}', s, 77)
    Traceback (most recent call last):
    ...
    inference.serve_errors.ServeError: 'inputs' is empty: send at least one text
    """
    if not body.strip():
        raise ServeError("empty", 'request body is empty: send {"inputs": ["text", ...]}')
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServeError("malformed", f"request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ServeError("malformed", f"request body must be a JSON object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - ALLOWED_FIELDS)
    if unknown:
        raise ServeError("invalid", f"unknown field(s) {unknown}: allowed are {sorted(ALLOWED_FIELDS)}")
    if "inputs" not in doc:
        raise ServeError("invalid", "field 'inputs' is required (a list of strings)")
    texts = doc["inputs"]
    if not isinstance(texts, list):
        raise ServeError("invalid", f"'inputs' must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise ServeError("empty", "'inputs' is empty: send at least one text")
    if len(texts) > settings.max_texts_per_request:
        raise ServeError(
            "too_large", f"{len(texts)} texts in one request; at most {settings.max_texts_per_request}"
        )
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ServeError("invalid", f"inputs[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():
            raise ServeError("empty", f"inputs[{i}] is empty")
        if len(t) > settings.max_chars_per_text:
            raise ServeError(
                "too_large", f"inputs[{i}] has {len(t)} characters; at most {settings.max_chars_per_text}"
            )
    top_k = doc.get("top_k", 1)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= n_labels:
        raise ServeError("invalid", f"'top_k' must be an integer in 1..{n_labels}, got {top_k!r}")
    return texts, top_k


def _max_body_bytes(s: Settings) -> int:
    # Worst case of a valid request: every character escaped as \uXXXX, plus JSON framing.
    return s.max_texts_per_request * (s.max_chars_per_text * 6 + 8) + 1024


def _cache_dir_for(uri: str, root: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.removeprefix("s3://").strip("/"))
    return Path(root) / safe


def prune_model_cache(fetched: set[Path], keep: list[Path]) -> list[Path]:
    """Remove the artifacts this process fetched from S3 except ``keep`` (the model in use and
    the one it replaced, the rollback candidate); return what was removed. Only directories this
    process fetched are candidates: a local ``--model DIR``, or another process's download in a
    shared cache, is never touched."""
    import shutil

    kept = {p.resolve() for p in keep}
    removed = []
    for d in sorted(fetched):
        if d.resolve() not in kept and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    fetched.difference_update(removed)
    return removed


def resolve_model(uri: str, settings: Settings, s3_client=None) -> Path:
    """A local artifact directory for ``uri``: the directory itself, or an ``s3://`` artifact
    fetched (and verified) into the model cache."""
    if not uri.startswith("s3://"):
        return Path(uri)
    from inference.artifact import fetch_artifact

    if s3_client is None:
        import boto3

        s3_client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url or None)
    return fetch_artifact(uri, _cache_dir_for(uri, settings.model_cache_dir), s3_client)


def load_and_warm(uri: str, settings: Settings, s3_client=None):
    """Blocking: fetch/verify/load/warm a model (runs in a worker thread)."""
    from inference.runtime import load_classifier

    t0 = time.perf_counter()
    clf = load_classifier(
        resolve_model(uri, settings, s3_client),
        variant=settings.variant or None,
        providers=list(settings.providers) or None,
        max_tokens_per_text=settings.max_tokens_per_text,
        intra_op_threads=settings.intra_op_threads,
        max_batch_size=settings.max_batch_size,
        trt_cache_dir=settings.trt_cache_dir,
    )
    clf.warmup(settings.warmup_rounds, settings.max_batch_size)
    if settings.batch_run_overhead_tokens:
        clf.run_overhead_tokens, clf.run_overhead_source = settings.batch_run_overhead_tokens, "configured"
    else:
        fixed_s, per_token_s = clf.run_cost()
        clf.run_overhead_tokens = min(1e6, fixed_s / per_token_s)
        clf.run_overhead_source = (
            f"measured: {fixed_s * 1e3:.2f} ms per run + {per_token_s * 1e6:.1f} us per token"
        )
    log.info(
        "model %s/%s ready in %.1fs: variant=%s provider=%s, run overhead %.1f tokens (%s)",
        clf.name,
        clf.version,
        time.perf_counter() - t0,
        clf.variant,
        clf.providers_in_use[0],
        clf.run_overhead_tokens,
        clf.run_overhead_source,
    )
    return clf


async def _send_json(send, status: int, doc: dict) -> None:
    # As Starlette's JSONResponse renders it.
    body = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _never_routed(request: Request) -> Response:  # ServerApp answers POST /v1/classify
    raise AssertionError("POST /v1/classify reached the router")


class ServerApp(Starlette):
    """Starlette for every endpoint but the hot one: ``POST /v1/classify`` goes straight to its
    ASGI handler. Measured on 2 cores under wrk: the Starlette stack (middleware, router,
    Request, JSONResponse) cost about as much event-loop CPU per request as the handler itself."""

    def __init__(self, classify, **kwargs):
        super().__init__(**kwargs)
        self._classify = classify

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/classify":
            scope["app"] = self
            await self._classify(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def resolve_threads(settings: Settings, hardware=None) -> Settings:
    """``settings`` with ``run_workers`` and ``intra_op_threads`` resolved for this machine
    (``Settings.threads_for``): GPU when one is present, this onnxruntime can drive it, and the
    providers are not overridden to CPU."""
    import dataclasses

    from inference.providers import GPU_PROVIDERS, detect_hardware

    hw = hardware or detect_hardware()
    on_gpu = (
        hw.gpu_count > 0
        and any(p in GPU_PROVIDERS for p in hw.available_providers)
        and (not settings.providers or settings.providers[0] in GPU_PROVIDERS)
    )
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers, threads = settings.threads_for(on_gpu=on_gpu, cpus=cpus)
    return dataclasses.replace(settings, run_workers=workers, intra_op_threads=threads)


def runner_cpus(settings: Settings, hardware=None) -> list[int]:
    """The CPUs the runner threads are pinned to, one each: the cores this process may use, when
    it runs one single-threaded CPU run per core (resolved settings) and ``pin_runners`` is on;
    else none (no pinning). Off by default: pinned runners served more in one A/B on this shared
    2-core machine and less in the benchmark runs after it (docs/serving.md), and a pinned
    runner cannot move away from a core that other work is using."""
    from inference.providers import GPU_PROVIDERS, detect_hardware

    if not settings.pin_runners or settings.intra_op_threads != 1 or not hasattr(os, "sched_getaffinity"):
        return []
    hw = hardware or detect_hardware()
    if hw.gpu_count > 0 and any(p in GPU_PROVIDERS for p in hw.available_providers):
        if not settings.providers or settings.providers[0] in GPU_PROVIDERS:
            return []
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if settings.run_workers == len(cpus) else []


def create_app(settings: Settings, *, s3_client=None) -> Starlette:
    """The ASGI app. The model loads in the background after start-up, so /healthz answers
    while it loads and /readyz says 503 until it is loaded and warmed."""
    settings = resolve_threads(settings)
    metrics = Metrics()
    state: State | None = None
    loader: asyncio.Task | None = None

    def st() -> State:
        assert state is not None, "app not started"
        return state

    async def load_initial() -> None:
        s = st()
        try:
            clf = await asyncio.to_thread(load_and_warm, settings.model, settings, s3_client)
        except Exception as e:
            s.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load model %s: %s", settings.model, s.load_error)
            if app.state.on_fatal:
                app.state.on_fatal()
            return
        if settings.model.startswith("s3://"):
            s.fetched.add(clf.artifact_dir)
        s.set_model(clf)

    @contextlib.asynccontextmanager
    async def lifespan(app_):
        nonlocal state, loader
        state = State(settings, metrics)
        state.batcher = Batcher(
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens
            or settings.max_tokens_per_text,  # until the model loads
            max_wait_ms=settings.max_wait_ms,
            token_overflow=settings.token_overflow,
            run_workers=settings.run_workers,
            pin_cpus=runner_cpus(settings),
            metrics=metrics,
        )
        state.batcher.start()
        # Gauges read when scraped rather than set on every request (the hot path).
        metrics.inflight.set_function(lambda: state.inflight)
        metrics.queue.set_function(lambda: state.batcher.queue_depth)
        app.state.server_state = state
        loader = asyncio.get_running_loop().create_task(load_initial())
        yield
        loader.cancel()
        await state.batcher.stop()

    async def classify(scope, receive, send) -> None:
        """POST /v1/classify as a bare ASGI handler (``ServerApp`` routes it here first): the
        hot path skips routing, Request/Response objects and the exception middleware, which
        cost more CPU per request than the whole tokenization of a short text."""
        s = st()
        code = 200
        try:
            if s.refusing:
                raise ServeError("draining", "server is shutting down; retry on another instance")
            if s.model is None:
                why = f"model failed to load: {s.load_error}" if s.load_error else "model is loading"
                raise ServeError("not_ready", why)
            if not s.admit():
                raise ServeError(
                    "overloaded", f"{settings.max_inflight_requests} requests already in flight; retry later"
                )
        except ServeError as e:
            metrics.count_request(e.status)
            metrics.errors.labels(e.kind).inc()
            await _send_json(send, e.status, e.body())
            return
        t0 = time.perf_counter()
        model = s.model  # the model this request is admitted under, even if a swap follows
        doc: dict | None = None
        try:
            limit = _max_body_bytes(settings)
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if length is not None and length.isdigit() and int(length) > limit:
                raise ServeError("too_large", f"request body of {length.decode()} bytes is over {limit}")
            # Read with a cap: a chunked body without Content-Length cannot grow past it either.
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise ServeError("too_large", f"request body is over {limit} bytes")
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            texts, top_k = parse_classify(body, settings, len(model.labels))
            results = await s.batcher.submit(model, texts, top_k)
            doc = {"model": {"name": model.name, "version": model.version}, "results": results}
        except ServeError as e:
            code = e.status
            metrics.errors.labels(e.kind).inc()
            doc = e.body()
        except ClientDisconnect:
            code = 499  # the client left before sending its whole body: nobody to answer
        except Exception as e:  # a bug of ours: a 500 with the traceback in the log
            log.exception("classify failed")
            code = 500
            err = ServeError("backend", f"internal error: {type(e).__name__}")
            metrics.errors.labels(err.kind).inc()
            doc = err.body()
        finally:
            s.release()
        metrics.latency.observe(time.perf_counter() - t0)
        metrics.count_request(code)
        if doc is not None:
            await _send_json(send, code, doc)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        s = st()
        if s.draining:
            return _error(ServeError("draining", "draining: finishing in-flight requests"))
        if s.model is None:
            why = f"model failed to load: {s.load_error}" if s.load_error else "model is loading"
            return _error(ServeError("not_ready", why))
        return JSONResponse({"status": "ready", "model": {"name": s.model.name, "version": s.model.version}})

    async def metrics_endpoint(request: Request) -> Response:
        if state is not None:
            metrics.ready.set(1 if state.ready else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def model_info(request: Request) -> Response:
        s = st()
        if s.model is None:
            return _error(ServeError("not_ready", s.load_error or "model is loading"))
        return JSONResponse(
            {
                **s.model.describe(),
                "limits": {
                    "max_texts_per_request": settings.max_texts_per_request,
                    "max_chars_per_text": settings.max_chars_per_text,
                    "max_tokens_per_text": s.model.max_tokens,
                    "token_overflow": settings.token_overflow,
                    "max_inflight_requests": settings.max_inflight_requests,
                },
                "batching": {
                    "run_workers": settings.run_workers,
                    "intra_op_threads": settings.intra_op_threads,
                    "pinned_cpus": s.batcher.pin_cpus,
                    "max_batch_size": settings.max_batch_size,
                    "max_batch_tokens": s.batcher.max_batch_tokens,
                    "max_wait_ms": settings.max_wait_ms,
                    "run_overhead_tokens": round(s.model.run_overhead_tokens, 2),
                    "run_overhead_source": s.model.run_overhead_source,
                },
            }
        )

    async def openapi(request: Request) -> Response:
        return Response(OPENAPI_PATH.read_bytes(), media_type="application/json")

    async def swap(request: Request) -> Response:
        s = st()
        client = request.client.host if request.client else ""
        if not is_loopback(client):
            return _error(ServeError("forbidden", "/admin/swap is only served on loopback"), metrics)
        try:
            doc = json.loads(await request.body() or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _error(ServeError("malformed", 'body must be JSON: {"uri": ...}'), metrics)
        if not isinstance(doc, dict) or not isinstance(doc.get("uri"), str) or not doc["uri"]:
            return _error(ServeError("invalid", 'body must be {"uri": "DIR or s3://..."}'), metrics)
        if s.draining:
            return _error(ServeError("draining", "server is draining"), metrics)
        if s.swap_lock.locked():
            return _error(ServeError("conflict", "a swap is already in progress"), metrics)
        async with s.swap_lock:
            t0 = time.perf_counter()
            try:
                new = await asyncio.to_thread(load_and_warm, doc["uri"], settings, s3_client)
                want = doc.get("manifest_sha256")
                if want:
                    got = hashlib.sha256((new.artifact_dir / "manifest.json").read_bytes()).hexdigest()
                    if got != want:
                        raise ValueError(f"manifest sha256 {got} != expected {want}")
                if s.model is not None and new.labels != s.model.labels:
                    log.warning(
                        "swap changes the label set (%d -> %d labels)", len(s.model.labels), len(new.labels)
                    )
            except Exception as e:
                metrics.swaps.labels("refused").inc()
                log.error("swap to %s refused: %s", doc["uri"], e)
                return _error(
                    ServeError("invalid", f"swap to {doc['uri']} refused, old model kept: {e}"[:2000]),
                    metrics,
                )
            old = s.model
            s.set_model(new)
            metrics.swaps.labels("ok").inc()
            if doc["uri"].startswith("s3://"):
                s.fetched.add(new.artifact_dir)
            keep = [new.artifact_dir] + ([old.artifact_dir] if old else [])
            removed = await asyncio.to_thread(prune_model_cache, s.fetched, keep)
            if removed:
                log.info("pruned %d old artifact(s) from %s", len(removed), settings.model_cache_dir)
            log.info("swapped %s/%s -> %s/%s", old and old.name, old and old.version, new.name, new.version)
            return JSONResponse(
                {
                    "swapped": True,
                    "previous": {"name": old.name, "version": old.version} if old else None,
                    "model": {"name": new.name, "version": new.version, "variant": new.variant},
                    "load_s": round(time.perf_counter() - t0, 3),
                }
            )

    async def http_error(request: Request, exc: HTTPException) -> Response:
        # Starlette's own 404/405 as the same JSON error shape as every other error.
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        if kind is None:
            return JSONResponse(
                {"error": {"kind": "http", "message": str(exc.detail)}}, status_code=exc.status_code
            )
        return _error(ServeError(kind, f"{request.method} {request.url.path}: {exc.detail}"))

    app = ServerApp(
        classify,
        exception_handlers={HTTPException: http_error},
        routes=[
            Route("/v1/classify", _never_routed, methods=["POST"]),  # listed for 405 on GET
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/v1/model", model_info, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/admin/swap", swap, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.on_fatal = None
    app.state.metrics = metrics
    return app


async def drain(state: State, settings: Settings, now=time.monotonic) -> bool:
    """SIGTERM: readiness 503 at once; keep admitting for ``drain_grace_s`` (the load balancer
    notices and stops routing here), then refuse new work and wait for in-flight requests.
    Returns True when every admitted request finished within ``drain_timeout_s``."""
    state.draining = True
    state.metrics.ready.set(0)
    log.info("draining: %d in flight, grace %.1fs", state.inflight, settings.drain_grace_s)
    if settings.drain_grace_s:
        await asyncio.sleep(settings.drain_grace_s)
    state.refusing = True
    try:
        await asyncio.wait_for(state.idle.wait(), settings.drain_timeout_s)
    except TimeoutError:
        log.error("drain timed out with %d requests in flight", state.inflight)
        return False
    log.info("drained")
    return True


def _arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m inference.server",
        description="nlpfleet inference server. Every flag can also be set as NLPFLEET_<NAME> in the environment.",
    )
    for name in FIELD_NAMES:
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, default=None, help=f"env NLPFLEET_{name.upper()}")
    return p


def main(argv: list[str] | None = None) -> int:
    # Tokenization already overlaps the model runs in its own thread; letting the Rust tokenizer
    # fan out over every core as well would take those cores from the model.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import uvicorn

    args = vars(_arg_parser().parse_args(argv))
    try:
        settings = Settings.from_env({**os.environ, **cli_to_env(args)})
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    app = create_app(settings)
    exit_code = 0

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # called by uvicorn's signal handler
            loop = getattr(self, "_loop", None)  # None: still starting up, nothing admitted yet
            if sig == signal.SIGTERM and not self.should_exit and loop is not None:
                loop.call_soon_threadsafe(self._begin_drain)
            else:
                super().handle_exit(sig, frame)

        def _begin_drain(self):
            state = app.state.server_state
            if state.draining:
                return

            async def run():
                nonlocal exit_code
                ok = await drain(state, settings)
                exit_code = 0 if ok else 1
                self.should_exit = True

            asyncio.get_running_loop().create_task(run())

        async def startup(self, sockets=None):
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets)

    def on_fatal():
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    app.state.on_fatal = on_fatal
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        # No X-Forwarded-* rewriting: nothing here reads it, /admin/swap must see the real peer
        # address, and it is per-request work on the hot path.
        proxy_headers=False,
        server_header=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        backlog=4096,
    )
    server = Server(config)
    server.run()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
