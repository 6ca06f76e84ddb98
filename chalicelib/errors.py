"""Domain errors of the control plane, and the one place they become HTTP responses.

Adapters catch botocore's ``ClientError`` and raise one of these; handlers never see
botocore exceptions. ``to_response`` is the single mapping from a domain error to an HTTP
status (validation 400, unknown job 404, illegal transition 409, no capacity 503).

``Skip`` is not an error: an event handler raises or returns it for a known no-op (a
duplicate delivery, an event about an instance that is not a job's) so the event is
acknowledged and logged instead of retried.
"""

from __future__ import annotations


class ControlPlaneError(Exception):
    """Base of every domain error: ``message`` for people, ``details`` for machines."""

    status = 500
    code = "InternalServerError"

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidJobSpec(ControlPlaneError):
    """A request body that fails validation; ``fields`` maps each bad field to its problem."""

    status = 400
    code = "BadRequestError"

    def __init__(self, fields: dict[str, str]):
        self.fields = dict(fields)
        msg = "invalid request: " + "; ".join(f"{k}: {v}" for k, v in sorted(self.fields.items()))
        super().__init__(msg, {"fields": self.fields})


class JobNotFound(ControlPlaneError):
    status = 404
    code = "NotFoundError"

    def __init__(self, job_id: str):
        super().__init__(f"job {job_id!r} not found", {"job_id": job_id})


class InvalidTransition(ControlPlaneError):
    """The state machine refuses a transition (e.g. cancelling a finished job)."""

    status = 409
    code = "ConflictError"

    def __init__(self, job_id: str, from_state: str, to_state: str):
        super().__init__(
            f"job {job_id!r} cannot go from {from_state} to {to_state}",
            {"job_id": job_id, "state": from_state, "requested": to_state},
        )
        self.from_state = from_state
        self.to_state = to_state


class IdempotencyConflict(ControlPlaneError):
    """An ``Idempotency-Key`` reused with a different request body."""

    status = 409
    code = "ConflictError"

    def __init__(self, key: str, job_id: str):
        super().__init__(
            f"Idempotency-Key {key!r} was used for job {job_id!r} with a different request body",
            {"idempotency_key": key, "job_id": job_id},
        )


class NoInstanceFits(ControlPlaneError):
    """The planner found no instance type that fits memory, deadline and cost limit."""

    status = 400
    code = "BadRequestError"

    def __init__(self, reasons: dict[str, str]):
        super().__init__("no instance type fits this job", {"rejected": reasons})


class CapacityUnavailable(ControlPlaneError):
    """Every launch option (spot and on-demand, every candidate) was refused by EC2."""

    status = 503
    code = "ServiceUnavailableError"

    def __init__(self, tried: list[str]):
        super().__init__("no EC2 capacity for any candidate: " + ", ".join(tried), {"tried": tried})


class ConcurrentUpdate(ControlPlaneError):
    """A conditional write kept losing to concurrent writers (retry the event)."""

    status = 409
    code = "ConflictError"


class AwsError(ControlPlaneError):
    """An AWS call failed in a way the domain cannot interpret (retry or alert)."""

    status = 502
    code = "BadGatewayError"


class Skip(Exception):
    """A known no-op: acknowledge the event, log ``reason``, change nothing."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def to_response(err: ControlPlaneError):
    """The one mapping from a domain error to the HTTP response a client sees."""
    from chalice import Response

    body = {"Code": err.code, "Message": err.message}
    body.update(err.details)
    return Response(body=body, status_code=err.status, headers={"Content-Type": "application/json"})
