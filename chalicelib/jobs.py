"""Jobs: request validation, the job record and its state machine (pure: no I/O, no clock).

Every change to a job goes through a function here that returns a new ``Job`` or raises
``InvalidTransition``; ``jobs_store`` writes the result with a condition on the version it
read, so a concurrent or duplicated event re-reads and re-decides instead of overwriting.

States::

    QUEUED ──► LAUNCHED ──► RUNNING ──► SUCCEEDED
                 ▲  │          │  ╲
                 │  ▼          ▼   ╲──► FAILED
                 └─ INTERRUPTED ◄──┘    CANCELLED (from any non-terminal state)

``LAUNCHED → LAUNCHED`` and ``RUNNING/INTERRUPTED → LAUNCHED`` are relaunches (a new attempt
on a new instance, resuming from the last checkpoint). SUCCEEDED, FAILED and CANCELLED are
terminal: nothing leaves them.

Example::

    >>> from datetime import UTC, datetime
    >>> now = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    >>> spec = parse_job_spec({"type": "preprocess", "input_uri": "s3://bkt/datasets/c.csv"})
    >>> job = new_job("j-1", spec, now)
    >>> job = launched(job, instance_id="i-1", instance_type="c6i.xlarge", market="spot",
    ...                hourly_usd=0.17, now=now)
    >>> (job.state, job.attempt)
    ('LAUNCHED', 1)
    >>> transition(job, SUCCEEDED, reason="done", now=now).state
    'SUCCEEDED'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from chalicelib.catalog import BY_NAME
from chalicelib.errors import InvalidJobSpec, InvalidTransition, Skip
from chalicelib.planner import Workload

QUEUED, LAUNCHED, RUNNING, INTERRUPTED = "QUEUED", "LAUNCHED", "RUNNING", "INTERRUPTED"
SUCCEEDED, FAILED, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
STATES = (QUEUED, LAUNCHED, RUNNING, INTERRUPTED, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = (LAUNCHED, RUNNING, INTERRUPTED)
ALLOWED: dict[str, frozenset[str]] = {
    QUEUED: frozenset({LAUNCHED, FAILED, CANCELLED}),
    LAUNCHED: frozenset({LAUNCHED, RUNNING, INTERRUPTED, SUCCEEDED, FAILED, CANCELLED}),
    RUNNING: frozenset({LAUNCHED, INTERRUPTED, SUCCEEDED, FAILED, CANCELLED}),
    INTERRUPTED: frozenset({LAUNCHED, SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}
JOB_TYPES = ("finetune", "preprocess", "batch_infer")
PLANNER_KIND = {"finetune": "train", "preprocess": "preprocess", "batch_infer": "infer"}

# Base checkpoints the planner knows the shape of: parameters, layers, hidden size, heads.
BASE_MODELS: dict[str, tuple[int, int, int, int]] = {
    "all-MiniLM-L6-v2": (22_700_000, 6, 384, 12),
    "distilbert-base-uncased": (66_000_000, 6, 768, 12),
    "bert-base-uncased": (110_000_000, 12, 768, 12),
    "bert-large-uncased": (340_000_000, 24, 1024, 16),
    "roberta-base": (125_000_000, 12, 768, 12),
    "roberta-large": (355_000_000, 24, 1024, 16),
    "gpt2": (124_000_000, 12, 768, 12),
    "gpt2-xl": (1_558_000_000, 48, 1600, 25),
    "gpt-neo-1.3B": (1_300_000_000, 24, 2048, 16),
    "t5-base": (220_000_000, 24, 768, 12),
    "llama-2-7b": (6_740_000_000, 32, 4096, 32),
}
DEFAULT_BASE_MODEL = "all-MiniLM-L6-v2"
BYTES_PER_EXAMPLE = 60.0  # a short customer-support utterance as a CSV row; for size-only estimates

_S3_RE = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(.+)$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .-]{0,63}$")


# -- request validation ------------------------------------------------------------------

_COMMON = {
    "type",
    "name",
    "input_uri",
    "output_uri",
    "deadline_h",
    "max_hourly_usd",
    "allow_spot",
    "max_attempts",
    "instance_type",
    "corpus_bytes",
    "examples",
    "base_model",
    "model_params",
    "layers",
    "hidden",
    "heads",
    "seq_len",
    "text_field",
    "label_field",
}
_PER_TYPE = {
    "finetune": {
        "model_name",
        "epochs",
        "batch_size",
        "precision",
        "learning_rate",
        "eval_uri",
        "max_steps",
        "checkpoint_every_steps",
    },
    "preprocess": {"shard_examples", "in_memory"},
    "batch_infer": {"model_name", "model_version", "model_uri", "batch_size", "precision"},
}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    m = _S3_RE.match(uri or "")
    if not m:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    return m.group(1), m.group(2)


class _Checker:
    def __init__(self, body: dict):
        self.body = body
        self.out: dict = {}
        self.errors: dict[str, str] = {}

    def _num(self, key, default, lo, hi, integer, required=False):
        v = self.body.get(key, default)
        if v is None:
            if required:
                self.errors[key] = "is required"
            self.out[key] = None
            return
        if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not float(v).is_integer()):
            self.errors[key] = f"must be {'an integer' if integer else 'a number'}"
            return
        if not (lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
            self.errors[key] = f"must be between {lo:g} and {hi:g}"
            return
        self.out[key] = int(v) if integer else float(v)

    def int(self, key, default, lo, hi, required=False):
        self._num(key, default, lo, hi, True, required)

    def float(self, key, default, lo, hi):
        self._num(key, default, lo, hi, False)

    def bool(self, key, default):
        v = self.body.get(key, default)
        if not isinstance(v, bool):
            self.errors[key] = "must be true or false"
            return
        self.out[key] = v

    def s3(self, key, required=False):
        v = self.body.get(key)
        if v is None:
            if required:
                self.errors[key] = "is required (s3://bucket/key)"
            self.out[key] = None
            return
        try:
            parse_s3_uri(v if isinstance(v, str) else "")
        except ValueError:
            self.errors[key] = "must be an s3://bucket/key URI"
            return
        self.out[key] = v

    def str(self, key, default, pattern, what, choices=None, required=False):
        v = self.body.get(key, default)
        if v is None:
            if required:
                self.errors[key] = "is required"
            self.out[key] = None
            return
        if not isinstance(v, str) or (choices and v not in choices) or (pattern and not pattern.match(v)):
            self.errors[key] = f"must be {what}"
            return
        self.out[key] = v


def parse_job_spec(body: object, defaults: dict | None = None, *, require_input: bool = True) -> dict:
    """Validate a job request (``POST /jobs``, ``POST /plan``, a dataset sidecar) and return
    it normalised with every default filled in. Raises ``InvalidJobSpec`` naming each bad
    field. ``POST /plan`` passes ``require_input=False``: a plan may state sizes instead.

    >>> parse_job_spec({"type": "finetune", "input_uri": "s3://bkt/d.csv"})
    Traceback (most recent call last):
    ...
    chalicelib.errors.InvalidJobSpec: invalid request: model_name: is required
    """
    if not isinstance(body, dict):
        raise InvalidJobSpec({"body": "must be a JSON object"})
    body = {**(defaults or {}), **body}
    jtype = body.get("type")
    if jtype not in JOB_TYPES:
        raise InvalidJobSpec({"type": f"must be one of {', '.join(JOB_TYPES)}"})
    c = _Checker(body)
    c.out["type"] = jtype
    unknown = sorted(set(body) - _COMMON - _PER_TYPE[jtype])
    for key in unknown:
        c.errors[key] = f"unknown field for a {jtype} job"
    c.str("name", None, re.compile(r"^.{1,128}$"), "a string of 1-128 characters")
    c.s3("input_uri", required=require_input)
    c.s3("output_uri")
    c.float("deadline_h", None, 0.01, 24 * 365)
    c.float("max_hourly_usd", None, 0.01, 1000)
    c.bool("allow_spot", True)
    c.int("max_attempts", None, 1, 20)
    c.str(
        "instance_type",
        None,
        None,
        "an instance type from the catalog (GET /plan lists them)",
        choices=set(BY_NAME),
    )
    c.int("corpus_bytes", None, 0, 10**15)
    c.int("examples", None, 1, 10**12)
    c.str(
        "base_model",
        DEFAULT_BASE_MODEL,
        re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"),
        "a base checkpoint name",
    )
    c.int("model_params", None, 1_000, 10**12)
    c.int("layers", None, 1, 512)
    c.int("hidden", None, 16, 65_536)
    c.int("heads", None, 1, 512)
    c.int("seq_len", 128, 8, 8192)
    c.str("text_field", "text", _FIELD_RE, "a column name")
    c.str("label_field", "label", _FIELD_RE, "a column name")
    if jtype == "finetune":
        c.str("model_name", None, _NAME_RE, "a model name matching [a-z0-9][a-z0-9._-]{0,63}", required=True)
        c.int("epochs", 3, 1, 100)
        c.int("batch_size", 32, 1, 4096)
        c.str("precision", "fp16", None, "fp32, fp16 or bf16", choices={"fp32", "fp16", "bf16"})
        c.float("learning_rate", 5e-5, 1e-8, 1.0)
        c.s3("eval_uri")
        c.int("max_steps", None, 1, 10**9)
        # Spot jobs checkpoint every 200 steps by default: a reclaim without a clean SIGTERM
        # (or a lost instance) then costs at most that much work on the relaunch.
        c.int("checkpoint_every_steps", 200 if body.get("allow_spot", True) is not False else 0, 0, 10**9)
    elif jtype == "preprocess":
        c.int("shard_examples", 10_000, 10, 10_000_000)
        c.bool("in_memory", False)
    else:
        c.str("model_name", None, _NAME_RE, "a model name matching [a-z0-9][a-z0-9._-]{0,63}")
        c.str("model_version", None, re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"), "a model version")
        c.s3("model_uri")
        c.int("batch_size", 64, 1, 4096)
        c.str("precision", "fp32", None, "fp32 or fp16", choices={"fp32", "fp16"})
        if body.get("model_version") is not None and body.get("model_name") is None:
            c.errors["model_version"] = "needs model_name"
    base = c.out.get("base_model")
    if (
        base
        and base not in BASE_MODELS
        and c.out.get("model_params") is None
        and "base_model" not in c.errors
    ):
        c.errors["model_params"] = (
            f"is required for base model {base!r} (known: {', '.join(sorted(BASE_MODELS))})"
        )
    if c.errors:
        raise InvalidJobSpec(c.errors)
    return c.out


def workload_for(spec: dict, corpus_bytes: int | None = None) -> Workload:
    """The planner's view of a validated spec. ``corpus_bytes`` is the input's size when the
    caller looked it up (S3 HEAD or the S3 event) and the request did not state it."""
    params, layers, hidden, heads = BASE_MODELS.get(spec.get("base_model") or "", (0, 0, 0, 0))
    if spec.get("model_params"):
        params = spec["model_params"]
        if spec.get("base_model") not in BASE_MODELS:
            layers, hidden, heads = 0, 0, 0
    size = spec.get("corpus_bytes")
    if size is None:
        size = corpus_bytes or 0
    examples = spec.get("examples") or 0
    kind = PLANNER_KIND[spec["type"]]
    if kind == "train" and not examples:
        examples = max(1, round(size / BYTES_PER_EXAMPLE))
    return Workload(
        kind=kind,
        params=params,
        layers=spec.get("layers") or layers,
        hidden=spec.get("hidden") or hidden,
        heads=spec.get("heads") or heads,
        seq_len=spec.get("seq_len") or 128,
        batch_size=spec.get("batch_size") or 32,
        epochs=spec.get("epochs") or 1,
        examples=examples,
        precision=spec.get("precision") or "fp16",
        corpus_bytes=size,
        in_memory=bool(spec.get("in_memory")),
        deadline_h=spec.get("deadline_h"),
        max_hourly_usd=spec.get("max_hourly_usd"),
    )


# -- the record and its state machine -----------------------------------------------------


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Job:
    job_id: str
    job_type: str
    spec: dict
    state: str
    created_at: str
    updated_at: str
    version: int = 0
    attempt: int = 0
    instance_id: str | None = None
    history: tuple = ()
    attempts: tuple = ()
    progress: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    result: dict | None = None
    error: str | None = None
    heartbeat_at: str | None = None
    plan: dict = field(default_factory=dict)
    request_sha256: str = ""
    idempotency_key: str | None = None
    source: dict = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def new_job(
    job_id: str,
    spec: dict,
    now: datetime,
    *,
    plan: dict | None = None,
    request_sha256: str = "",
    idempotency_key: str | None = None,
    source: dict | None = None,
) -> Job:
    t = iso(now)
    return Job(
        job_id=job_id,
        job_type=spec["type"],
        spec=spec,
        state=QUEUED,
        created_at=t,
        updated_at=t,
        history=({"from": None, "to": QUEUED, "at": t, "reason": "submitted"},),
        plan=plan or {},
        request_sha256=request_sha256,
        idempotency_key=idempotency_key,
        source=source or {"kind": "api"},
    )


def transition(job: Job, to: str, *, reason: str, now: datetime, **changes) -> Job:
    """Move ``job`` to ``to`` (recording when and why) or raise ``InvalidTransition``."""
    if to not in ALLOWED.get(job.state, ()):
        raise InvalidTransition(job.job_id, job.state, to)
    t = iso(now)
    entry = {"from": job.state, "to": to, "at": t, "reason": reason}
    if job.instance_id or changes.get("instance_id"):
        entry["instance_id"] = changes.get("instance_id", job.instance_id)
    if to == FAILED:
        changes.setdefault("error", reason)
    attempts = job.attempts
    if to in TERMINAL or to == LAUNCHED:
        attempts = _close_attempt(attempts, t)
    return replace(job, state=to, updated_at=t, history=job.history + (entry,), attempts=attempts, **changes)


def _close_attempt(attempts: tuple, t: str) -> tuple:
    if attempts and attempts[-1].get("ended_at") is None:
        return attempts[:-1] + ({**attempts[-1], "ended_at": t},)
    return attempts


def launched(
    job: Job,
    *,
    instance_id: str,
    instance_type: str,
    market: str,
    hourly_usd: float,
    now: datetime,
    reason: str = "instance launched",
) -> Job:
    """A new attempt on a new instance (the first launch or a relaunch)."""
    job = transition(job, LAUNCHED, reason=reason, now=now, instance_id=instance_id)
    attempt = job.attempt + 1
    record = {
        "attempt": attempt,
        "instance_id": instance_id,
        "instance_type": instance_type,
        "market": market,
        "hourly_usd": hourly_usd,
        "launched_at": iso(now),
        "ended_at": None,
    }
    return replace(job, attempt=attempt, attempts=job.attempts + (record,), heartbeat_at=None)


def record_progress(job: Job, progress: dict, now: datetime, metrics: dict | None = None) -> Job:
    """A worker heartbeat. The first one moves LAUNCHED to RUNNING; a terminal job refuses it
    (the worker then stops: its job was cancelled or failed)."""
    if job.terminal:
        raise InvalidTransition(job.job_id, job.state, RUNNING)
    if job.state in (LAUNCHED, QUEUED):
        job = transition(job, RUNNING, reason="worker started", now=now)
    merged = {**job.metrics, **(metrics or {})}
    return replace(job, progress=dict(progress), metrics=merged, heartbeat_at=iso(now), updated_at=iso(now))


def finish(job: Job, *, ok: bool, now: datetime, result: dict | None = None, error: str | None = None) -> Job:
    to = SUCCEEDED if ok else FAILED
    reason = "worker reported success" if ok else f"worker reported failure: {error}"
    return transition(job, to, reason=reason, now=now, result=result, error=None if ok else error)


def cost_so_far(job: Job, now: datetime) -> float:
    """On-demand upper bound: hourly price x time on every attempt (spot costs less)."""
    total = 0.0
    for a in job.attempts:
        start = parse_iso(a["launched_at"])
        end = parse_iso(a["ended_at"]) if a.get("ended_at") else now
        total += max(0.0, (end - start).total_seconds()) / 3600 * float(a.get("hourly_usd") or 0)
    return round(total, 4)


# -- decisions on events -----------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What to do to a job: ``action`` in running | relaunch | fail | interrupt."""

    action: str
    reason: str
    terminate: str | None = None  # an instance to terminate


GONE_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})


def decide_instance_state(job: Job, instance_id: str, ec2_state: str, max_attempts: int) -> Decision:
    """An EC2 instance state change for ``job``'s instance. Raises ``Skip`` for no-ops:
    another attempt's instance, a finished job, a state that moves nothing (duplicates and
    late deliveries land here).

    >>> from datetime import UTC, datetime
    >>> now = datetime(2026, 11, 26, tzinfo=UTC)
    >>> j = launched(new_job("j", parse_job_spec({"type": "preprocess", "input_uri": "s3://bkt/k"}), now),
    ...              instance_id="i-1", instance_type="c5.xlarge", market="spot", hourly_usd=0.17, now=now)
    >>> decide_instance_state(j, "i-1", "terminated", 3).action
    'relaunch'
    """
    if job.terminal:
        raise Skip(f"job {job.job_id} is already {job.state}")
    if instance_id != job.instance_id:
        raise Skip(
            f"instance {instance_id} is not the current instance of job {job.job_id} ({job.instance_id})"
        )
    if ec2_state == "running":
        if job.state == LAUNCHED:
            return Decision("running", "instance running")
        raise Skip(f"instance running, job already {job.state}")
    if ec2_state in GONE_STATES:
        max_attempts = job.spec.get("max_attempts") or max_attempts
        how = "spot interruption" if job.state == INTERRUPTED else f"instance {ec2_state}"
        if job.attempt < max_attempts:
            return Decision(
                "relaunch",
                f"{how} without a result; relaunching (attempt {job.attempt + 1} of {max_attempts})",
                terminate=instance_id if ec2_state in ("stopping", "stopped") else None,
            )
        return Decision(
            "fail",
            f"{how} without a result after {job.attempt} attempt(s)",
            terminate=instance_id if ec2_state in ("stopping", "stopped") else None,
        )
    raise Skip(f"instance state {ec2_state!r} changes nothing")


def decide_spot_warning(job: Job, instance_id: str) -> Decision:
    if job.terminal:
        raise Skip(f"job {job.job_id} is already {job.state}")
    if instance_id != job.instance_id:
        raise Skip(f"instance {instance_id} is not the current instance of job {job.job_id}")
    if job.state == INTERRUPTED:
        raise Skip("interruption already recorded")
    return Decision("interrupt", "EC2 spot interruption warning (2 minutes)")


def decide_stale(
    job: Job,
    now: datetime,
    *,
    heartbeat_timeout_s: int,
    boot_grace_s: int,
    interrupted_grace_s: int,
    max_attempts: int,
) -> Decision | None:
    """The sweep's question for one active job: is it dead? A RUNNING job whose last
    heartbeat is older than ``heartbeat_timeout_s``; a LAUNCHED job that never reported within
    boot grace plus timeout; an INTERRUPTED job whose instance never announced its end; a QUEUED
    job never launched within boot grace (a retried POST with its Idempotency-Key launches it
    before that)."""
    if job.terminal:
        return None
    last = parse_iso(job.heartbeat_at or job.updated_at)
    age = (now - last).total_seconds()
    if job.state == QUEUED:  # the submitting call died between recording and launching
        if age <= boot_grace_s:
            return None
        return Decision("fail", f"never launched: queued for {age:.0f} s")
    if job.state == INTERRUPTED:
        if age <= interrupted_grace_s:
            return None
        max_attempts = job.spec.get("max_attempts") or max_attempts
        if job.attempt < max_attempts:
            return Decision(
                "relaunch",
                f"interrupted {age:.0f} s ago, no termination seen; relaunching",
                terminate=job.instance_id,
            )
        return Decision("fail", f"interrupted after {job.attempt} attempt(s)", terminate=job.instance_id)
    limit = heartbeat_timeout_s + (boot_grace_s if job.state == LAUNCHED and not job.heartbeat_at else 0)
    if age <= limit:
        return None
    what = "no heartbeat" if job.heartbeat_at else "worker never reported"
    return Decision("fail", f"{what} for {age:.0f} s (limit {limit} s)", terminate=job.instance_id)


def job_view(job: Job, now: datetime) -> dict:
    """The API's representation of a job."""
    return {
        "job_id": job.job_id,
        "type": job.job_type,
        "state": job.state,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "spec": job.spec,
        "history": list(job.history),
        "progress": job.progress,
        "metrics": job.metrics,
        "result": job.result,
        "error": job.error,
        "heartbeat_at": job.heartbeat_at,
        "attempt": job.attempt,
        "instance": dict(job.attempts[-1]) if job.attempts else None,
        "attempts": list(job.attempts),
        "cost_so_far_usd": cost_so_far(job, now),
        "cost_basis": "on-demand price x instance time (upper bound for spot)",
        "plan": job.plan,
        "source": job.source,
    }
