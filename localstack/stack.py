"""The embedded default: the whole product on one machine, against a local AWS stand-in.

``LocalStack.up()`` starts, in this process:

1. a moto server on 127.0.0.1 (``localstack/moto.py``);
2. the stack, created from the template a real deployment uses (``chalice package
   --merge-template infra/nlpfleet.yaml``, ``localstack/deploy.py``), with the deployment
   parameters an operator would pass (here: moto's default VPC, subnets and an AMI id);
3. the Chalice app's REST API behind Chalice's local server (what API Gateway does), and its
   event handlers behind the dispatcher (EventBridge rule → SQS → handler, as Lambda would);
4. the local clock (``speed`` × real time): it fires the scheduled rules and is the stand-in's
   time for lifecycle actions (event times, hook timeouts) and the agents' datapoints
   (``NLPFLEET_LOCAL_CLOCK``), so the autoscaler sees one consistent, faster time;
5. EC2 instances as local processes (``localstack/instances.py``), Auto Scaling lifecycle
   behaviour moto lacks (``localstack/asg_lifecycle.py``), ASG health replacement of a crashed
   instance, and the load balancer
   (``localstack/lb.py``) that routes to the target group's registered, healthy instances.

``down()`` stops all of it; no process is left behind. ``python -m localstack.stack`` runs a
stack until SIGTERM/SIGINT and writes ``<state_dir>/stack.json`` (URLs, pid) once it is up:
that is what ``nlpfleet up`` starts and ``nlpfleet down`` stops.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from localstack.asg_lifecycle import AsgLifecycle
from localstack.clock import Clock, Scheduler
from localstack.deploy import Deployment, chalice_package, deploy
from localstack.dispatcher import Dispatcher, Route, function_env, is_scheduled_event, load_handler
from localstack.imds import Imds
from localstack.instances import InstanceManager, LocalInstance
from localstack.lb import LoadBalancer
from localstack.moto import ACCOUNT_ID, LOOPBACK, REGION, MotoServer
from localstack.state import STATE_FILE, default_state_dir
from localstack.template import load_template

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# Environment the instance processes inherit from this machine (the rest is theirs).
_PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "OMP_NUM_THREADS", "NLPFLEET_SHARED")


@dataclass
class StackConfig:
    project_dir: Path = REPO
    state_dir: Path = field(default_factory=default_state_dir)
    stage: str = "dev"
    speed: float = 1.0  # local clock: virtual seconds per real second
    infra_template: str = "infra/nlpfleet.yaml"
    api_port: int = 0
    lb_port: int = 0
    parameters: dict[str, str] = field(default_factory=dict)  # CloudFormation parameter overrides
    env_overrides: dict[str, str] = field(default_factory=dict)  # handler environment overrides
    instance_env: dict[str, str] = field(default_factory=dict)  # extra environment for instances
    grace_s: float = 15.0  # SIGTERM → SIGKILL for a stopping instance
    status_check_delay_s: float = 10.0  # crash → the group notices the failed status check
    boot_delay_s: float = 5.0  # EC2 "running" → the role's entry point starts

    @classmethod
    def from_dict(cls, d: dict) -> StackConfig:
        d = dict(d)
        for k in ("project_dir", "state_dir"):
            if k in d:
                d[k] = Path(d[k])
        return cls(**d)

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


class LocalStack:
    def __init__(self, config: StackConfig):
        self.config = config
        self.moto: MotoServer | None = None
        self.deployment: Deployment | None = None
        self.dispatcher: Dispatcher | None = None
        self.clock: Clock | None = None
        self.scheduler: Scheduler | None = None
        self.instances: InstanceManager | None = None
        self.lb: LoadBalancer | None = None
        self.lifecycle = None
        self.imds: Imds | None = None
        self.api_url: str | None = None
        self.admin_url: str | None = None
        self._admin = None
        self._target_groups: list[str] = []
        self._api_env: dict[str, str] = {}
        self._api_server = None
        self._api_thread: threading.Thread | None = None
        self._saved_env: dict[str, str | None] = {}

    # -- the parts
    def client(self, service: str):
        return self.moto.client(service)

    def _parameters(self) -> dict[str, str]:
        """The parameters an operator passes to ``aws cloudformation deploy``; locally the VPC,
        subnets and AMI are moto's defaults."""
        ec2 = self.client("ec2")
        vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
        subnets = sorted(
            ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"],
            key=lambda s: s["AvailabilityZone"],
        )
        subnet_ids = ",".join(s["SubnetId"] for s in subnets[:2])
        # the image `packer build ami/` would produce; locally its "entry point" is this machine's
        ami = ec2.register_image(
            Name=f"nlpfleet-{self.config.stage}-local",
            Architecture="x86_64",
            RootDeviceName="/dev/sda1",
            VirtualizationType="hvm",
        )["ImageId"]
        params = {
            "Stage": self.config.stage,
            "VpcId": vpc,
            "SubnetIds": subnet_ids,
            "LoadBalancerSubnetIds": subnet_ids,
            "AmiId": ami,
        }
        params.update(self.config.parameters)
        template_params = self._template.get("Parameters", {})
        return {k: v for k, v in params.items() if k in template_params}

    def _set_env(self, env: dict[str, str]) -> None:
        """The handlers run in this process: their Lambda environment is ours."""
        for k, v in env.items():
            self._saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v

    def _restore_env(self) -> None:
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env.clear()

    def _start_api(self, app_obj) -> None:
        from chalice.cli.factory import CLIFactory
        from chalice.local import create_local_server

        factory = CLIFactory(str(self.config.project_dir))
        chalice_config = factory.create_config_obj(chalice_stage_name=self.config.stage)
        api_fn = next(f for f in self.deployment.functions if f.is_api)
        env = self._api_env = self._function_env(api_fn.logical_id)
        server = create_local_server(app_obj, chalice_config, LOOPBACK, self.config.api_port)
        local_cls = app_obj.__class__

        class WithFunctionEnv(local_cls):  # the API function's own environment per request
            def __call__(self, event, context):
                with function_env(env):
                    return super().__call__(event, context)

        app_obj.__class__ = WithFunctionEnv
        self._api_server = server
        self._api_thread = threading.Thread(target=server.server.serve_forever, name="api", daemon=True)
        self._api_thread.start()
        self.api_url = f"http://{LOOPBACK}:{server.server.server_address[1]}"

    def _routes(self, dep: Deployment) -> list[Route]:
        routes = []
        for fn in dep.functions:
            if fn.logical_id not in dep.queues:
                continue
            kinds = {e.kind for e in fn.events}
            routes.append(
                Route(
                    name=fn.logical_id,
                    queue_url=dep.queues[fn.logical_id],
                    handler=load_handler(fn.handler, self.config.project_dir),
                    kind="sqs" if kinds == {"SQS"} else "eventbridge",
                    timeout_s=fn.timeout_s,
                    memory_mb=fn.memory_mb,
                    accept=is_scheduled_event if kinds == {"Schedule"} else None,
                    environment=self._function_env(fn.logical_id),
                )
            )
        return routes

    def _function_env(self, logical_id: str) -> dict[str, str]:
        return {**self.deployment.environment(logical_id), **self.config.env_overrides}

    def _instance_env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        env.update(self.moto.env)
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        if self.clock is not None and self.clock.speed != 1.0:
            env["NLPFLEET_LOCAL_CLOCK"] = self.clock.env_value()
        env.update(self.config.instance_env)
        return env

    def _imds_info(self, instance_id: str) -> dict | None:
        inst = self.instances.instances.get(instance_id) if self.instances else None
        return inst.info if inst is not None else None

    def _on_impaired(self, inst: LocalInstance) -> None:
        """A crashed box fails its EC2 status checks; its Auto Scaling group marks it unhealthy
        and replaces it: terminate (through the terminate hook), launch another to keep the
        desired capacity. moto 5.2.5 runs no health checks, so the stack does what the group
        would, with the group's own API calls, ``status_check_delay_s`` after the crash (EC2
        checks status every minute; locally the delay is compressed, but not zero: a box that
        crashes at boot is not replaced in a tight loop)."""
        timer = threading.Timer(self.config.status_check_delay_s, self._replace_impaired, args=(inst,))
        timer.daemon = True
        timer.start()

    def _replace_impaired(self, inst: LocalInstance) -> None:
        if self.moto is None or self.moto.endpoint_url is None:
            return
        asg = self.client("autoscaling")
        found = asg.describe_auto_scaling_instances(InstanceIds=[inst.instance_id])["AutoScalingInstances"]
        if not found:
            return
        try:
            asg.set_instance_health(
                InstanceId=inst.instance_id, HealthStatus="Unhealthy", ShouldRespectGracePeriod=False
            )
            asg.terminate_instance_in_auto_scaling_group(
                InstanceId=inst.instance_id, ShouldDecrementDesiredCapacity=False
            )
            log.info("instance %s failed its status checks: the group replaces it", inst.instance_id)
        except Exception:
            log.exception("cannot replace impaired instance %s", inst.instance_id)

    def targets(self) -> dict[str, str]:
        """Registered targets of the target groups the stack's Auto Scaling groups attach, as the
        local URLs of those instances (an ALB's listener forwards to them).

        moto 5.2.5 registers every instance of a group in its target groups at once, including
        those in ``Pending:Wait`` or ``Terminating:Wait``, and never deregisters one. Auto Scaling
        registers an instance when it goes ``InService`` (its launch hook completed) and
        deregisters it when it starts terminating: the registered set is therefore the target
        group's targets that are ``InService`` in their group."""
        in_service = {
            i["InstanceId"]
            for g in self.client("autoscaling").describe_auto_scaling_groups()["AutoScalingGroups"]
            for i in g["Instances"]
            if i["LifecycleState"] == "InService"
        }
        out = {}
        elbv2 = self.client("elbv2")
        for tg in self._target_groups:
            for d in elbv2.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]:
                iid = d["Target"]["Id"]
                inst = self.instances.instances.get(iid)
                if iid in in_service and inst is not None and inst.url:
                    out[iid] = inst.url
        return out

    # -- up / down
    def up(self) -> LocalStack:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self.moto = MotoServer().start()
        # the stand-in's time: schedules, lifecycle actions and the agents' datapoints follow it
        self.clock = Clock(speed=cfg.speed)
        # Auto Scaling lifecycle hooks (waits, events, Complete/Heartbeat, timeouts) for moto
        self.lifecycle = AsgLifecycle(clock=self.clock.now).install().start_ticker()
        template_path = self._package()
        self._template = load_template(template_path)
        log.info("template ready after %.1fs", time.monotonic() - t0)
        self.deployment = deploy(
            self._template, self.client, stack_name=f"nlpfleet-{cfg.stage}", parameters=self._parameters()
        )
        env = dict(self.moto.env)
        env["NLPFLEET_ENDPOINT_URL"] = self.moto.endpoint_url
        self._set_env(env)
        for name, by_fn in self.deployment.conflicts().items():
            log.warning("functions disagree on %s: %s (each runs with its own, as in Lambda)", name, by_fn)

        routes = self._routes(self.deployment)
        self.dispatcher = Dispatcher(routes, self.client).start()
        self._start_api(load_handler("app.app", cfg.project_dir))
        self.scheduler = Scheduler(self.clock, self.client).start()
        self.imds = Imds(self._imds_info, self.lifecycle.target_lifecycle_state).start()
        self.instances = InstanceManager(
            self.client,
            cfg.state_dir,
            endpoint_url=self.moto.endpoint_url,
            base_env=self._instance_env(),
            region=REGION,
            account=ACCOUNT_ID,
            grace_s=cfg.grace_s,
            on_impaired=self._on_impaired,
            instance_env=lambda iid: {"NLPFLEET_IMDS_URL": self.imds.base_url(iid)},
            boot_delay_s=cfg.boot_delay_s,
        ).start()
        log.info("handlers and instances ready after %.1fs", time.monotonic() - t0)
        self._target_groups = [
            arn
            for g in self.client("autoscaling").describe_auto_scaling_groups()["AutoScalingGroups"]
            for arn in g.get("TargetGroupARNs", [])
        ]
        self.lb = LoadBalancer(self.targets).start()
        self._start_admin()
        log.info("local stack up in %.1fs: api %s, lb %s", time.monotonic() - t0, self.api_url, self.lb.url)
        return self

    def _package(self) -> Path:
        """``chalice package`` output, reused while its inputs are unchanged (it zips the app:
        seconds on a busy machine)."""
        cfg = self.config
        digest = hashlib.sha256()
        inputs = [
            cfg.project_dir / "app.py",
            cfg.project_dir / cfg.infra_template,
            cfg.project_dir / "requirements.txt",
        ]
        inputs += sorted((cfg.project_dir / ".chalice").glob("*.json"))
        inputs += sorted((cfg.project_dir / "chalicelib").rglob("*.py"))
        for f in inputs:
            if f.exists():
                digest.update(str(f.relative_to(cfg.project_dir)).encode() + b"\0" + f.read_bytes())
        digest.update(cfg.stage.encode())
        cache = Path(os.environ.get("NLPFLEET_CACHE_DIR", Path.home() / ".cache" / "nlpfleet"))
        out = cache / "package" / digest.hexdigest()[:16]
        for name in ("sam.json", "sam.yaml"):
            if (out / name).exists():
                return out / name
        return chalice_package(
            cfg.project_dir, out, stage=cfg.stage, merge_template=cfg.project_dir / cfg.infra_template
        )

    def down(self) -> None:
        t0 = time.monotonic()
        for name, stop in (
            ("load balancer", lambda: self.lb and self.lb.stop()),
            ("lifecycle", lambda: self.lifecycle and self.lifecycle.stop()),
            ("scheduler", lambda: self.scheduler and self.scheduler.stop()),
            ("instances", lambda: self.instances and self.instances.stop()),
            ("imds", lambda: self.imds and self.imds.stop()),
            ("dispatcher", lambda: self.dispatcher and self.dispatcher.stop()),
            ("api", self._stop_api),
            ("admin", lambda: self._admin and (self._admin.shutdown(), self._admin.server_close())),
            ("moto", lambda: self.moto and self.moto.stop()),
        ):
            t1 = time.monotonic()
            try:
                stop()
            except Exception:
                log.exception("stopping the %s failed", name)
            log.info("stopped the %s in %.1fs", name, time.monotonic() - t1)
        self._restore_env()
        log.info("local stack down in %.1fs", time.monotonic() - t0)

    def _stop_api(self) -> None:
        if self._api_server is not None:
            self._api_server.shutdown()
            self._api_server.server.server_close()
            self._api_thread.join(timeout=5)

    def update_environment(self, variables: dict[str, str], functions: list[str] | None = None) -> list[str]:
        """What ``aws lambda update-function-configuration --environment`` does, for the local
        functions (all, or those named by logical id): later invocations see the new values."""
        changed = []
        for route in self.dispatcher.routes:
            if functions is None or route.name in functions:
                route.environment.update(variables)
                changed.append(route.name)
        api_fn = next(f for f in self.deployment.functions if f.is_api)
        if functions is None or api_fn.logical_id in functions:
            self._api_env.update(variables)
            changed.append(api_fn.logical_id)
        log.info("function configuration updated: %s for %s", variables, changed)
        return changed

    def snapshot(self) -> dict:
        """What the local stack itself knows (instances, deliveries, load balancer, clock):
        ``GET /local/state`` on the admin server; tests and the demo read it."""
        return {
            "clock": {"now": self.clock.now(), "speed": self.clock.speed} if self.clock else None,
            "instances": [i.as_dict() for i in self.instances.instances.values()] if self.instances else [],
            "dispatcher": self.dispatcher.stats() if self.dispatcher else {},
            "failures": list(self.dispatcher.failures) if self.dispatcher else [],
            "scheduled": list(self.scheduler.fired) if self.scheduler else [],
            "lb": self.lb.status() if self.lb else None,
            "ec2_events": list(self.instances.events_emitted) if self.instances else [],
        }

    def _start_admin(self) -> None:
        stack = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, doc) -> None:
                body = json.dumps(doc, default=str).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/local/state":
                    return self._send(200, stack.snapshot())
                return self._send(404, {"error": "not found"})

            def do_POST(self):
                parts = self.path.strip("/").split("/")
                if parts == ["local", "functions", "environment"]:
                    doc = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                    changed = stack.update_environment(doc["variables"], doc.get("functions"))
                    return self._send(200, {"updated": changed})
                if len(parts) == 4 and parts[:2] == ["local", "instances"] and parts[3] == "kill":
                    try:
                        inst = stack.instances.kill(parts[2])
                    except KeyError:
                        return self._send(404, {"error": f"no local instance {parts[2]}"})
                    return self._send(200, inst.as_dict())
                return self._send(404, {"error": "not found"})

        self._admin = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._admin_thread = threading.Thread(target=self._admin.serve_forever, name="admin", daemon=True)
        self._admin_thread.start()
        self.admin_url = f"http://{LOOPBACK}:{self._admin.server_address[1]}"

    def describe(self) -> dict:
        return {
            "pid": os.getpid(),
            "api_url": self.api_url,
            "lb_url": self.lb.url if self.lb else None,
            "admin_url": self.admin_url,
            "endpoint_url": self.moto.endpoint_url if self.moto else None,
            "region": REGION,
            "stage": self.config.stage,
            "speed": self.config.speed,
            "outputs": self.deployment.outputs if self.deployment else {},
            "environment": self._function_env(
                next(f for f in self.deployment.functions if f.is_api).logical_id
            )
            if self.deployment
            else {},
            "state_dir": str(self.config.state_dir),
            "started_at": time.time(),
        }


def _running(pid: int) -> bool:
    """True while ``pid`` runs; a child of ours that exited is reaped (a zombie is not running)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def read_state(state_dir: Path) -> dict | None:
    """The running stack's ``stack.json``, or None when no stack runs there."""
    f = Path(state_dir) / STATE_FILE
    if not f.exists():
        return None
    st = json.loads(f.read_text())
    return st if _running(st["pid"]) else None


def spawn(cfg: StackConfig, timeout_s: float = 180.0) -> dict:
    """Start ``python -m localstack.stack`` in the background (its own session) and wait until it
    is up; returns its ``stack.json``."""
    import subprocess

    sd = cfg.state_dir
    sd.mkdir(parents=True, exist_ok=True)
    (sd / "config.json").write_text(json.dumps(cfg.as_dict(), indent=2))
    with open(sd / "supervisor.out", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "localstack.stack", "--config", str(sd / "config.json")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(cfg.project_dir),
        )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            st = read_state(sd)
            if st and st["pid"] == proc.pid:
                return st
            if proc.poll() is not None:
                tail = (sd / "supervisor.out").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"local stack exited with {proc.returncode}:\n{tail}")
            time.sleep(0.2)
        raise TimeoutError(f"local stack not up after {timeout_s}s (see {sd}/stack.log)")
    except BaseException:  # interrupted or failed while starting: leave nothing running
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        raise


def stop(state_dir: Path, timeout_s: float = 90.0) -> bool:
    """SIGTERM the stack running in ``state_dir`` and wait for it (and every instance) to end;
    SIGKILL its process group after ``timeout_s``. Returns False when nothing ran."""
    f = Path(state_dir) / STATE_FILE
    if not f.exists():
        return False
    pid = json.loads(f.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        f.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.1)
    log.warning("local stack %d did not stop within %.0fs: killed", pid, timeout_s)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    f.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m localstack.stack", description="Run the local stack until stopped."
    )
    ap.add_argument("--config", type=Path, help="StackConfig as JSON")
    ap.add_argument("--state-dir", type=Path)
    args = ap.parse_args(argv)
    cfg = StackConfig.from_dict(json.loads(args.config.read_text())) if args.config else StackConfig()
    if args.state_dir:
        cfg.state_dir = args.state_dir
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.FileHandler(cfg.state_dir / "stack.log")],
    )
    # the control plane's own log lines (Chalice's app logger does not propagate): on AWS they
    # are the functions' CloudWatch Logs, here they join the stack log
    app_log_handler = logging.FileHandler(cfg.state_dir / "stack.log")
    app_log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("nlpfleet").addHandler(app_log_handler)
    for noisy in ("werkzeug", "botocore", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    stack = LocalStack(cfg)
    state_file = cfg.state_dir / STATE_FILE
    try:
        stack.up()
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(stack.describe(), indent=2))
        tmp.replace(state_file)
        print(json.dumps({"api_url": stack.api_url, "lb_url": stack.lb.url}), flush=True)
        while not stop.wait(0.5):
            pass
    except Exception:
        log.exception("local stack failed")
        raise
    finally:
        stack.down()
        state_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
