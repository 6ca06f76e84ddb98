"""EventBridge events the control plane reacts to: the envelope first, then a typed detail.

``parse_event(raw)`` checks the envelope (``source``, ``detail-type``, ``detail``) and
dispatches to one parser per kind. Each returns a frozen dataclass, or raises ``Skip`` for a
known no-op (an S3 folder marker, a sidecar, an EC2 state that moves nothing), or
``MalformedEvent`` for an event that does not look like what AWS documents (logged and
dropped: redelivery cannot fix it). Sample payloads live in ``tests/fixtures/events/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from chalicelib.errors import Skip


class MalformedEvent(ValueError):
    pass


@dataclass(frozen=True)
class Envelope:
    event_id: str
    source: str
    detail_type: str
    time: str
    region: str
    detail: dict


@dataclass(frozen=True)
class InstanceStateChange:
    """``aws.ec2`` / ``EC2 Instance State-change Notification``::

    {"source": "aws.ec2", "detail-type": "EC2 Instance State-change Notification",
     "detail": {"instance-id": "i-0123456789abcdef0", "state": "terminated"}}
    """

    instance_id: str
    state: str
    time: str


@dataclass(frozen=True)
class SpotInterruption:
    """``aws.ec2`` / ``EC2 Spot Instance Interruption Warning``::

    {"source": "aws.ec2", "detail-type": "EC2 Spot Instance Interruption Warning",
     "detail": {"instance-id": "i-0123456789abcdef0", "instance-action": "terminate"}}
    """

    instance_id: str
    action: str
    time: str


@dataclass(frozen=True)
class ObjectCreated:
    """``aws.s3`` / ``Object Created`` (bucket with EventBridge notifications on)::

    {"source": "aws.s3", "detail-type": "Object Created",
     "detail": {"bucket": {"name": "nlpfleet-data"},
                "object": {"key": "datasets/banking77.csv", "size": 123, "etag": "…",
                           "version-id": "…", "sequencer": "0064D3901D00059242"}}}

    ``kind`` is ``dataset`` (under ``datasets/``) or ``manifest``
    (``models/<name>/<version>/manifest.json``, with ``model_name``/``model_version``).
    """

    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None
    sequencer: str
    time: str
    kind: str
    model_name: str | None = None
    model_version: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def identity(self) -> str:
        """What makes one object version: the version id on a versioned bucket, else the
        sequencer S3 assigns to each PUT (the same on every redelivery of that event)."""
        return self.version_id or f"seq:{self.sequencer or self.etag}"


EC2_STATE = "EC2 Instance State-change Notification"
SPOT_WARNING = "EC2 Spot Instance Interruption Warning"
OBJECT_CREATED = "Object Created"
SIDECAR_SUFFIX = ".job.json"
# A held-out split uploaded beside its training file (``datasets/banking77/dev.csv``) is read by
# the job whose spec names it (``eval_uri``); it must not start a second job of its own.
HELD_OUT_STEMS = frozenset({"dev", "val", "valid", "validation", "eval", "test", "heldout"})
# What the workers read (training/data.py, nlpfleet/jobs_preprocess.py); anything else beside a
# dataset (a README, a label list) would only launch an instance that fails on it.
DATA_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".json")
_MANIFEST_RE = re.compile(
    r"^models/([a-z0-9][a-z0-9._-]{0,63})/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/manifest\.json$"
)


def parse_envelope(raw: object) -> Envelope:
    if not isinstance(raw, dict):
        raise MalformedEvent("event is not a JSON object")
    missing = [k for k in ("source", "detail-type", "detail") if k not in raw]
    if missing:
        raise MalformedEvent(f"event lacks {', '.join(missing)}")
    if not isinstance(raw["detail"], dict):
        raise MalformedEvent("event detail is not an object")
    return Envelope(
        event_id=str(raw.get("id", "")),
        source=str(raw["source"]),
        detail_type=str(raw["detail-type"]),
        time=str(raw.get("time", "")),
        region=str(raw.get("region", "")),
        detail=raw["detail"],
    )


def _instance_id(d: dict) -> str:
    iid = d.get("instance-id")
    if not isinstance(iid, str) or not iid.startswith("i-"):
        raise MalformedEvent(f"detail.instance-id is not an instance id: {iid!r}")
    return iid


def parse_ec2(env: Envelope) -> InstanceStateChange | SpotInterruption:
    d = env.detail
    if env.detail_type == EC2_STATE:
        state = d.get("state")
        if not isinstance(state, str):
            raise MalformedEvent("detail.state missing")
        return InstanceStateChange(_instance_id(d), state, env.time)
    if env.detail_type == SPOT_WARNING:
        return SpotInterruption(_instance_id(d), str(d.get("instance-action", "terminate")), env.time)
    raise Skip(f"EC2 event {env.detail_type!r} is not handled here")


def parse_s3(env: Envelope) -> ObjectCreated:
    if env.detail_type != OBJECT_CREATED:
        raise Skip(f"S3 event {env.detail_type!r} is not handled here")
    d = env.detail
    bucket = (d.get("bucket") or {}).get("name")
    obj = d.get("object") or {}
    key = obj.get("key")
    if not isinstance(bucket, str) or not isinstance(key, str) or not key:
        raise MalformedEvent("detail.bucket.name or detail.object.key missing")
    size = obj.get("size", 0)
    common = dict(
        bucket=bucket,
        key=key,
        size=int(size) if isinstance(size, int | float) else 0,
        etag=str(obj.get("etag", "")),
        version_id=obj.get("version-id") or None,
        sequencer=str(obj.get("sequencer", "")),
        time=env.time,
    )
    if key.startswith("datasets/"):
        if key.endswith("/"):
            raise Skip(f"{key} is a folder marker")
        if key.endswith(SIDECAR_SUFFIX):
            raise Skip(f"{key} is a job sidecar: it is read when its dataset lands (upload it first)")
        if common["size"] == 0:
            raise Skip(f"{key} is empty")
        name = key.rsplit("/", 1)[-1].lower()
        if not name.endswith(DATA_SUFFIXES):
            raise Skip(f"{key} is not a dataset file (expected {', '.join(DATA_SUFFIXES)}): it starts no job")
        stem = name.split(".", 1)[0]
        if stem in HELD_OUT_STEMS:
            raise Skip(
                f"{key} is a held-out split ({stem}): it starts no job; name it in the training "
                "file's job spec as eval_uri"
            )
        return ObjectCreated(kind="dataset", **common)
    m = _MANIFEST_RE.match(key)
    if m:
        return ObjectCreated(kind="manifest", model_name=m.group(1), model_version=m.group(2), **common)
    if key.startswith("models/"):
        raise Skip(f"{key} is an artifact file; only manifest.json triggers a rollout")
    raise Skip(f"{key} is outside datasets/ and models/")


def parse_event(raw: object) -> InstanceStateChange | SpotInterruption | ObjectCreated:
    """Envelope, then the typed detail for its source."""
    env = parse_envelope(raw)
    if env.source == "aws.ec2":
        return parse_ec2(env)
    if env.source == "aws.s3":
        return parse_s3(env)
    raise Skip(f"source {env.source!r} is not handled here")
