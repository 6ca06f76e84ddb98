"""The instance agent against a local IMDSv2 stand-in, moto (with the lifecycle-hook stand-in) and
a real inference server process on the ``trained_artifact`` model:

* warm-up: downloads the active model from S3, starts the server, heartbeats, CONTINUE;
* metrics: what it publishes is what the scaling Lambda reads back (``chalicelib.fleet``);
* rollout: a new version is hot-swapped with no failed request; a broken one is refused and
  the old version keeps serving;
* scale-in: the terminate hook drains the server under load with zero failed requests;
* a warm-up that cannot succeed is ABANDONed (and Auto Scaling replaces the instance);
* a spot interruption notice drains the server too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import httpx
import pytest
from moto import mock_aws

from inference.agent import Agent, AgentSettings, Imds, make_clients
from localstack.asg_lifecycle import AsgLifecycle

REGION = "us-east-1"
GROUP = "nlpfleet-dev-inference"
PARAM = "/nlpfleet/dev/active-model"
BUCKET = "nlpfleet-dev-data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeImds:
    """IMDSv2 as the agent uses it: a token from ``PUT /latest/api/token`` (TTL header required),
    GETs refused with 401 without it; 404 for what is not set."""

    def __init__(self, instance_id: str, target_state=lambda: None):
        self.instance_id = instance_id
        self.target_state = target_state
        self.spot: dict | None = None
        self.token = "tok-" + instance_id
        self.unauthorized = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: str = ""):
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                if self.path != "/latest/api/token" or not self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                ):
                    return self._send(400)
                self._send(200, outer.token)

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != outer.token:
                    outer.unauthorized += 1
                    return self._send(401)
                value = {
                    "/latest/meta-data/instance-id": outer.instance_id,
                    "/latest/meta-data/autoscaling/target-lifecycle-state": outer.target_state(),
                    "/latest/meta-data/spot/instance-action": json.dumps(outer.spot) if outer.spot else None,
                }.get(self.path)
                self._send(200, value) if value else self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cloud(monkeypatch):
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws(), AsgLifecycle() as lc:
        asg = boto3.client("autoscaling", region_name=REGION)
        ec2 = boto3.client("ec2", region_name=REGION)
        ec2.create_launch_template(
            LaunchTemplateName="nlpfleet-dev-inference",
            LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "g4dn.xlarge"},
        )
        asg.create_auto_scaling_group(
            AutoScalingGroupName=GROUP,
            LaunchTemplate={"LaunchTemplateName": "nlpfleet-dev-inference"},
            MinSize=0,
            MaxSize=4,
            DesiredCapacity=0,
            AvailabilityZones=[f"{REGION}a"],
        )
        for name, transition, result in (
            ("nlpfleet-warmup", "autoscaling:EC2_INSTANCE_LAUNCHING", "ABANDON"),
            ("nlpfleet-drain", "autoscaling:EC2_INSTANCE_TERMINATING", "CONTINUE"),
        ):
            asg.put_lifecycle_hook(
                AutoScalingGroupName=GROUP,
                LifecycleHookName=name,
                LifecycleTransition=f"{transition}",
                HeartbeatTimeout=600,
                DefaultResult=result,
            )
        boto3.client("s3", region_name=REGION).create_bucket(Bucket=BUCKET)
        yield {"asg": asg, "lc": lc, "ssm": boto3.client("ssm", region_name=REGION)}


def launch_one(cloud) -> str:
    asg = cloud["asg"]
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
    (inst,) = [i["InstanceId"] for i in g["Instances"] if i["LifecycleState"] == "Pending:Wait"]
    return inst


def states(cloud) -> dict[str, str]:
    g = cloud["asg"].describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["LifecycleState"] for i in g["Instances"]}


def set_active(cloud, name: str, version: str, uri: str, manifest: Path | None) -> None:
    sha = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest else "0" * 64
    value = {"name": name, "version": version, "uri": uri, "manifest_sha256": sha}
    cloud["ssm"].put_parameter(Name=PARAM, Value=json.dumps(value), Type="String", Overwrite=True)


def agent_for(instance_id: str, cloud, tmp_path: Path, **overrides) -> tuple[Agent, FakeImds]:
    imds = FakeImds(instance_id, lambda: cloud["lc"].target_lifecycle_state(instance_id))
    settings = AgentSettings.from_user_data(
        {
            "role": "inference",
            "region": REGION,
            "stage": "dev",
            "active_model_param": PARAM,
            "port": free_port(),
            "agent": {
                "poll_s": 0.2,
                "metrics_period_s": 1.0,
                "model_poll_s": 0.5,
                "heartbeat_interval_s": 0.5,
                "drain_grace_s": 1.0,
                "drain_timeout_s": 30,
                "warmup_timeout_s": 120,
                "model_dir": str(tmp_path / "models"),
                "server_args": ["--warmup-rounds", "1", "--log-level", "warning"],
                **overrides,
            },
        }
    )
    return Agent(settings, Imds(imds.url), make_clients(settings)), imds


def wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Traffic:
    """Closed-loop clients behind a load balancer stand-in: a health check polls ``/readyz``
    every 0.25 s and routing stops at the first 503, as a target group deregisters a target."""

    def __init__(self, base: str, texts: list[str], workers: int = 6):
        self.base, self.texts = base, texts
        self.routing = True
        self.stop = threading.Event()
        self.results: list[int | str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(workers)]
        self.threads.append(threading.Thread(target=self._health, daemon=True))

    def _client(self, i: int):
        with httpx.Client(timeout=30) as c:
            n = i
            while not self.stop.is_set():
                if not self.routing:
                    time.sleep(0.05)
                    continue
                try:
                    r = c.post(self.base + "/v1/classify", json={"inputs": [self.texts[n % len(self.texts)]]})
                    out: int | str = r.status_code
                except httpx.HTTPError as e:
                    out = type(e).__name__
                with self.lock:
                    self.results.append(out)
                n += 7

    def _health(self):
        while not self.stop.is_set():
            try:
                if httpx.get(self.base + "/readyz", timeout=2).status_code != 200:
                    self.routing = False
            except httpx.HTTPError:
                self.routing = False
            time.sleep(0.25)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=35)

    def failures(self) -> list:
        return [r for r in self.results if r != 200]


@pytest.fixture(scope="module")
def texts(data_dir) -> list[str]:
    import csv

    with open(data_dir / "banking77" / "dev.csv", newline="") as f:
        return [r["text"] for r in csv.DictReader(f)][:200]


def test_warm_up_serve_rollout_and_drain_under_load(cloud, trained_artifact, tmp_path, texts):
    from test_server import link_copy

    from chalicelib.aws import Clients
    from chalicelib.fleet import FleetMetrics
    from inference.artifact import publish_artifact

    artifact = Path(trained_artifact)
    v1_uri = f"s3://{BUCKET}/models/banking77/1/"
    publish_artifact(artifact, v1_uri, boto3.client("s3", region_name=REGION))
    set_active(cloud, "banking77", "1", v1_uri, artifact / "manifest.json")

    instance = launch_one(cloud)
    agent, imds = agent_for(instance, cloud, tmp_path)
    runner = threading.Thread(target=lambda: setattr(agent, "exit_code", agent.run()), daemon=True)
    runner.start()
    try:
        # warm-up: downloaded from S3, server ready, launch action completed -> InService
        wait_for(lambda: states(cloud).get(instance) == "InService", 180, "the instance to go InService")
        assert "nlpfleet-warmup:CONTINUE" in agent.outcome
        assert "nlpfleet-warmup:heartbeat" in agent.outcome  # warm-up took longer than a heartbeat
        assert any(p.is_dir() for p in (tmp_path / "models").iterdir())  # the model was downloaded
        base = agent.base_url
        served = json.loads((artifact / "manifest.json").read_text())["version"]
        assert httpx.get(base + "/v1/model").json()["version"] == served

        # metrics: the agent publishes, the scaling Lambda's adapter reads the same numbers back
        with Traffic(base, texts, workers=3) as t:
            time.sleep(2.5)
        assert t.results and not t.failures()
        window = wait_for(
            lambda: [
                m
                for m in FleetMetrics(Clients(REGION)).window(
                    "nlpfleet", GROUP, int(time.time()) - 600, int(time.time()) + 60
                )
                if m.requests > 0
            ],
            10,
            "published metrics",
        )
        assert sum(m.requests for m in window) >= 1 and all(m.instances >= 1 for m in window)

        # rollout: version 2 hot-swapped while traffic flows, no request fails
        v2 = link_copy(artifact, tmp_path / "v2", version="2")
        with Traffic(base, texts, workers=3) as t:
            set_active(cloud, "banking77", "2", str(v2), v2 / "manifest.json")
            wait_for(lambda: "swapped:2" in agent.outcome, 120, "the swap to version 2")
        assert t.results and not t.failures()
        assert httpx.get(base + "/v1/model").json()["version"] == "2"

        # a broken version (a file that does not match its manifest) is refused; 2 keeps serving
        v3 = link_copy(artifact, tmp_path / "v3", version="3", copy=("labels.json",))
        (v3 / "labels.json").write_text(json.dumps(["tampered"] * 77))
        set_active(cloud, "banking77", "3", str(v3), v3 / "manifest.json")
        wait_for(lambda: "swap-refused:3" in agent.outcome, 120, "the refusal of version 3")
        assert httpx.get(base + "/v1/model").json()["version"] == "2"
        assert httpx.post(base + "/v1/classify", json={"inputs": ["my card was declined"]}).status_code == 200

        # scale-in: the terminate hook drains the server under load; no request fails
        with Traffic(base, texts, workers=6) as t:
            time.sleep(1.0)
            cloud["asg"].set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=0)
            assert states(cloud)[instance] == "Terminating:Wait"
            wait_for(lambda: instance not in states(cloud), 60, "the drained instance to leave")
        assert len(t.results) > 20 and t.failures() == []
        assert "nlpfleet-drain:CONTINUE" in agent.outcome and "server-exit:0" in agent.outcome
        assert "nlpfleet-drain:heartbeat" in agent.outcome  # the drain outlasted a heartbeat interval
        runner.join(30)
        assert getattr(agent, "exit_code", None) == 0
        assert imds.unauthorized == 0  # always spoke IMDSv2 with a token
    finally:
        agent.stop_event.set()
        agent._stop_server()
        imds.close()


def test_failed_warm_up_is_abandoned_and_the_instance_replaced(cloud, tmp_path):
    set_active(cloud, "banking77", "9", f"s3://{BUCKET}/models/banking77/9/", None)  # nothing there
    instance = launch_one(cloud)
    agent, imds = agent_for(instance, cloud, tmp_path)
    try:
        assert agent.run() == 1
    finally:
        imds.close()
    assert agent.outcome == ["nlpfleet-warmup:ABANDON"]
    now = states(cloud)
    assert instance not in now and list(now.values()) == ["Pending:Wait"]  # replaced


def test_spot_interruption_notice_drains_the_server(cloud, trained_artifact, tmp_path, texts):
    artifact = Path(trained_artifact)
    set_active(cloud, "banking77", "1", str(artifact), artifact / "manifest.json")
    instance = launch_one(cloud)
    agent, imds = agent_for(instance, cloud, tmp_path)
    runner = threading.Thread(target=lambda: setattr(agent, "exit_code", agent.run()), daemon=True)
    runner.start()
    try:
        wait_for(lambda: states(cloud).get(instance) == "InService", 180, "InService")
        with Traffic(agent.base_url, texts, workers=4) as t:
            time.sleep(0.8)
            imds.spot = {"action": "terminate", "time": "2026-11-26T12:00:00Z"}
            wait_for(lambda: any(o.startswith("server-exit") for o in agent.outcome), 60, "the drain")
        assert "spot-notice" in agent.outcome and "server-exit:0" in agent.outcome
        assert t.results and t.failures() == []
        runner.join(30)
    finally:
        agent.stop_event.set()
        agent._stop_server()
        imds.close()
        shutil.rmtree(tmp_path / "models", ignore_errors=True)


def test_mean_in_flight_is_the_time_requests_spent_admitted_over_the_period():
    """Little's law on the server's latency histogram: 120 requests of 50 ms in a 60 s period
    kept 0.1 requests in flight on average, however rarely a gauge sample would catch one."""
    from inference.agent_metrics import minute_datapoints, parse_scrape

    def scrape(answered: float, latency_sum: float) -> str:
        return (
            f'nlpfleet_requests_total{{code="200"}} {answered}\n'
            "nlpfleet_inflight_requests 0.0\nnlpfleet_queue_depth 0.0\n"
            f'nlpfleet_request_latency_seconds_bucket{{le="0.1"}} {answered}\n'
            f'nlpfleet_request_latency_seconds_bucket{{le="+Inf"}} {answered}\n'
            f"nlpfleet_request_latency_seconds_sum {latency_sum}\n"
        )

    before, after = parse_scrape(scrape(10, 0.5)), parse_scrape(scrape(130, 6.5))
    zeros = [(0.0, 0.0)] * 12  # what twelve samples of the gauge saw
    out = minute_datapoints(before, after, zeros, elapsed_s=60.0)
    assert out["RequestCount"] == 120 and abs(out["InflightRequests"] - 0.1) < 1e-9
    assert minute_datapoints(before, after, zeros)["InflightRequests"] == 0.0  # no length: the gauge
