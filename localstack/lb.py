"""A small loopback load balancer in front of the local inference instances.

It behaves like an Application Load Balancer target group, as far as the product can tell:

- a target receives traffic only while it is *registered* (``targets_fn`` says which: the
  stack registers an Auto Scaling instance once its launch lifecycle hook completed, i.e. it is
  ``InService``, and deregisters it when it leaves that state) **and** *healthy* (its health
  check path answered 200 ``healthy_threshold`` times in a row; ``unhealthy_threshold`` failures
  take it out);
- a deregistered target gets no new requests; requests already sent to it finish (draining);
- routing is "least outstanding requests" (an ALB target-group option), ties broken round-robin;
- with no healthy target it answers 503, as an ALB does;
- a request whose connection to a target was refused never reached it, so it is retried on
  another target (at most ``max_retries``) and that target is marked unhealthy at once. Any
  other failure is returned to the client (502/504), never retried.

``GET /lb/status`` returns the targets and counters as JSON (local diagnostics only).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "upgrade"}


@dataclass
class Target:
    target_id: str
    url: str
    registered: bool = True
    healthy: bool = False
    ok_streak: int = 0
    fail_streak: int = 0
    outstanding: int = 0
    requests: int = 0
    responses: dict[int, int] = field(default_factory=dict)
    registered_at: float = field(default_factory=time.time)
    deregistered_at: float | None = None

    def as_dict(self) -> dict:
        return {
            "target_id": self.target_id,
            "url": self.url,
            "state": self.state,
            "outstanding": self.outstanding,
            "requests": self.requests,
            "responses": {str(k): v for k, v in sorted(self.responses.items())},
        }

    @property
    def state(self) -> str:
        if not self.registered:
            return "draining" if self.outstanding else "unused"
        return "healthy" if self.healthy else "unhealthy"


class LoadBalancer:
    def __init__(
        self,
        targets_fn: Callable[[], dict[str, str]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        health_path: str = "/readyz",
        health_interval_s: float = 0.5,
        healthy_threshold: int = 2,
        unhealthy_threshold: int = 2,
        refresh_s: float = 1.0,
        timeout_s: float = 30.0,
        max_retries: int = 2,
    ):
        self._targets_fn = targets_fn
        self.host = host
        self._port = port
        self.health_path = health_path
        self.health_interval_s = health_interval_s
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.targets: dict[str, Target] = {}
        self._rr = itertools.count()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None
        self.counters = {"requests": 0, "no_target": 0, "retried": 0, "failed": 0}
        self.url: str | None = None

    # -- target bookkeeping (runs on the event loop)
    def apply_registrations(self, wanted: dict[str, str]) -> None:
        for tid, url in wanted.items():
            t = self.targets.get(tid)
            if t is None or not t.registered or t.url != url:
                self.targets[tid] = Target(tid, url)
                log.info("lb: registered %s (%s)", tid, url)
        for tid, t in self.targets.items():
            if tid not in wanted and t.registered:
                t.registered = False
                t.deregistered_at = time.time()
                log.info("lb: deregistered %s (draining %d in flight)", tid, t.outstanding)

    def healthy_targets(self) -> list[Target]:
        return [t for t in self.targets.values() if t.registered and t.healthy]

    def pick(self, exclude: set[str]) -> Target | None:
        cands = [t for t in self.healthy_targets() if t.target_id not in exclude]
        if not cands:
            return None
        low = min(t.outstanding for t in cands)
        best = [t for t in cands if t.outstanding == low]
        return best[next(self._rr) % len(best)]

    async def _check(self, t: Target) -> None:
        try:
            r = await self._client.get(t.url + self.health_path, timeout=2.0)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            t.ok_streak, t.fail_streak = t.ok_streak + 1, 0
            if not t.healthy and t.ok_streak >= self.healthy_threshold:
                t.healthy = True
                log.info("lb: %s healthy", t.target_id)
        else:
            t.fail_streak, t.ok_streak = t.fail_streak + 1, 0
            if t.healthy and t.fail_streak >= self.unhealthy_threshold:
                t.healthy = False
                log.info("lb: %s unhealthy", t.target_id)

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_refresh = 0.0
        while True:
            if time.monotonic() - last_refresh >= self.refresh_s:
                try:
                    wanted = await loop.run_in_executor(None, self._targets_fn)
                    self.apply_registrations(wanted)
                except Exception:
                    log.exception("lb: cannot read registered targets")
                last_refresh = time.monotonic()
            checks = [self._check(t) for t in self.targets.values() if t.registered]
            if checks:
                await asyncio.gather(*checks)
            await asyncio.sleep(self.health_interval_s)

    # -- the proxy
    async def _proxy(self, request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        self.counters["requests"] += 1
        tried: set[str] = set()
        while True:
            t = self.pick(tried)
            if t is None:
                self.counters["no_target"] += 1
                return JSONResponse({"error": "no healthy target", "tried": sorted(tried)}, status_code=503)
            tried.add(t.target_id)
            t.outstanding += 1
            t.requests += 1
            try:
                r = await self._client.request(
                    request.method, t.url + path, content=body, headers=headers, timeout=self.timeout_s
                )
            except httpx.ConnectError:
                # refused: the request never reached the target; it is down
                t.healthy, t.ok_streak = False, 0
                t.responses[0] = t.responses.get(0, 0) + 1
                if len(tried) > self.max_retries:
                    self.counters["failed"] += 1
                    return JSONResponse({"error": "targets refused the connection"}, status_code=502)
                self.counters["retried"] += 1
                continue
            except httpx.TimeoutException:
                self.counters["failed"] += 1
                t.responses[504] = t.responses.get(504, 0) + 1
                return JSONResponse(
                    {"error": "target timed out"}, status_code=504, headers={"x-nlpfleet-target": t.target_id}
                )
            except httpx.HTTPError as exc:
                self.counters["failed"] += 1
                t.responses[502] = t.responses.get(502, 0) + 1
                return JSONResponse(
                    {"error": f"target failed: {type(exc).__name__}"},
                    status_code=502,
                    headers={"x-nlpfleet-target": t.target_id},
                )
            finally:
                t.outstanding -= 1
            t.responses[r.status_code] = t.responses.get(r.status_code, 0) + 1
            out_headers = {k: v for k, v in r.headers.items() if k.lower() not in _HOP_BY_HOP}
            out_headers["x-nlpfleet-target"] = t.target_id
            return Response(r.content, status_code=r.status_code, headers=out_headers)

    async def _status(self, request: Request) -> Response:
        return JSONResponse(self.status())

    def status(self) -> dict:
        return {
            "counters": dict(self.counters),
            "targets": [
                t.as_dict() for t in self.targets.values() if t.registered or t.outstanding or t.requests
            ],
        }

    # -- lifecycle
    def _app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=64)
            )
            task = asyncio.get_running_loop().create_task(self._refresh_loop())
            yield
            task.cancel()
            await self._client.aclose()

        methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]
        return Starlette(
            routes=[
                Route("/lb/status", self._status, methods=["GET"]),
                Route("/{path:path}", self._proxy, methods=methods),
            ],
            lifespan=lifespan,
        )

    def start(self) -> LoadBalancer:
        config = uvicorn.Config(
            self._app(), host=self.host, port=self._port, log_level="warning", access_log=False, lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="lb", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("load balancer did not start")
            time.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self) -> None:
        if self._server:
            self._server.should_exit = True
            self._thread.join(timeout=10)
