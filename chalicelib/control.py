"""The control plane's use cases: what each route and event handler does, end to end.

Each function follows the same order: parse the input, read state through adapters, decide
with the pure functions in ``jobs``/``planner``/``events``, execute through adapters (the only
AWS calls), and return a dict the caller logs once. ``now`` (and new ids) come in as
arguments; nothing here reads a clock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from datetime import datetime

from chalicelib import jobs as J
from chalicelib.aws import Clients
from chalicelib.catalog import BY_NAME
from chalicelib.errors import (
    CapacityUnavailable,
    IdempotencyConflict,
    InvalidJobSpec,
    InvalidTransition,
    JobNotFound,
    NoInstanceFits,
    Skip,
)
from chalicelib.events import InstanceStateChange, ObjectCreated, SpotInterruption, parse_event
from chalicelib.jobs_store import JobsStore
from chalicelib.launcher import Ec2, Launched, launch_options, user_data
from chalicelib.manifest import ManifestError, validate_manifest
from chalicelib.planner import Plan, plan
from chalicelib.settings import Settings
from chalicelib.storage import (
    ActiveModel,
    DocumentTooLarge,
    FleetReader,
    ObjectMissing,
    Objects,
    prefix_size,
)

log = logging.getLogger("nlpfleet.control")


@dataclass
class Adapters:
    jobs: JobsStore
    ec2: Ec2
    objects: Objects
    active: ActiveModel
    fleet: FleetReader

    @classmethod
    def from_settings(cls, s: Settings) -> Adapters:
        c = Clients(s.region, s.endpoint_url)
        return cls(
            jobs=JobsStore(c, s.jobs_table),
            ec2=Ec2(c, launch_template=s.launch_template, instance_profile=s.instance_profile, stage=s.stage),
            objects=Objects(c),
            active=ActiveModel(c, s.active_model_param),
            fleet=FleetReader(c),
        )


def request_sha256(body: object) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def idempotent_job_id(key: str) -> str:
    return "j-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def dataset_job_id(ev: ObjectCreated) -> str:
    return "ds-" + hashlib.sha256(f"{ev.bucket}/{ev.key}/{ev.identity}".encode()).hexdigest()[:24]


# -- planning ------------------------------------------------------------------------------


def _input_size(spec: dict, a: Adapters) -> int | None:
    if spec.get("corpus_bytes") is not None or not spec.get("input_uri"):
        return None
    bucket, key = J.parse_s3_uri(spec["input_uri"])
    try:
        return prefix_size(a.objects, bucket, key) if key.endswith("/") else a.objects.size(bucket, key)
    except ObjectMissing:
        raise InvalidJobSpec({"input_uri": f"no object at {spec['input_uri']}"}) from None


def _resolve_model(spec: dict, s: Settings, a: Adapters) -> dict:
    """batch_infer: which published model to use, and its manifest (read state)."""
    if spec.get("model_uri"):
        uri = spec["model_uri"].rstrip("/") + "/"
    elif spec.get("model_name"):
        name, version = spec["model_name"], spec.get("model_version")
        if not version:
            versions = sorted(
                (m for m in list_models(s, a)["models"] if m["name"] == name), key=lambda m: m["created_at"]
            )
            if not versions:
                raise InvalidJobSpec({"model_name": f"no published model named {name!r}"})
            version = versions[-1]["version"]
        uri = f"s3://{s.bucket}/models/{name}/{version}/"
    else:
        active = a.active.get()
        if not active:
            raise InvalidJobSpec({"model_name": "no active model: name one (model_name/model_uri)"})
        uri = active["uri"]
    bucket, prefix = J.parse_s3_uri(uri)
    try:
        doc, _ = a.objects.read_json(bucket, prefix + "manifest.json", s.max_manifest_bytes)
        manifest = validate_manifest(doc)
    except (ObjectMissing, DocumentTooLarge, ValueError, ManifestError) as e:
        raise InvalidJobSpec({"model_uri": f"no valid manifest at {uri}: {e}"}) from None
    return {
        "model_uri": uri,
        "model_name": manifest["name"],
        "model_version": manifest["version"],
        "base_model": manifest["base_model"],
    }


def plan_for(spec: dict, size: int | None) -> Plan:
    w = J.workload_for(spec, size)
    if w.kind in ("preprocess", "infer") and not w.corpus_bytes and not w.examples:
        raise InvalidJobSpec({"corpus_bytes": "is required when input_uri is not given"})
    if w.kind == "train" and not w.examples and not w.corpus_bytes:
        raise InvalidJobSpec({"examples": "give examples or corpus_bytes (or an input_uri to measure)"})
    p = plan(w)
    if spec.get("instance_type"):
        chosen = [c for c in p.candidates if c.instance.name == spec["instance_type"]]
        if not chosen:
            why = dict(p.rejected).get(spec["instance_type"], "not feasible")
            raise InvalidJobSpec({"instance_type": f"{spec['instance_type']} does not fit: {why}"})
        p = Plan(p.workload, chosen[0], tuple(chosen), p.rejected, p.estimate, p.reasoning)
    if p.choice is None:
        raise NoInstanceFits(dict(p.rejected))
    return p


def plan_request(body: object, s: Settings, a: Adapters) -> dict:
    """``POST /plan``: the planner's answer without creating anything."""
    spec = J.parse_job_spec(body, require_input=False)
    p = plan_for(spec, _input_size(spec, a))
    return {"spec": spec, "workload": asdict(p.workload), **p.describe()}


def _plan_record(p: Plan, max_candidates: int) -> dict:
    c = p.choice
    return {
        "instance_type": c.instance.name,
        "strategy": c.strategy,
        "processes": c.procs,
        "micro_batch_per_gpu": c.micro_batch,
        "gradient_accumulation": c.grad_accum,
        "estimated_hours": round(c.hours, 3),
        "estimated_cost_usd": round(c.cost_usd, 4),
        "candidates": [x.instance.name for x in p.candidates[:max_candidates]],
        "reasoning": list(p.reasoning),
    }


# -- submitting and launching --------------------------------------------------------------


def _default_outputs(spec: dict, job_id: str, s: Settings, now: datetime) -> dict:
    bucket = s.bucket or J.parse_s3_uri(spec["input_uri"])[0]
    out = dict(spec)
    if not out.get("output_uri"):
        if spec["type"] == "finetune":
            version = now.strftime("%Y%m%d-%H%M%S") + "-" + job_id[-6:]
            out["output_uri"] = f"s3://{bucket}/models/{spec['model_name']}/{version}/"
        elif spec["type"] == "preprocess":
            out["output_uri"] = f"s3://{bucket}/preprocessed/{job_id}/"
        else:
            out["output_uri"] = spec["input_uri"] + ".predictions.jsonl"
    out["checkpoint_uri"] = f"s3://{bucket}/jobs/{job_id}/checkpoints/"
    return out


def submit(
    body: object,
    *,
    job_id: str,
    settings: Settings,
    adapters: Adapters,
    now: datetime,
    idempotency_key: str | None = None,
    source: dict | None = None,
    defaults: dict | None = None,
    corpus_bytes: int | None = None,
) -> tuple[J.Job, bool]:
    """Create a job and launch its instance. Returns (job, created). A repeated request with
    the same ``job_id`` (idempotency key, dataset version) returns the stored job; one left
    QUEUED by an interrupted earlier call is launched now (the client token prevents a twin)."""
    s, a = settings, adapters
    spec = J.parse_job_spec(body, defaults)
    sha = request_sha256(body)
    existing = _existing(job_id, a)
    if existing is not None:
        if idempotency_key and existing.request_sha256 != sha:
            raise IdempotencyConflict(idempotency_key, job_id)
        if existing.state != J.QUEUED or s.dry_run:
            return existing, False
        return _launch_new(existing, s, a, now), False
    if spec["type"] == "batch_infer":
        spec = {**spec, **_resolve_model(spec, s, a)}
    size = corpus_bytes if corpus_bytes is not None else _input_size(spec, a)
    p = plan_for(spec, size)
    spec = _default_outputs(spec, job_id, s, now)
    job = J.new_job(
        job_id,
        spec,
        now,
        plan=_plan_record(p, s.max_candidates),
        request_sha256=sha,
        idempotency_key=idempotency_key,
        source=source,
    )
    stored, created = a.jobs.create(job)
    if not created:
        if idempotency_key and stored.request_sha256 != sha:
            raise IdempotencyConflict(idempotency_key, job_id)
        if stored.state != J.QUEUED:
            return stored, False
    if s.dry_run:
        log.info("DRY_RUN: would have launched %s for %s", stored.plan["candidates"], job_id)
        return stored, created
    return _launch_new(stored, s, a, now), created


def _existing(job_id: str, a: Adapters) -> J.Job | None:
    try:
        return a.jobs.get(job_id)
    except JobNotFound:
        return None


def _user_data(job: J.Job, s: Settings, attempt: int, resume: bool) -> dict:
    launch = {
        k: job.plan.get(k) for k in ("strategy", "processes", "micro_batch_per_gpu", "gradient_accumulation")
    }
    launch["resume"] = resume
    return user_data(
        job.job_id,
        job.job_type,
        job.spec,
        bucket=s.bucket,
        table=s.jobs_table,
        region=s.region,
        stage=s.stage,
        endpoint_url=s.endpoint_url,
        attempt=attempt,
        launch=launch,
    )


def _tags(job: J.Job, s: Settings, attempt: int) -> dict[str, str]:
    return {"nlpfleet:stage": s.stage, "nlpfleet:job-type": job.job_type, "nlpfleet:attempt": str(attempt)}


def _try_launch(job: J.Job, s: Settings, a: Adapters, attempt: int, resume: bool) -> Launched:
    options = launch_options(job.plan["candidates"], job.spec.get("allow_spot", True))
    return a.ec2.launch(
        job.job_id, attempt, options, _user_data(job, s, attempt, resume), _tags(job, s, attempt)
    )


def _record_launch(
    job_id: str, got: Launched, a: Adapters, now: datetime, reason: str, expect_instance: str | None
) -> J.Job:
    def decide(j: J.Job) -> J.Job:
        if j.instance_id == got.instance_id:
            return j  # a duplicate already recorded this launch
        if j.instance_id != expect_instance:
            raise Skip(f"job {j.job_id} moved on to instance {j.instance_id}")
        why = reason + (f" (after {'; '.join(got.tried)})" if got.tried else "")
        return J.launched(
            j,
            instance_id=got.instance_id,
            instance_type=got.instance_type,
            market=got.market,
            hourly_usd=BY_NAME[got.instance_type].hourly_usd,
            now=now,
            reason=why,
        )

    try:
        return a.jobs.update(job_id, decide)
    except (InvalidTransition, Skip):
        # The job was cancelled (or relaunched by someone else) while this launch ran.
        a.ec2.terminate(got.instance_id)
        raise


def _launch_new(job: J.Job, s: Settings, a: Adapters, now: datetime) -> J.Job:
    try:
        got = _try_launch(job, s, a, attempt=1, resume=False)
    except CapacityUnavailable as e:
        why = e.message
        a.jobs.update(job.job_id, lambda j: J.transition(j, J.FAILED, reason=why, now=now))
        raise
    try:
        return _record_launch(job.job_id, got, a, now, f"launched {got.instance_type} ({got.market})", None)
    except (InvalidTransition, Skip):
        return a.jobs.get(job.job_id)


def _relaunch(job: J.Job, decision: J.Decision, s: Settings, a: Adapters, now: datetime) -> J.Job:
    old = job.instance_id
    try:
        got = _try_launch(job, s, a, attempt=job.attempt + 1, resume=True)
    except CapacityUnavailable as e:
        why = f"relaunch failed: {e.message}"
        return a.jobs.update(job.job_id, lambda j: _fail_if_current(j, old, why, now))
    return _record_launch(job.job_id, got, a, now, decision.reason, old)


def _fail_if_current(j: J.Job, instance_id: str | None, reason: str, now: datetime) -> J.Job:
    if j.terminal:
        raise Skip(f"job {j.job_id} is already {j.state}")
    if j.instance_id != instance_id:
        raise Skip(f"job {j.job_id} moved on to instance {j.instance_id}")
    return J.transition(j, J.FAILED, reason=reason, now=now)


# -- API reads and cancel ------------------------------------------------------------------


def get_job(job_id: str, a: Adapters, now: datetime) -> dict:
    return J.job_view(a.jobs.get(job_id), now)


def list_jobs(params: dict, s: Settings, a: Adapters, now: datetime) -> dict:
    errors = {}
    state = params.get("status") or params.get("state")
    if state is not None and state not in J.STATES:
        errors["status"] = f"must be one of {', '.join(J.STATES)}"
    jtype = params.get("type")
    if jtype is not None and jtype not in J.JOB_TYPES:
        errors["type"] = f"must be one of {', '.join(J.JOB_TYPES)}"
    limit = s.page_size
    if params.get("limit") is not None:
        if not re.fullmatch(r"\d{1,3}", params["limit"]) or not 1 <= int(params["limit"]) <= 100:
            errors["limit"] = "must be an integer between 1 and 100"
        else:
            limit = int(params["limit"])
    if errors:
        raise InvalidJobSpec(errors)
    page, token = a.jobs.list(state=state, job_type=jtype, limit=limit, next_token=params.get("next_token"))
    page.sort(key=lambda j: j.created_at, reverse=True)
    items = [
        {
            **{
                k: v
                for k, v in J.job_view(j, now).items()
                if k not in ("history", "spec", "attempts", "plan")
            },
            "name": j.spec.get("name"),
        }
        for j in page
    ]
    return {"jobs": items, "next_token": token}


def cancel_job(job_id: str, s: Settings, a: Adapters, now: datetime) -> dict:
    job = a.jobs.update(job_id, lambda j: J.transition(j, J.CANCELLED, reason="cancelled by user", now=now))
    if job.instance_id:
        if s.dry_run:
            log.info("DRY_RUN: would have terminated %s", job.instance_id)
        else:
            a.ec2.terminate(job.instance_id)
    return J.job_view(job, now)


def list_models(s: Settings, a: Adapters) -> dict:
    active = a.active.get() or {}
    models, invalid = [], []
    for key in a.objects.manifest_keys(s.bucket):
        try:
            doc, _ = a.objects.read_json(s.bucket, key, s.max_manifest_bytes)
            m = validate_manifest(doc)
        except (ObjectMissing, DocumentTooLarge, ValueError, ManifestError) as e:
            invalid.append({"key": key, "problem": str(e)})
            continue
        uri = f"s3://{s.bucket}/{key[: -len('manifest.json')]}"
        models.append(
            {
                "name": m["name"],
                "version": m["version"],
                "uri": uri,
                "base_model": m["base_model"],
                "created_at": m["created_at"],
                "metrics": m["metrics"],
                "labels": len(m["labels"]),
                "variants": sorted(k for k, v in m["variants"].items() if v.get("published")),
                "active": active.get("uri") == uri,
            }
        )
    models.sort(key=lambda m: (m["name"], m["created_at"]), reverse=True)
    return {"models": models, "invalid": invalid, "active": active or None}


def fleet_view(s: Settings, a: Adapters) -> dict:
    group = a.fleet.describe(s.inference_asg)
    counts: dict[str, int] = {}
    for i in (group or {}).get("instances", []):
        counts[i["lifecycle_state"]] = counts.get(i["lifecycle_state"], 0) + 1
    return {
        "group": group,
        "lifecycle_counts": counts,
        "active_model": a.active.get(),
        "asg_name": s.inference_asg,
    }


# -- events --------------------------------------------------------------------------------


def _job_for_instance(instance_id: str, a: Adapters) -> J.Job:
    job = a.jobs.find_by_instance(instance_id)
    if job is None:
        job_id = a.ec2.job_id_of(instance_id)
        if job_id is None:
            raise Skip(f"instance {instance_id} is not a job instance")
        try:
            job = a.jobs.get(job_id)
        except JobNotFound:  # another stage's job: every stage's rule sees the account's events
            raise Skip(f"job {job_id} of instance {instance_id} is not in this stage's table") from None
    return job


def handle_ec2(raw: dict, s: Settings, a: Adapters, now: datetime) -> dict:
    ev = parse_event(raw)
    job = _job_for_instance(ev.instance_id, a)
    if isinstance(ev, SpotInterruption):

        def interrupt(j: J.Job) -> J.Job:
            d = J.decide_spot_warning(j, ev.instance_id)
            return J.transition(j, J.INTERRUPTED, reason=d.reason, now=now)

        job = a.jobs.update(job.job_id, interrupt)
        return {"outcome": "interrupted", "job_id": job.job_id, "state": job.state}
    assert isinstance(ev, InstanceStateChange)
    decision = J.decide_instance_state(job, ev.instance_id, ev.state, s.max_attempts)
    return _apply(job, decision, ev.instance_id, s, a, now)


def _apply(
    job: J.Job, decision: J.Decision, instance_id: str | None, s: Settings, a: Adapters, now: datetime
) -> dict:
    if decision.action == "running":

        def run(j: J.Job) -> J.Job:
            if j.instance_id != instance_id or j.state != J.LAUNCHED:
                raise Skip(f"job {j.job_id} is {j.state} on {j.instance_id}")
            return J.transition(j, J.RUNNING, reason=decision.reason, now=now)

        job = a.jobs.update(job.job_id, run)
    elif decision.action == "relaunch":
        if s.dry_run:
            log.info("DRY_RUN: would have relaunched job %s", job.job_id)
            return {"outcome": "dry-run relaunch", "job_id": job.job_id}
        job = _relaunch(job, decision, s, a, now)
    elif decision.action == "fail":
        job = a.jobs.update(job.job_id, lambda j: _fail_if_current(j, instance_id, decision.reason, now))
    if decision.terminate:
        if s.dry_run:
            log.info("DRY_RUN: would have terminated %s", decision.terminate)
        else:
            a.ec2.terminate(decision.terminate)
    return {
        "outcome": decision.action,
        "job_id": job.job_id,
        "state": job.state,
        "reason": decision.reason,
        "instance_id": job.instance_id,
    }


def sweep(s: Settings, a: Adapters, now: datetime) -> dict:
    """The scheduled heartbeat sweep: fail (and terminate) jobs whose worker went silent,
    relaunch interrupted jobs whose instance never announced its end."""
    outcomes = []
    for job in a.jobs.active((J.QUEUED, *J.ACTIVE)):
        d = J.decide_stale(
            job,
            now,
            heartbeat_timeout_s=s.heartbeat_timeout_s,
            boot_grace_s=s.boot_grace_s,
            interrupted_grace_s=s.interrupted_grace_s,
            max_attempts=s.max_attempts,
        )
        if d is None:
            continue
        try:
            outcomes.append(_apply(job, d, job.instance_id, s, a, now))
        except Skip as e:
            outcomes.append({"outcome": "skip", "job_id": job.job_id, "reason": e.reason})
    return {"checked": "active jobs", "acted": outcomes}


_SAFE = re.compile(r"[^a-z0-9._-]+")


def _default_model_name(key: str) -> str:
    parts = key.split("/")
    raw = parts[1] if len(parts) > 2 else parts[-1].rsplit(".", 1)[0]
    name = _SAFE.sub("-", raw.lower()).strip("-._") or "model"
    return name[:64]


def handle_s3(raw: dict, s: Settings, a: Adapters, now: datetime) -> dict:
    ev = parse_event(raw)
    assert isinstance(ev, ObjectCreated)
    if s.bucket and ev.bucket != s.bucket:
        raise Skip(f"bucket {ev.bucket} is not this stage's bucket {s.bucket}")
    if ev.kind == "manifest":
        return _record_manifest(ev, s, a)
    sidecar_key = ev.key + ".job.json"
    try:
        body, _ = a.objects.read_json(ev.bucket, sidecar_key, 64_000)
        spec_from = f"s3://{ev.bucket}/{sidecar_key}"
    except ObjectMissing:
        body, spec_from = {}, "defaults"
    except (ValueError, DocumentTooLarge) as e:
        return {"outcome": "refused", "key": ev.key, "reason": f"sidecar {sidecar_key}: {e}"}
    if not isinstance(body, dict):
        return {"outcome": "refused", "key": ev.key, "reason": f"sidecar {sidecar_key} is not a JSON object"}
    # The sidecar is the whole spec; without one, the configured defaults are.
    defaults = {} if spec_from != "defaults" else dict(s.dataset_defaults)
    body = {**body, "input_uri": ev.uri}
    if (body.get("type") or defaults.get("type")) == "finetune" and "model_name" not in body:
        defaults.setdefault("model_name", _default_model_name(ev.key))
    source = {
        "kind": "s3",
        "bucket": ev.bucket,
        "key": ev.key,
        "version": ev.identity,
        "spec_from": spec_from,
    }
    try:
        job, created = submit(
            body,
            job_id=dataset_job_id(ev),
            settings=s,
            adapters=a,
            now=now,
            source=source,
            defaults=defaults,
            corpus_bytes=ev.size,
        )
    except (InvalidJobSpec, NoInstanceFits) as e:
        return {"outcome": "refused", "key": ev.key, "reason": e.message, "details": e.details}
    return {
        "outcome": "created" if created else "duplicate",
        "job_id": job.job_id,
        "state": job.state,
        "spec_from": spec_from,
    }


def _record_manifest(ev: ObjectCreated, s: Settings, a: Adapters) -> dict:
    try:
        doc, raw = a.objects.read_json(ev.bucket, ev.key, s.max_manifest_bytes, ev.version_id)
        m = validate_manifest(doc)
    except ObjectMissing:
        raise Skip(f"{ev.uri} no longer exists") from None
    except (ValueError, DocumentTooLarge, ManifestError) as e:
        return {"outcome": "refused", "key": ev.key, "reason": str(e)}
    if (m["name"], m["version"]) != (ev.model_name, ev.model_version):
        return {
            "outcome": "refused",
            "key": ev.key,
            "reason": f"manifest says {m['name']}/{m['version']}, path says {ev.model_name}/{ev.model_version}",
        }
    value = {
        "name": m["name"],
        "version": m["version"],
        "uri": f"s3://{ev.bucket}/models/{m['name']}/{m['version']}/",
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "recorded_from_event_time": ev.time,
    }
    current = a.active.get() or {}
    if current.get("uri") == value["uri"] and current.get("manifest_sha256") == value["manifest_sha256"]:
        raise Skip(f"{m['name']}/{m['version']} is already the active model")
    if current.get("recorded_from_event_time", "") > ev.time:
        raise Skip(
            f"{m['name']}/{m['version']} was uploaded before the active model "
            f"{current.get('name')}/{current.get('version')} (late delivery)"
        )
    if s.dry_run:
        log.info("DRY_RUN: would have set %s to %s", a.active.name, value)
        return {"outcome": "dry-run", "model": value}
    a.active.put(value)
    return {"outcome": "activated", "model": value, "previous": current or None}
