"""nlpfleet control plane: API routes and event handlers (thin; the work is in chalicelib/).

Every handler reads the same way: settings from the environment, adapters created lazily,
``chalicelib.control`` does parse → read → decide → execute, and the handler logs the
outcome once. Domain errors become HTTP statuses in ``chalicelib.errors.to_response``; any
other exception is Chalice's generic 500 outside the dev stage (traceback only in the log).
"""

import functools
import json
import logging
import os
import uuid
from datetime import UTC, datetime

from chalice import Chalice, IAMAuthorizer, Rate, Response

from chalicelib import control
from chalicelib.autoscaling_bp import autoscaling
from chalicelib.errors import ControlPlaneError, InvalidJobSpec, InvalidTransition, Skip, to_response
from chalicelib.events import MalformedEvent
from chalicelib.settings import Settings

STAGE = os.environ.get("STAGE", "dev")
app = Chalice(app_name="nlpfleet")
app.debug = STAGE == "dev"
app.log.setLevel(logging.INFO)
# IAM (SigV4) authorization on every route outside dev; dev may be open.
AUTH = None if STAGE == "dev" else IAMAuthorizer()

app.register_blueprint(autoscaling)


def _now() -> datetime:
    return datetime.now(UTC)


def _context():
    settings = Settings.from_env(os.environ)
    return settings, control.Adapters.from_settings(settings)


def _log(kind: str, **fields) -> None:
    app.log.info(json.dumps({"event": kind, **fields}, default=str, sort_keys=True))


def api(view):
    """Domain errors → their HTTP status (one mapping, ``to_response``)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        try:
            return view(*args, **kwargs)
        except ControlPlaneError as e:
            _log("api_error", route=view.__name__, status=e.status, message=e.message)
            return to_response(e)

    return wrapper


def _json_body() -> object:
    raw = app.current_request.raw_body
    if not raw:
        raise InvalidJobSpec({"body": "a JSON object is required"})
    try:
        return json.loads(raw)
    except ValueError as e:
        raise InvalidJobSpec({"body": f"not valid JSON: {e}"}) from None


def _header(name: str) -> str | None:
    headers = app.current_request.headers or {}
    return headers.get(name.lower()) or headers.get(name)


# -- API -----------------------------------------------------------------------------------


@app.route("/jobs", methods=["POST"], authorizer=AUTH)
@api
def create_job():
    settings, adapters = _context()
    body = _json_body()
    key = _header("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= 128):
        raise InvalidJobSpec({"Idempotency-Key": "must be 1-128 characters"})
    job_id = control.idempotent_job_id(key) if key else "j-" + uuid.uuid4().hex[:24]
    now = _now()
    job, created = control.submit(
        body, job_id=job_id, settings=settings, adapters=adapters, now=now, idempotency_key=key
    )
    _log(
        "job_submitted",
        job_id=job.job_id,
        created=created,
        state=job.state,
        plan=job.plan.get("instance_type"),
    )
    return Response(
        body=control.J.job_view(job, now),
        status_code=201 if created else 200,
        headers={"Location": f"/jobs/{job.job_id}"},
    )


@app.route("/jobs", methods=["GET"], authorizer=AUTH)
@api
def list_jobs():
    settings, adapters = _context()
    params = dict(app.current_request.query_params or {})
    return control.list_jobs(params, settings, adapters, _now())


@app.route("/jobs/{job_id}", methods=["GET"], authorizer=AUTH)
@api
def get_job(job_id):
    _, adapters = _context()
    return control.get_job(job_id, adapters, _now())


@app.route("/jobs/{job_id}", methods=["DELETE"], authorizer=AUTH)
@api
def cancel_job(job_id):
    settings, adapters = _context()
    view = control.cancel_job(job_id, settings, adapters, _now())
    _log("job_cancelled", job_id=job_id, instance=view["instance"])
    return view


@app.route("/plan", methods=["POST"], authorizer=AUTH)
@api
def plan_job():
    settings, adapters = _context()
    return control.plan_request(_json_body(), settings, adapters)


@app.route("/models", methods=["GET"], authorizer=AUTH)
@api
def list_models():
    settings, adapters = _context()
    return control.list_models(settings, adapters)


@app.route("/fleet", methods=["GET"], authorizer=AUTH)
@api
def fleet():
    settings, adapters = _context()
    return control.fleet_view(settings, adapters)


# -- events --------------------------------------------------------------------------------


def _event(kind: str, fn, event) -> dict:
    """Run an event use case; known no-ops and refusals are acknowledged and logged once,
    anything else propagates so Lambda retries the delivery."""
    raw = event.to_dict()
    settings, adapters = _context()
    try:
        outcome = fn(raw, settings, adapters, _now())
    except Skip as e:
        outcome = {"outcome": "skip", "reason": e.reason}
    except InvalidTransition as e:
        outcome = {"outcome": "skip", "reason": e.message}
    except MalformedEvent as e:
        outcome = {"outcome": "malformed", "reason": str(e)}
    _log(kind, event_id=raw.get("id"), detail_type=raw.get("detail-type"), **outcome)
    return outcome


@app.on_cw_event(
    {
        "source": ["aws.ec2"],
        "detail-type": ["EC2 Instance State-change Notification", "EC2 Spot Instance Interruption Warning"],
    },
    name="on_ec2_event",
)
def on_ec2_event(event):
    return _event("ec2_event", control.handle_ec2, event)


@app.on_cw_event(
    {
        "source": ["aws.s3"],
        "detail-type": ["Object Created"],
        "detail": {"object": {"key": [{"prefix": "datasets/"}, {"prefix": "models/"}]}},
    },
    name="on_object_created",
)
def on_object_created(event):
    return _event("s3_object_created", control.handle_s3, event)


@app.schedule(Rate(5, unit=Rate.MINUTES), name="sweep_heartbeats")
def sweep_heartbeats(event):
    settings, adapters = _context()
    outcome = control.sweep(settings, adapters, _now())
    _log("heartbeat_sweep", **outcome)
    return outcome
