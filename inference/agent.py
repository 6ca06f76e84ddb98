"""The instance agent of an inference instance: warm-up, rollout, metrics, drain.

    python -m inference.agent [--user-data FILE] [--imds-url URL]

Lifecycle (EC2 Auto Scaling lifecycle hooks, see ``docs/autoscaling.md``):

1. **Warm-up** (launch hook ``nlpfleet-warmup``, instance in ``Pending:Wait``): read the active
   model from SSM (``active_model_param``), download and verify it (``inference.artifact``),
   start ``python -m inference.server`` on it and wait for ``/readyz`` = 200, sending
   ``RecordLifecycleActionHeartbeat`` while that takes long; then ``CompleteLifecycleAction``
   CONTINUE. If the model cannot be fetched, the server dies or warm-up passes
   ``warmup_timeout_s``: ABANDON (Auto Scaling terminates and replaces the instance).
2. **Serving**: every ``poll_s`` look at IMDSv2 ``autoscaling/target-lifecycle-state`` and
   ``spot/instance-action``; sample the server's gauges 48 times per ``metrics_period_s``; once
   per period of the wall clock (aligned to it: one datapoint per instance per minute, stamped
   with the minute it covers) publish the server's mean in-flight, queue, requests, 429s and
   p99 to CloudWatch (the metrics the scaling policy reads); every ``model_poll_s`` compare the
   SSM parameter with the model served and hot-swap (``POST /admin/swap``); a refused swap
   leaves the old version serving and is not retried until the parameter changes again.
3. **Drain** (target state ``Terminated``, or a spot interruption notice): SIGTERM the server
   (``/readyz`` 503 so the load balancer stops routing, admitted requests finish), heartbeat the
   terminate hook (``nlpfleet-drain``) while it takes long, flush the last metrics, then
   CONTINUE. Scale-in never cuts an admitted request.

The decisions are small pure functions (``next_step``, ``swap_wanted``, ``period_of``); ``Agent``
only carries them out. Clock and sleep are injectable; so is the wall clock the datapoints are
stamped with (``wall_clock``: this machine's on EC2; the local stack, whose AWS stand-in runs on
a faster clock, hands its clock over in ``NLPFLEET_LOCAL_CLOCK``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.agent_metrics import Scrape, minute_datapoints, parse_scrape

log = logging.getLogger("nlpfleet.agent")

IMDS_URL = "http://169.254.169.254"
GAUGE_SAMPLES = 48  # samples of the queue gauge per metrics period (1.25 s apart in a minute)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AgentSettings:
    """From the inference user data (docs/CONTRACTS.md) plus optional agent keys."""

    region: str
    active_model_param: str
    stage: str = "dev"
    port: int = 8080
    endpoint_url: str | None = None
    launch_hook: str = "nlpfleet-warmup"
    terminate_hook: str = "nlpfleet-drain"
    metrics_namespace: str = "nlpfleet"
    warmup_timeout_s: float = 900.0
    heartbeat_interval_s: float = 60.0
    poll_s: float = 5.0
    metrics_period_s: float = 60.0
    model_poll_s: float = 30.0
    drain_grace_s: float = 10.0  # /readyz 503 -> the load balancer's health check sees it
    drain_timeout_s: float = 300.0
    model_dir: str = "/var/lib/nlpfleet/models"
    server_args: tuple[str, ...] = ()

    @classmethod
    def from_user_data(cls, doc: Mapping[str, Any]) -> AgentSettings:
        if doc.get("role") not in (None, "inference"):
            raise ValueError(f"user data role is {doc.get('role')!r}, not 'inference'")
        missing = [k for k in ("region", "active_model_param") if not doc.get(k)]
        if missing:
            raise ValueError(f"user data lacks {', '.join(missing)}")
        agent = doc.get("agent") or {}
        kwargs: dict[str, Any] = {
            "region": doc["region"],
            "active_model_param": doc["active_model_param"],
            "stage": doc.get("stage", "dev"),
            "port": int(doc.get("port", 8080)),
            "endpoint_url": doc.get("endpoint_url"),
        }
        for k, v in agent.items():
            if k not in cls.__dataclass_fields__:
                raise ValueError(f"unknown agent setting {k!r}")
            kwargs[k] = tuple(v) if k == "server_args" else v
        return cls(**kwargs)


# ------------------------------------------------------------------------------- IMDSv2


class Imds:
    """IMDSv2: a session token from ``PUT /latest/api/token``, then GETs carrying it."""

    def __init__(self, base_url: str = IMDS_URL, timeout_s: float = 2.0, ttl_s: int = 21600):
        self.base = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._token: str | None = None

    def _token_now(self, refresh: bool = False) -> str:
        if self._token is None or refresh:
            req = urllib.request.Request(
                self.base + "/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.ttl_s)},
            )
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                self._token = r.read().decode()
        return self._token

    def get(self, path: str) -> str | None:
        """The value at ``/latest/<path>``, or None when IMDS answers 404 (not set)."""
        for attempt in (0, 1):
            req = urllib.request.Request(
                f"{self.base}/latest/{path}",
                headers={"X-aws-ec2-metadata-token": self._token_now(attempt == 1)},
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    return r.read().decode()
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                if e.code == 401 and attempt == 0:  # token expired: fetch a new one once
                    continue
                raise
        return None

    def instance_id(self) -> str:
        value = self.get("meta-data/instance-id")
        if not value:
            raise RuntimeError("IMDS has no instance-id")
        return value

    def user_data(self) -> str | None:
        return self.get("user-data")

    def target_lifecycle_state(self) -> str | None:
        return self.get("meta-data/autoscaling/target-lifecycle-state")

    def spot_action(self) -> dict[str, Any] | None:
        raw = self.get("meta-data/spot/instance-action")
        return json.loads(raw) if raw else None


# ---------------------------------------------------------------------- pure decisions


@dataclass(frozen=True)
class Observation:
    target_state: str | None
    spot_action: dict[str, Any] | None
    server_alive: bool


def next_step(obs: Observation) -> str:
    """What the serving loop does next: ``drain``, ``exit`` (the server died) or ``serve``.

    >>> next_step(Observation("InService", None, True))
    'serve'
    >>> next_step(Observation("Terminated", None, True))
    'drain'
    >>> next_step(Observation("InService", {"action": "terminate", "time": "..."}, True))
    'drain'
    >>> next_step(Observation("InService", None, False))
    'exit'
    """
    if obs.target_state == "Terminated" or (
        obs.spot_action and obs.spot_action.get("action") in ("terminate", "stop", "hibernate")
    ):
        return "drain"
    if not obs.server_alive:
        return "exit"
    return "serve"


def swap_wanted(
    active: Mapping[str, Any] | None, serving: Mapping[str, Any] | None, refused: str | None
) -> bool:
    """Swap when the parameter names another artifact than the one served, unless that very
    value was already refused (a broken artifact is not retried until the parameter changes).

    >>> a = {"uri": "s3://b/models/m/2/", "manifest_sha256": "x"}
    >>> swap_wanted(a, {"uri": "s3://b/models/m/1/"}, None), swap_wanted(a, a, None)
    (True, False)
    >>> swap_wanted(a, {"uri": "s3://b/models/m/1/"}, json.dumps(a, sort_keys=True))
    False
    """
    if not active or not active.get("uri"):
        return False
    if (
        serving
        and serving.get("uri") == active["uri"]
        and serving.get("manifest_sha256") == active.get("manifest_sha256")
    ):
        return False
    return json.dumps(dict(active), sort_keys=True) != refused


def period_of(wall_s: float, period_s: float) -> float:
    """Start of the metrics period holding ``wall_s`` (periods aligned to the wall clock).

    >>> period_of(1795687234.5, 60.0)
    1795687200.0
    """
    return (wall_s // period_s) * period_s


@dataclass(frozen=True)
class WallClock:
    """The time CloudWatch datapoints carry: ``time.time()`` on EC2. An AWS stand-in on a faster
    clock (the local stack) sets ``NLPFLEET_LOCAL_CLOCK="<wall epoch> <its epoch> <speed>"``:
    its time is ``its epoch + (time.time() - wall epoch) x speed``.

    >>> c = WallClock.from_env({"NLPFLEET_LOCAL_CLOCK": "1000 5000 6"})
    >>> c.speed, c.at(1010.0)
    (6.0, 5060.0)
    >>> WallClock.from_env({}).speed
    1.0
    """

    wall0: float = 0.0
    virtual0: float = 0.0
    speed: float = 1.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WallClock:
        raw = environ.get("NLPFLEET_LOCAL_CLOCK", "").split()
        if not raw:
            return cls()
        try:
            wall0, virtual0, speed = (float(x) for x in raw)
        except ValueError:
            raise ValueError(
                f"NLPFLEET_LOCAL_CLOCK={' '.join(raw)!r}: want '<wall> <virtual> <speed>'"
            ) from None
        if speed <= 0:
            raise ValueError("NLPFLEET_LOCAL_CLOCK: speed must be positive")
        return cls(wall0, virtual0, speed)

    def at(self, wall_s: float) -> float:
        return self.virtual0 + (wall_s - self.wall0) * self.speed

    def __call__(self) -> float:
        return self.at(time.time())


# ----------------------------------------------------------------------------- the agent


@dataclass
class Agent:
    settings: AgentSettings
    imds: Imds
    clients: Callable[[str], Any]  # service name -> boto3 client
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    wall: Callable[[], float] = field(default_factory=WallClock)  # datapoints' timestamps
    stop_event: threading.Event = field(default_factory=threading.Event)
    instance_id: str = ""
    asg_name: str = ""
    server: subprocess.Popen | None = None
    serving: dict[str, Any] | None = None
    refused: str | None = None
    outcome: list[str] = field(default_factory=list)  # what happened, for logs and tests
    fetched: list[str] = field(default_factory=list)  # model directories this agent downloaded

    def _every(self, seconds: float) -> float:
        """A cadence (polls, heartbeats, metric periods) on the wall clock the datapoints carry:
        real seconds on EC2; fewer on a stand-in whose clock runs faster, so that polls,
        heartbeats and hook timeouts keep their proportions."""
        return seconds / getattr(self.wall, "speed", 1.0)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    # -- AWS
    def _complete(self, hook: str, result: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.clients("autoscaling").complete_lifecycle_action(
                AutoScalingGroupName=self.asg_name,
                LifecycleHookName=hook,
                InstanceId=self.instance_id,
                LifecycleActionResult=result,
            )
        except ClientError as e:
            log.warning("CompleteLifecycleAction %s %s: %s", hook, result, e)
            return False
        self.outcome.append(f"{hook}:{result}")
        log.info("lifecycle %s completed with %s", hook, result)
        return True

    def _heartbeat(self, hook: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.clients("autoscaling").record_lifecycle_action_heartbeat(
                AutoScalingGroupName=self.asg_name, LifecycleHookName=hook, InstanceId=self.instance_id
            )
            self.outcome.append(f"{hook}:heartbeat")
        except ClientError as e:  # nothing waiting (e.g. no hook on a spot interruption)
            log.info("heartbeat %s: %s", hook, e)

    def _active_model(self) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            p = self.clients("ssm").get_parameter(Name=self.settings.active_model_param)
        except ClientError as e:
            log.warning("active model %s unreadable: %s", self.settings.active_model_param, e)
            return None
        return json.loads(p["Parameter"]["Value"])

    def _fetch(self, active: Mapping[str, Any]) -> str:
        """A local, verified directory of the artifact (s3:// is downloaded and checked)."""
        uri = active["uri"]
        if not uri.startswith("s3://"):
            return uri
        from inference.artifact import fetch_artifact

        root = Path(self.settings.model_dir)
        root.mkdir(parents=True, exist_ok=True)
        dest = Path(
            tempfile.mkdtemp(prefix=f"{active.get('name', 'model')}-{active.get('version', 'v')}-", dir=root)
        )
        local = str(fetch_artifact(uri, dest, self.clients("s3")))
        self.fetched.append(local)
        return local

    def _prune(self, keep: int = 2) -> None:
        """Delete downloaded model directories but the newest ``keep`` (the one serving and the
        one before it): a long-lived instance must not fill its disk one rollout at a time. The
        server holds the models it runs in memory, so deleting files under an old one is safe."""
        import shutil

        while len(self.fetched) > keep:
            shutil.rmtree(self.fetched.pop(0), ignore_errors=True)

    # -- server
    def _http(
        self, method: str, path: str, body: dict | None = None, timeout_s: float = 2.0
    ) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, b""

    def _start_server(self, model_dir: str) -> None:
        s = self.settings
        cmd = [
            sys.executable, "-m", "inference.server", "--model", model_dir, "--host", "0.0.0.0",
            "--port", str(s.port), "--drain-grace-s", str(s.drain_grace_s),
            "--drain-timeout-s", str(s.drain_timeout_s), *s.server_args,
        ]  # fmt: skip
        log.info("starting the server: %s", " ".join(cmd))
        self.server = subprocess.Popen(cmd)

    def _alive(self) -> bool:
        return self.server is not None and self.server.poll() is None

    # -- phases
    def warm_up(self) -> bool:
        s = self.settings
        self.instance_id = self.imds.instance_id()
        found = self.clients("autoscaling").describe_auto_scaling_instances(InstanceIds=[self.instance_id])
        if not found["AutoScalingInstances"]:
            raise RuntimeError(f"{self.instance_id} is not in an Auto Scaling group")
        self.asg_name = found["AutoScalingInstances"][0]["AutoScalingGroupName"]
        started = self.clock()
        try:
            active = self._active_model()
            if active is None:
                raise RuntimeError(f"no active model in {s.active_model_param}")
            model_dir = self._fetch(active)
            self._start_server(model_dir)
        except Exception as e:
            log.error("warm-up failed before the server started: %s", e)
            self._complete(s.launch_hook, "ABANDON")
            return False
        last_beat = self.clock()
        while True:
            if self._http("GET", "/readyz")[0] == 200:
                self.serving = dict(active)
                log.info("ready after %.1fs serving %s", self.clock() - started, active.get("uri"))
                return self._complete(s.launch_hook, "CONTINUE")
            if not self._alive() or self.clock() - started > s.warmup_timeout_s or self.stop_event.is_set():
                log.error("warm-up failed: server %s", "exited" if not self._alive() else "not ready in time")
                self._stop_server()
                self._complete(s.launch_hook, "ABANDON")
                return False
            if self.clock() - last_beat >= self._every(s.heartbeat_interval_s):
                self._heartbeat(s.launch_hook)
                last_beat = self.clock()
            self.sleep(min(0.5, s.poll_s))

    def _maybe_swap(self) -> None:
        active = self._active_model()
        if not swap_wanted(active, self.serving, self.refused):
            return
        assert active is not None
        try:
            model_dir = self._fetch(active)
        except Exception as e:
            log.error("rollout of %s refused: cannot fetch: %s", active.get("uri"), e)
            self.refused = json.dumps(active, sort_keys=True)
            self.outcome.append(f"swap-refused:{active.get('version')}")
            return
        body = {"uri": model_dir}
        if active.get("manifest_sha256"):
            body["manifest_sha256"] = active["manifest_sha256"]
        status, raw = self._http("POST", "/admin/swap", body, timeout_s=600)
        if status == 200:
            self.serving = dict(active)
            self.outcome.append(f"swapped:{active.get('version')}")
            self._prune()
            log.info("rolled out %s", active.get("uri"))
        else:
            self.refused = json.dumps(active, sort_keys=True)
            self.outcome.append(f"swap-refused:{active.get('version')}")
            log.error(
                "rollout of %s refused by the server (%s): old version keeps serving: %s",
                active.get("uri"),
                status,
                raw[:500],
            )

    def _scrape(self) -> Scrape | None:
        status, raw = self._http("GET", "/metrics")
        return parse_scrape(raw.decode()) if status == 200 else None

    def _publish(self, values: dict[str, float], at_s: float) -> None:
        from datetime import UTC, datetime

        from botocore.exceptions import ClientError

        dims = [{"Name": "AutoScalingGroupName", "Value": self.asg_name}]
        stamp = datetime.fromtimestamp(at_s, UTC)
        data = [
            {
                "MetricName": k,
                "Dimensions": dims,
                "Timestamp": stamp,
                "Value": float(v),
                "Unit": "Seconds" if k == "LatencyP99" else "Count",
            }
            for k, v in values.items()
        ]
        try:
            self.clients("cloudwatch").put_metric_data(
                Namespace=self.settings.metrics_namespace, MetricData=data
            )
        except ClientError as e:
            log.warning("PutMetricData: %s", e)

    def serve(self) -> str:
        """The serving loop; returns why it ended (``drain`` or ``exit``)."""
        s = self.settings
        last_scrape = self._scrape() or Scrape()
        gauges: list[tuple[float, float]] = []
        last_model = period_t0 = self.clock()
        period = period_of(self.wall(), s.metrics_period_s)
        poll_s = self._every(s.poll_s)
        # the gauges' period means are estimates: GAUGE_SAMPLES samples per period, whatever the poll
        sample_s = min(poll_s, self._every(s.metrics_period_s) / GAUGE_SAMPLES)
        next_poll = self.clock()
        while not self.stop_event.is_set():
            if self.clock() >= next_poll:
                obs = Observation(self.imds.target_lifecycle_state(), self.imds.spot_action(), self._alive())
                step = next_step(obs)
                if step != "serve":
                    if obs.spot_action:
                        self.outcome.append("spot-notice")
                    return step
                next_poll = self.clock() + poll_s
            cur = self._scrape()
            if cur is not None:
                gauges.append((cur.inflight, cur.queue_depth))
            now_period = period_of(self.wall(), s.metrics_period_s)
            if now_period > period and cur is not None:  # the period ended: its datapoints
                elapsed = self.clock() - period_t0
                self._publish(minute_datapoints(last_scrape, cur, gauges, elapsed), period)
                last_scrape, gauges, period, period_t0 = cur, [], now_period, self.clock()
            if self.clock() - last_model >= self._every(s.model_poll_s):
                self._maybe_swap()
                last_model = self.clock()
            self.sleep(sample_s)
        return "stopped"

    def drain(self) -> bool:
        """SIGTERM the server, heartbeat while it finishes admitted requests, then CONTINUE."""
        s = self.settings
        before = last = self._scrape()
        drain_t0 = self.clock()
        if self._alive():
            self.server.send_signal(signal.SIGTERM)
        started = last_beat = self.clock()
        gauges: list[tuple[float, float]] = []
        while self._alive():
            cur = self._scrape()
            if cur is not None:
                gauges.append((cur.inflight, cur.queue_depth))
                last = cur
            if self.clock() - last_beat >= self._every(s.heartbeat_interval_s):
                self._heartbeat(s.terminate_hook)
                last_beat = self.clock()
            if self.clock() - started > s.drain_timeout_s + s.drain_grace_s + 30:
                log.error("server did not exit after the drain timeout: killing it")
                self.server.kill()
            self.sleep(0.2)
        if before is not None and last is not None and gauges:  # the drain's last datapoints
            values = minute_datapoints(before, last, gauges, self.clock() - drain_t0)
            self._publish(values, period_of(self.wall(), s.metrics_period_s))
        code = self.server.returncode if self.server is not None else None
        self.outcome.append(f"server-exit:{code}")
        log.info("drained in %.1fs (server exit %s)", self.clock() - started, code)
        return self._complete(s.terminate_hook, "CONTINUE")

    def _stop_server(self) -> None:
        if self._alive():
            self.server.terminate()
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()

    def run(self) -> int:
        if not self.warm_up():
            return 1
        why = self.serve()
        if why == "drain":
            self.drain()
            return 0
        self._stop_server()
        return 0 if why == "stopped" else 1


def make_clients(s: AgentSettings) -> Callable[[str], Any]:
    import boto3

    cache: dict[str, Any] = {}

    def get(service: str):
        if service not in cache:
            kwargs: dict[str, Any] = {"region_name": s.region}
            if s.endpoint_url:
                kwargs["endpoint_url"] = s.endpoint_url
            cache[service] = boto3.client(service, **kwargs)
        return cache[service]

    return get


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inference.agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--user-data", type=Path, help="inference user data JSON (default: from IMDS)")
    p.add_argument("--imds-url", default=os.environ.get("NLPFLEET_IMDS_URL", IMDS_URL))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    imds = Imds(args.imds_url)
    raw = args.user_data.read_text() if args.user_data else imds.user_data()
    if not raw:
        print("error: no user data", file=sys.stderr)
        return 2
    return run_agent(json.loads(raw), imds)


def run_agent(user_data: dict, imds: Imds | None = None) -> int:
    """Run the agent for already-parsed inference user data (``nlpfleet-instance`` hands over here)."""
    imds = imds or Imds(os.environ.get("NLPFLEET_IMDS_URL", IMDS_URL))
    settings = AgentSettings.from_user_data(user_data)
    agent = Agent(settings, imds, make_clients(settings), wall=WallClock.from_env(os.environ))
    signal.signal(signal.SIGTERM, lambda *_: agent.stop_event.set())
    return agent.run()


if __name__ == "__main__":
    raise SystemExit(main())
