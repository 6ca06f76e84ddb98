"""The whole product end to end on one machine (``make demo``, ``nlpfleet demo``).

What a user would do against AWS, against the local stack (``localstack/``):

1. start the stack (moto + the real handlers + local instances + load balancer);
2. upload Banking77 (train and dev) under ``datasets/`` with a job spec: the S3 event makes a
   fine-tune job; the planner's choice, the launch, the training progress and the dev accuracy
   are shown as the job record reports them;
3. the job publishes the model; its manifest's S3 event rolls it out to the inference fleet;
4. a compressed slice of the NASA-HTTP July 1995 trace is replayed against the load balancer
   (Banking77 texts as request bodies) while the autoscaler scales the fleet out and, in the
   trace's night, back in, through the lifecycle hooks (warm-up, drain);
5. a summary (job, accuracy, requests served / refused / failed, p50/p99 latency,
   instance-minutes, every scaling decision with its reason) and a PNG timeline;
6. everything is stopped.

``run(DemoConfig(...))`` returns the summary; the end-to-end test runs a shorter configuration
of the same function and asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class DemoError(RuntimeError):
    pass


@dataclass
class DemoConfig:
    state_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("NLPFLEET_DEMO_DIR", "/tmp/nlpfleet-demo"))
    )
    data_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("NLPFLEET_SHARED", REPO.parent / "shared")) / "data"
    )
    out_dir: Path = field(default_factory=lambda: REPO / "out" / "demo")  # git-ignored
    # the job (a 10-minute demo on 2 CPU cores: one pass over the training split, short texts)
    classes: int | None = None  # None: all 77 intents
    per_class_train: int | None = None  # None: the whole training split (9,003 texts)
    per_class_dev: int | None = 5  # 5 per intent of the 3,080 dev texts: accuracy and the parity gate
    epochs: int = 1
    learning_rate: float = 1e-3
    batch_size: int = 32
    seq_len: int = 32  # Banking77 utterances are short: 32 tokens keep nearly all of each
    max_steps: int | None = None  # None: one epoch
    job_timeout_s: float = 360.0
    artifact_dir: Path | None = None  # publish this artifact instead of training (iterating on the fleet)
    # the stack, the fleet and the replay
    speed: float = 6.0  # local clock: the per-minute autoscaler decides every 10 s
    boot_delay_s: float = 5.0  # EC2 "running" -> the instance's entry point starts
    status_check_delay_s: float = 10.0  # a crashed instance -> its group replaces it
    fleet_min: int = 1  # SCALING_MIN_SIZE (held at 0 by the autoscaler until a model is active)
    max_size: int = 4
    trace_start: str = "1995-07-12T06:00:00-04:00"  # a Wednesday morning to the next morning (EDT)
    trace_minutes: int = 24 * 60
    trace_minutes_per_s: float = 6.0  # a trace day in 4 minutes: one clock minute is a trace hour
    rps_per_req_per_min: float = 0.15  # the trace's requests/minute become this many requests/second
    settle_s: float = 30.0  # after the replay: how long to wait for a scale-in that has not happened
    # Mean in-flight requests per instance the autoscaler aims for. The server answers in about
    # 7.5 ms here, so the replayed day is about 0.12 in flight at its peak (16 requests/s) and
    # 0.045-0.075 in the night: at 0.05 the peak needs the group's 4 and the small hours 2, and
    # the policy's whole instances (its headroom as deployed) follow the day out and back in. At
    # 0.1 the whole day spanned under one instance of need: 2 from morning to dawn, 3 once.
    target_inflight: float = 0.05
    env: dict[str, str] = field(default_factory=dict)  # handler environment overrides
    quiet: bool = False


# ------------------------------------------------------------------ helpers


_T0 = [time.monotonic()]  # when the run started (say() prefixes its lines with the time since)


def say(cfg: DemoConfig, msg: str) -> None:
    if not cfg.quiet:
        print(f"[{time.monotonic() - _T0[0]:5.0f}s] {msg}", flush=True)


class Phases:
    """Wall time of each phase of the run (the summary's ``phases``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._name, self._t = None, time.monotonic()

    def start(self, name: str) -> None:
        self.end()
        self._name, self._t = name, time.monotonic()

    def end(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(
                self.seconds.get(self._name, 0.0) + time.monotonic() - self._t, 1
            )
        self._name = None


def stratified_csv(
    src: Path,
    dst: Path,
    per_class: int | None,
    label_field: str = "category",
    seed: int = 0,
    classes: int | None = None,
) -> int:
    """Copy ``src`` to ``dst`` keeping at most ``per_class`` rows of each label (all if None),
    and only the first ``classes`` labels in sorted order (all if None)."""
    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = reader.fieldnames
    if classes is not None:
        keep = set(sorted({r[label_field] for r in rows})[:classes])
        rows = [r for r in rows if r[label_field] in keep]
    if per_class is not None:
        rng = random.Random(seed)
        rng.shuffle(rows)
        kept, seen = [], {}
        for r in rows:
            if seen.get(r[label_field], 0) < per_class:
                seen[r[label_field]] = seen.get(r[label_field], 0) + 1
                kept.append(r)
        rows = kept
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return len(rows)


class Session:
    """The demo's handles on a running local stack: the API (as a user), S3 (uploads), the
    stand-in's Auto Scaling (observation only) and the stack's admin endpoint (faults)."""

    def __init__(self, state: dict):
        from localstack.moto import aws_env, client

        self.state = state
        self.api = httpx.Client(base_url=state["api_url"], timeout=60)
        self.lb_url = state["lb_url"]
        self.admin = httpx.Client(base_url=state["admin_url"], timeout=30)
        env = aws_env(state["endpoint_url"], state["region"])
        self.s3 = client("s3", env)
        self.sqs = client("sqs", env)
        self.asg = client("autoscaling", env)
        self.ec2 = client("ec2", env)
        self.bucket = state["environment"]["BUCKET"]
        self.asg_name = state["environment"].get("INFERENCE_ASG_NAME") or state["environment"].get(
            "INFERENCE_ASG"
        )

    def jobs(self) -> list[dict]:
        return self.api.get("/jobs").json()["jobs"]

    def job(self, job_id: str) -> dict:
        return self.api.get(f"/jobs/{job_id}").json()

    def local(self) -> dict:
        return self.admin.get("/local/state").json()

    def group(self) -> dict:
        groups = self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[self.asg_name])[
            "AutoScalingGroups"
        ]
        return groups[0] if groups else {}

    def update_functions(self, variables: dict[str, str], functions: list[str] | None = None) -> dict:
        """``aws lambda update-function-configuration`` for the local functions."""
        body = {"variables": variables, **({"functions": functions} if functions else {})}
        return self.admin.post("/local/functions/environment", json=body).json()

    def kill(self, instance_id: str) -> dict:
        return self.admin.post(f"/local/instances/{instance_id}/kill").json()

    def close(self) -> None:
        self.api.close()
        self.admin.close()


def wait_until(fn, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval_s)
    raise DemoError(f"timed out after {timeout_s:.0f}s waiting for {what}")


# ------------------------------------------------------------------ phases


def start_stack(cfg: DemoConfig) -> dict:
    from localstack.stack import StackConfig, spawn, stop

    stop(cfg.state_dir, timeout_s=30)  # a previous run that was interrupted
    shutil.rmtree(cfg.state_dir, ignore_errors=True)  # this run's logs and instances only
    scfg = StackConfig(
        state_dir=cfg.state_dir,
        speed=cfg.speed,
        boot_delay_s=cfg.boot_delay_s,
        status_check_delay_s=cfg.status_check_delay_s,
    )
    # Deployment parameters for one small machine: a small group, hook timeouts. Times the
    # stand-in keeps (hook timeouts, the autoscaler's windows) are on the local clock, i.e.
    # `speed` times faster than real time: 900 s of warm-up limit is 150 real seconds at speed 6.
    scfg.parameters.update(
        {
            "InferenceMaxSize": str(cfg.max_size),
            "TerminateHookTimeoutSeconds": "180",
            "DrainSeconds": "5",
            "WarmupTimeoutSeconds": "900",
        }
    )
    # the autoscaler's settings for a compressed day (all are its documented environment):
    # a floor of `fleet_min` (it keeps the fleet at 0 until a model is active), no seasonal
    # history yet, a short look-back (two clock minutes: two trace hours) and scale-in window (one),
    # and ten clock minutes of metrics per decision (ten trace hours, where a deployment reads half
    # an hour): the noise part of the headroom at night is then the evening's, not still the
    # morning ramp's and the boots' latency bumps (with 30 minutes, 30 trace hours, it was, and
    # when the night's scale-in came varied by hours from run to run)
    scfg.env_overrides.update(
        {
            "SCALING_MIN_SIZE": str(cfg.fleet_min),
            "SCALING_FORECAST_WEIGHT": "0",
            "SCALING_BOOT_DELAY_S": "120",
            "SCALING_SCALE_OUT_LOOKBACK_S": "120",
            "SCALING_METRICS_WINDOW_S": "600",
            "SCALING_SCALE_IN_STABILIZATION_S": "60",
            "SCALING_SCALE_IN_MAX_STEP_FRACTION": "0.5",
            "SCALING_TARGET_INFLIGHT_PER_INSTANCE": str(cfg.target_inflight),
        }
    )
    scfg.env_overrides.update(cfg.env)
    return spawn(scfg)


def upload_dataset(cfg: DemoConfig, s: Session) -> str:
    """Banking77 train + dev under ``datasets/banking77/``, the job spec as the training file's
    sidecar; returns the training file's key (its upload is what makes the job)."""
    work = cfg.state_dir / "upload"
    work.mkdir(parents=True, exist_ok=True)
    src = cfg.data_dir / "banking77"
    n_train = stratified_csv(src / "train.csv", work / "train.csv", cfg.per_class_train, classes=cfg.classes)
    n_dev = stratified_csv(src / "dev.csv", work / "dev.csv", cfg.per_class_dev, classes=cfg.classes)
    prefix = "datasets/banking77"
    # every object under datasets/ becomes a job: the dev split goes beside it, under eval/
    dev_key = "eval/banking77/dev.csv"
    s.s3.upload_file(str(work / "dev.csv"), s.bucket, dev_key)
    spec = {
        "type": "finetune",
        "model_name": "banking77",
        "text_field": "text",
        "label_field": "category",
        "eval_uri": f"s3://{s.bucket}/{dev_key}",
        "epochs": cfg.epochs,
        "learning_rate": cfg.learning_rate,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        **({"max_steps": cfg.max_steps} if cfg.max_steps else {}),
    }
    s.s3.put_object(Bucket=s.bucket, Key=f"{prefix}/train.csv.job.json", Body=json.dumps(spec).encode())
    s.s3.upload_file(str(work / "train.csv"), s.bucket, f"{prefix}/train.csv")
    say(
        cfg,
        f"uploaded s3://{s.bucket}/{prefix}/train.csv ({n_train} rows) with its job spec; "
        f"dev split ({n_dev} rows) at s3://{s.bucket}/{dev_key}",
    )
    return f"{prefix}/train.csv"


def publish_prebuilt(cfg: DemoConfig, s: Session) -> dict:
    """Publish an existing artifact directory as a user can (``inference.artifact``), in place of
    the fine-tune job: the rollout that follows is the same."""
    from inference.artifact import publish_artifact

    doc = json.loads((cfg.artifact_dir / "manifest.json").read_text())
    uri = f"s3://{s.bucket}/models/{doc['name']}/{doc['version']}/"
    publish_artifact(cfg.artifact_dir, uri, s.s3)
    say(cfg, f"published the artifact in {cfg.artifact_dir} to {uri} (no training)")
    return {"job_id": None, "state": "SUCCEEDED", "metrics": doc.get("metrics"), "result": {"model_uri": uri}}


def run_job(cfg: DemoConfig, s: Session, key: str, hooks=None) -> dict:
    from nlpfleet.cli import progress_fraction

    job = wait_until(
        lambda: next((j for j in s.jobs() if (j.get("source") or {}).get("key") == key), None), 60, "the job"
    )
    job = s.job(job["job_id"])
    plan = job.get("plan") or {}
    say(
        cfg,
        f"job {job['job_id']} created from the upload; the planner chose {plan.get('instance_type')} "
        f"({plan.get('strategy')}, ~{60 * (plan.get('estimated_hours') or 0):.0f} min, "
        f"~${plan.get('estimated_cost_usd') or 0:.3f}; candidates {', '.join(plan.get('candidates') or [])})",
    )
    last_state, last_pct = None, -1
    deadline = time.monotonic() + cfg.job_timeout_s
    while time.monotonic() < deadline:
        job = s.job(job["job_id"])
        if job["state"] != last_state:
            last_state = job["state"]
            inst = job.get("instance") or {}
            say(
                cfg,
                f"  {job['state']}"
                + (
                    f" on {inst.get('instance_type')} {inst.get('market')} "
                    f"{inst.get('instance_id')} (attempt {job.get('attempt')})"
                    if inst
                    else ""
                ),
            )
        frac = progress_fraction(job.get("progress") or {})
        if frac is not None and int(frac * 20) != last_pct:
            last_pct = int(frac * 20)
            bar = "#" * last_pct + "." * (20 - last_pct)
            prog = job.get("progress") or {}
            extra = " ".join(f"{k}={prog[k]}" for k in ("epoch", "loss", "accuracy") if k in prog)
            say(cfg, f"  [{bar}] {100 * frac:5.1f}% {extra}")
        if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return job
        if hooks is not None:
            hooks.job_progress(s, job)
        time.sleep(1.0)
    raise DemoError(f"job {job['job_id']} still {job['state']} after {cfg.job_timeout_s:.0f}s")


def wait_rollout(cfg: DemoConfig, s: Session, timeout_s: float = 120) -> dict:
    models = wait_until(
        lambda: s.api.get("/models").json().get("active") or None, timeout_s, "the active model"
    )
    say(cfg, f"model {models.get('name')}/{models.get('version')} is active: {models.get('uri')}")
    held = next(
        (d for d in _logged(s, ("scaling_decision",)) if "no active model" in str(d.get("reason"))), None
    )
    if held:
        say(cfg, f"  until now the autoscaler held the fleet at 0 ({held['reason']})")
    wait_until(
        lambda: any(t["state"] == "healthy" for t in (s.local()["lb"] or {}).get("targets", [])),
        timeout_s,
        "a warm inference instance behind the load balancer",
    )
    say(
        cfg,
        f"the autoscaler launched the fleet (floor {cfg.fleet_min}); an instance completed its "
        "launch hook and serves behind the load balancer",
    )
    return models


class Sampler:
    """Samples the fleet every ``interval_s``: desired capacity, instances per lifecycle state,
    targets the load balancer considers healthy."""

    def __init__(self, s: Session, interval_s: float = 0.5):
        self.s, self.interval_s = s, interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                g = self.s.group()
                lb = self.s.local()["lb"] or {}
                states: dict[str, int] = {}
                for i in g.get("Instances", []):
                    states[i["LifecycleState"]] = states.get(i["LifecycleState"], 0) + 1
                self.samples.append(
                    {
                        "t": time.monotonic() - self._t0,
                        "desired": g.get("DesiredCapacity", 0),
                        "states": states,
                        "ready": sum(1 for t in lb.get("targets", []) if t["state"] == "healthy"),
                    }
                )
            except Exception:  # the stack may be stopping
                pass
            self._stop.wait(self.interval_s)

    def start(self, t0: float) -> Sampler:
        self._t0 = t0
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def replay_trace(cfg: DemoConfig, s: Session, hooks=None) -> list:
    from localstack.replay import load_texts, load_trace, replay, send_plan

    trace = load_trace(
        cfg.data_dir / "nasa_http_jul95" / "requests_per_minute.csv", cfg.trace_start, cfg.trace_minutes
    )
    counts = [c for _, c in trace]
    plan = send_plan(
        counts,
        trace_minutes_per_s=cfg.trace_minutes_per_s,
        rate_mult=cfg.rps_per_req_per_min / cfg.trace_minutes_per_s,
        seed=7,
    )
    texts = load_texts(cfg.data_dir / "banking77" / "dev.csv")
    random.Random(3).shuffle(texts)
    say(
        cfg,
        f"replaying {cfg.trace_minutes} trace minutes from {cfg.trace_start} in "
        f"{cfg.trace_minutes / cfg.trace_minutes_per_s:.0f}s: {len(plan)} requests",
    )

    tz = datetime.fromisoformat(cfg.trace_start).tzinfo or UTC  # the trace's local time

    def tick(now, minute):
        stop = hooks.during_replay(s, now) if hooks is not None else None
        if int(now) % 20 == 0 or stop:
            g = s.group()
            states: dict[str, int] = {}
            for i in g.get("Instances", []):
                states[i["LifecycleState"]] = states.get(i["LifecycleState"], 0) + 1
            say(
                cfg,
                f"  t={now:5.0f}s trace {datetime.fromtimestamp(trace[minute][0], tz):%a %H:%M} "
                f"({counts[minute]} req/min): desired {g.get('DesiredCapacity')}, {states}",
            )
        if stop:
            say(cfg, f"  replay ended early at t={now:.0f}s: {stop}")
            return True

    return asyncio.run(replay(s.lb_url + "/v1/classify", plan, texts, on_tick=tick))


def _logged(s: Session, kinds: tuple[str, ...]) -> list[dict]:
    """The control plane's one-line JSON decision logs (``{"event": kind, ...}``) from the
    stack log (on AWS: the functions' CloudWatch Logs)."""
    out = []
    path = Path(s.state["state_dir"]) / "stack.log"
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        i = line.find('{"')
        if i < 0 or '"event"' not in line:
            continue
        try:
            doc = json.loads(line[i:])
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") in kinds:
            doc["logged_at"] = line[:23]
            out.append(doc)
    return out


def scaling_decisions(s: Session) -> list[dict]:
    """The autoscaler's decisions that changed the desired capacity, with their reasons."""
    out, last = [], None
    for d in _logged(s, ("scaling_decision",)):
        before = (d.get("fleet") or {}).get("desired")
        if d.get("desired") != before or d.get("desired") != last:
            out.append({k: d.get(k) for k in ("logged_at", "desired", "reason", "fleet", "latest_metric")})
        last = d.get("desired")
    return out


def lifecycle_actions(s: Session) -> list[dict]:
    return [
        {k: d.get(k) for k in ("logged_at", "kind", "instance_id", "hook", "done")}
        for d in _logged(s, ("lifecycle_action",))
    ]


def instance_minutes(s: Session, t_start: float, t_end: float) -> float:
    """Inference instance-minutes between two wall-clock times, from the local instances' lives."""
    total = 0.0
    for i in s.local()["instances"]:
        if i["role"] != "inference":
            continue
        a = max(i["started_at"], t_start)
        b = min(i["ended_at"] or t_end, t_end)
        total += max(0.0, b - a)
    return total / 60.0


def plot(
    path: Path, windows: list[dict], samples: list[dict], title: str, trace: tuple[str, float] | None = None
) -> None:
    """Traffic, capacity and p99 over the replay; ``trace`` = (trace start, trace minutes per
    second) labels the top axis with the trace's clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    t = [w["t"] for w in windows]
    axes[0].plot(t, [w["rps"] for w in windows], color="tab:blue", label="requests/s")
    axes[0].bar(t, [w["refused"] for w in windows], width=1.5, color="tab:orange", label="refused")
    axes[0].bar(t, [w["failed"] for w in windows], width=1.5, color="tab:red", label="failed")
    axes[0].set_ylabel("traffic")
    axes[0].legend(loc="upper right")
    if trace is not None and t:
        start, per_s = datetime.fromisoformat(trace[0]), trace[1]
        top = axes[0].twiny()
        top.set_xlim(axes[0].get_xlim())
        ticks = [x for x in range(0, int(max(t)) + 1, 20)]
        top.set_xticks(ticks)
        top.set_xticklabels([f"{start + timedelta(minutes=x * per_s):%a %H:%M}" for x in ticks], fontsize=7)
        top.set_xlabel("trace time")
        # the trace's nights (22:00-06:00 in its own time zone), where the fleet should come back in
        end = start + timedelta(minutes=max(t) * per_s)
        day = start.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
        shaded = False
        while day <= end:
            a = (day + timedelta(hours=22) - start).total_seconds() / 60 / per_s
            b = (day + timedelta(hours=30) - start).total_seconds() / 60 / per_s
            if b > 0 and a < max(t):
                for ax in axes:
                    label = "trace night (22:00-06:00)" if ax is axes[1] and not shaded else None
                    ax.axvspan(max(a, 0), min(b, max(t)), color="0.92", zorder=0, label=label)
                shaded = True
            day += timedelta(days=1)
    st = [x["t"] for x in samples]
    axes[1].step(st, [x["desired"] for x in samples], where="post", label="desired", color="tab:purple")
    axes[1].step(
        st, [x["ready"] for x in samples], where="post", label="ready (LB healthy)", color="tab:green"
    )
    axes[1].step(
        st,
        [x["states"].get("InService", 0) for x in samples],
        where="post",
        label="InService",
        color="tab:gray",
        linestyle=":",
    )
    axes[1].set_ylabel("instances")
    axes[1].legend(loc="upper left")
    axes[2].plot(t, [(w["p99_s"] or 0) * 1000 for w in windows], color="tab:red")
    axes[2].set_ylabel("p99 latency (ms)")
    axes[2].set_xlabel("seconds since the replay started")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ the run


class Hooks:
    """Points where a test injects faults or drives the fleet; the demo uses none of them."""

    def job_progress(self, s: Session, job: dict) -> None:
        """Called on every poll of the running job."""

    def after_rollout(self, s: Session) -> dict | None:
        """Once the model serves behind the load balancer, before the replay."""

    def during_replay(self, s: Session, t: float) -> str | None:
        """About every second of the replay (``t``: seconds since it started). A non-empty
        return (why) ends the replay there."""

    def after_replay(self, s: Session) -> dict | None:
        """After the replay and the scale-in wait, before the stack stops."""


def run(cfg: DemoConfig, hooks: Hooks | None = None) -> dict:
    """Run the demo and return its summary. Always stops the stack."""
    from localstack.replay import summarize, windows
    from localstack.stack import stop

    hooks = hooks or Hooks()
    t_begin = time.time()
    _T0[0] = time.monotonic()
    phases = Phases()
    summary: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}
    summary["phases"] = phases.seconds
    say(cfg, "starting the local stack ...")
    phases.start("stack_up")
    state = start_stack(cfg)
    s = Session(state)
    say(
        cfg,
        f"  api {state['api_url']}, load balancer {state['lb_url']}, aws stand-in {state['endpoint_url']}",
    )
    try:
        phases.start("job")
        if cfg.artifact_dir is not None:
            job = publish_prebuilt(cfg, s)
        else:
            key = upload_dataset(cfg, s)
            job = run_job(cfg, s, key, hooks)
        summary["job"] = {
            k: job.get(k)
            for k in ("job_id", "state", "result", "metrics", "error", "attempt", "attempts", "plan")
        }
        say(cfg, f"job {job['state']}: {json.dumps(job.get('metrics') or job.get('result'))[:300]}")
        if job["state"] != "SUCCEEDED":
            raise DemoError(f"job ended {job['state']}: {job.get('error')}")
        phases.start("rollout")
        summary["model"] = wait_rollout(cfg, s)
        summary["after_rollout"] = hooks.after_rollout(s)
        phases.start("replay")
        t0 = time.monotonic()
        sampler = Sampler(s).start(t0)
        t_wall0 = time.time()
        results = replay_trace(cfg, s, hooks)
        phases.start("settle")
        peak = max((x["desired"] for x in sampler.samples), default=0)
        if s.group().get("DesiredCapacity", 0) >= peak > cfg.fleet_min:
            say(cfg, f"replay done; waiting up to {cfg.settle_s:.0f}s for the scale-in")
            try:
                wait_until(lambda: s.group().get("DesiredCapacity", 0) < peak, cfg.settle_s, "scale-in")
            except DemoError as e:
                say(cfg, f"  {e}")
        try:  # instances leaving finish their drain (terminate hook) before the summary
            wait_until(lambda: _settled(s), 60, "the lifecycle hooks to complete")
        except DemoError as e:
            say(cfg, f"  {e}")
        summary["after_replay"] = hooks.after_replay(s)
        sampler.stop()
        phases.start("summary")
        t_wall1 = time.time()
        summary["traffic"] = summarize(results)
        summary["instance_minutes"] = round(instance_minutes(s, t_wall0, t_wall1), 2)
        summary["samples"] = sampler.samples
        summary["scaling"] = scaling_shape(sampler.samples, results, cfg)
        summary["decisions"] = scaling_decisions(s)
        summary["lifecycle"] = lifecycle_actions(s)
        summary["local"] = {
            k: v for k, v in s.local().items() if k in ("dispatcher", "failures", "lb", "instances")
        }
        png = cfg.out_dir / "timeline.png"
        plot(
            png,
            windows(results),
            sampler.samples,
            "nlpfleet local demo: traffic, capacity, p99 latency",
            (cfg.trace_start, cfg.trace_minutes_per_s),
        )
        summary["timeline_png"] = str(png)
        summary["results"] = [(r.sent_at, r.status, r.target, r.model) for r in results]
    finally:
        s.close()
        say(cfg, "stopping the local stack ...")
        phases.start("stop")
        stop(cfg.state_dir)
        phases.end()
    summary["stopped"] = True
    summary["elapsed_s"] = round(time.time() - t_begin, 1)
    return summary


def scaling_shape(samples: list[dict], results: list, cfg: DemoConfig) -> dict:
    """When the fleet peaked and each time it came back in, on the replay's clock and the trace's."""
    if not samples:
        return {}
    desired = [x["desired"] for x in samples]
    peak = max(desired)
    i_peak = desired.index(peak)
    i_in = next((i for i in range(i_peak, len(desired)) if desired[i] < peak), None)
    start = datetime.fromisoformat(cfg.trace_start)
    replay_s = cfg.trace_minutes / cfg.trace_minutes_per_s

    def trace_time(t: float) -> str:
        return f"{start + timedelta(minutes=t * cfg.trace_minutes_per_s):%a %H:%M}"

    out = {
        "peak_desired": peak,
        "peak_at_s": round(samples[i_peak]["t"], 1),
        "peak_at_trace": trace_time(samples[i_peak]["t"]),
        "scaled_in": i_in is not None,
        "min_after_peak": min(desired[i_peak:]),
        # every step down after the peak; after the replay's end there is no trace clock
        "scale_ins": [
            {
                "t_s": round(samples[i]["t"], 1),
                "trace": trace_time(samples[i]["t"]) if samples[i]["t"] <= replay_s else "after the replay",
                "from": desired[i - 1],
                "to": desired[i],
            }
            for i in range(i_peak + 1, len(desired))
            if desired[i] < desired[i - 1]
        ],
    }
    if i_in is not None:
        out.update(
            scale_in_at_s=round(samples[i_in]["t"], 1), scale_in_at_trace=trace_time(samples[i_in]["t"])
        )
    return out


def _settled(s: Session) -> bool:
    """No instance waits on a lifecycle hook."""
    return all(not i["LifecycleState"].endswith(":Wait") for i in s.group().get("Instances", []))


def print_summary(summary: dict) -> None:
    job = summary.get("job") or {}
    tr = summary.get("traffic") or {}
    acc = (job.get("metrics") or {}).get("accuracy") or ((job.get("result") or {}).get("metrics") or {}).get(
        "accuracy"
    )
    print("\n=== summary ===")
    print(f"job:               {job.get('job_id')} {job.get('state')} (attempts {job.get('attempt')})")
    print(f"dev accuracy:      {acc}")
    print(
        f"requests:          {tr.get('requests')} sent, {tr.get('served')} served, "
        f"{tr.get('refused')} refused (429/503), {tr.get('failed')} failed"
    )
    if tr.get("p50_s") is not None:
        print(f"latency:           p50 {1000 * tr['p50_s']:.1f} ms, p99 {1000 * tr['p99_s']:.1f} ms")
    print(f"instance-minutes:  {summary.get('instance_minutes')} (real minutes of inference instances)")
    sc = summary.get("scaling") or {}
    if sc:
        line = f"fleet:             peak {sc['peak_desired']} at t={sc['peak_at_s']}s (trace {sc['peak_at_trace']})"
        if sc.get("scaled_in"):
            line += f", scaled in at t={sc['scale_in_at_s']}s (trace {sc['scale_in_at_trace']})"
        print(line + f", lowest after the peak {sc['min_after_peak']}")
        steps = ", ".join(f"{x['from']} -> {x['to']} at {x['trace']}" for x in sc.get("scale_ins") or [])
        print(f"scale-in steps:    {steps or 'none'}")
    print("scaling decisions:")
    for d in summary.get("decisions", []):
        fleet = d.get("fleet") or {}
        print(
            f"  {d.get('logged_at', '')[11:19]}  {fleet.get('desired')} -> {d.get('desired')}  {d.get('reason')}"
        )
    print(f"timeline:          {summary.get('timeline_png')}")
    print("phases (s):        " + ", ".join(f"{k} {v}" for k, v in (summary.get("phases") or {}).items()))
    print(
        f"elapsed:           {summary.get('elapsed_s')} s; all local processes stopped: {summary.get('stopped')}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nlpfleet demo", description="the whole product end to end, locally")
    ap.add_argument("--short", action="store_true", help="the end-to-end test's shorter configuration")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--artifact", type=Path, default=None, help="publish this artifact instead of training")
    args = ap.parse_args(argv or [])
    cfg = short_config() if args.short else DemoConfig()
    if args.out:
        cfg.out_dir = args.out
    cfg.artifact_dir = args.artifact

    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the stack is always stopped
    def _interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = run(cfg)
    except DemoError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary)
    return 0 if (summary.get("traffic") or {}).get("failed") == 0 else 1


def short_config(**kw) -> DemoConfig:
    """The end-to-end test's configuration: ten Banking77 intents (40 examples each), one epoch of
    25 steps; three instances from the first rollout (the floor); 20 trace hours at most, ended by
    the test once the fleet has scaled back in; faster boots and status checks."""
    base = dict(
        classes=10,
        per_class_train=40,
        per_class_dev=10,
        epochs=1,
        max_steps=None,
        batch_size=16,
        learning_rate=1e-3,
        seq_len=32,
        job_timeout_s=150.0,
        boot_delay_s=1.0,
        status_check_delay_s=5.0,
        fleet_min=3,
        trace_minutes=20 * 60,
        trace_minutes_per_s=6.0,
        trace_start="1995-07-12T08:00:00-04:00",
        rps_per_req_per_min=0.1,
        target_inflight=2.0,
        settle_s=30.0,
    )
    base.update(kw)
    return DemoConfig(**base)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
