"""Auto Scaling lifecycle actions of the inference fleet: parsing and pure decisions.

Instances join only when warm and leave only when drained. The instance agent does the work
(warm-up, drain) and completes its own lifecycle action; the control plane

* records each transition (``warming`` on launch, ``draining`` on terminate) in the scaling
  state table, so the policy counts draining capacity and ``GET /fleet`` can show it;
* abandons an instance whose warm-up exceeds ``warmup_limit_s`` (the agent hung or died
  before it could answer ABANDON itself): ``sweep`` runs with every scaling decision;
* acknowledges duplicates (EventBridge delivers at least once) and Auto Scaling's test
  notification with ``Skip``.

Nothing here does I/O: ``decide_*`` return the records to write and the actions to complete,
and the blueprint's handlers carry them out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from chalicelib.errors import Skip
from chalicelib.scaling_settings import ScalingSettings

LAUNCH_DETAIL_TYPE = "EC2 Instance-launch Lifecycle Action"
TERMINATE_DETAIL_TYPE = "EC2 Instance-terminate Lifecycle Action"
LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
TEST_NOTIFICATION = "autoscaling:TEST_NOTIFICATION"


class MalformedLifecycleEvent(ValueError):
    """The event does not look like what Auto Scaling documents (dropped: a retry cannot fix it)."""


@dataclass(frozen=True)
class LifecycleAction:
    """One lifecycle action as EventBridge delivers it::

    {"source": "aws.autoscaling", "detail-type": "EC2 Instance-launch Lifecycle Action",
     "id": "...", "time": "2026-11-26T10:00:00Z", "region": "us-east-1",
     "detail": {"LifecycleActionToken": "87654321-...", "AutoScalingGroupName": "nlpfleet-dev-inference",
                "LifecycleHookName": "nlpfleet-warmup", "EC2InstanceId": "i-1234567890abcdef0",
                "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
                "NotificationMetadata": "...", "Origin": "EC2", "Destination": "AutoScalingGroup"}}
    """

    kind: str  # "launch" | "terminate"
    asg_name: str
    hook_name: str
    instance_id: str
    token: str
    event_id: str
    time_s: float


def parse_lifecycle_event(raw: Mapping[str, Any]) -> LifecycleAction:
    """Envelope first, then the typed detail; ``Skip`` for Auto Scaling's test notification.

    >>> a = parse_lifecycle_event({"id": "e1", "time": "2026-11-26T10:00:00Z",
    ...     "detail-type": "EC2 Instance-launch Lifecycle Action", "source": "aws.autoscaling",
    ...     "detail": {"LifecycleActionToken": "t", "AutoScalingGroupName": "g",
    ...                "LifecycleHookName": "h", "EC2InstanceId": "i-1",
    ...                "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING"}})
    >>> (a.kind, a.instance_id, a.time_s)
    ('launch', 'i-1', 1795687200.0)
    """
    if not isinstance(raw, Mapping):
        raise MalformedLifecycleEvent("event is not an object")
    detail = raw.get("detail")
    if not isinstance(detail, Mapping):
        raise MalformedLifecycleEvent("event has no detail")
    if detail.get("Event") == TEST_NOTIFICATION or detail.get("LifecycleTransition") == TEST_NOTIFICATION:
        raise Skip("autoscaling:TEST_NOTIFICATION")
    detail_type = raw.get("detail-type")
    kinds = {LAUNCH_DETAIL_TYPE: ("launch", LAUNCHING), TERMINATE_DETAIL_TYPE: ("terminate", TERMINATING)}
    if detail_type not in kinds:
        raise MalformedLifecycleEvent(f"not a lifecycle action: {detail_type!r}")
    kind, transition = kinds[detail_type]
    if detail.get("LifecycleTransition") != transition:
        raise MalformedLifecycleEvent(f"{detail_type} with transition {detail.get('LifecycleTransition')!r}")
    missing = [
        k
        for k in ("LifecycleActionToken", "AutoScalingGroupName", "LifecycleHookName", "EC2InstanceId")
        if not isinstance(detail.get(k), str) or not detail.get(k)
    ]
    if missing:
        raise MalformedLifecycleEvent(f"detail lacks {', '.join(missing)}")
    try:
        time_s = datetime.fromisoformat(str(raw.get("time", "")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise MalformedLifecycleEvent(f"bad time {raw.get('time')!r}") from None
    return LifecycleAction(
        kind=kind,
        asg_name=detail["AutoScalingGroupName"],
        hook_name=detail["LifecycleHookName"],
        instance_id=detail["EC2InstanceId"],
        token=detail["LifecycleActionToken"],
        event_id=str(raw.get("id", "")),
        time_s=time_s,
    )


@dataclass(frozen=True)
class InstanceRecord:
    """What the control plane knows of one inference instance (one item in the state table)."""

    instance_id: str
    asg_name: str
    state: str  # warming | in_service | draining | abandoned
    hook_name: str = ""
    token: str = ""
    since_s: float = 0.0
    deadline_s: float | None = None

    def to_item(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "asg_name": self.asg_name,
            "state": self.state,
            "hook_name": self.hook_name,
            "token": self.token,
            "since_s": self.since_s,
            "deadline_s": self.deadline_s,
        }

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> InstanceRecord:
        deadline = item.get("deadline_s")
        return cls(
            instance_id=str(item["instance_id"]),
            asg_name=str(item.get("asg_name", "")),
            state=str(item["state"]),
            hook_name=str(item.get("hook_name", "")),
            token=str(item.get("token", "")),
            since_s=float(item.get("since_s", 0.0)),
            deadline_s=None if deadline is None else float(deadline),
        )


@dataclass(frozen=True)
class Complete:
    """Complete a lifecycle action (``CompleteLifecycleAction``)."""

    asg_name: str
    hook_name: str
    instance_id: str
    token: str
    result: str  # CONTINUE | ABANDON


@dataclass(frozen=True)
class Put:
    """Write an instance record (``expected_state`` = the state it must still have, or None for a
    new record: a conditional write, so two deliveries of one event cannot both win)."""

    record: InstanceRecord
    expected_state: str | None


@dataclass(frozen=True)
class Forget:
    instance_id: str


Action = Complete | Put | Forget


def decide_launch(
    action: LifecycleAction, record: InstanceRecord | None, s: ScalingSettings, now: float
) -> list[Action]:
    """Record the instance as warming, with the deadline by which the agent must have answered.

    >>> s = ScalingSettings(stage="t", asg_name="g", warmup_limit_s=600)
    >>> a = LifecycleAction("launch", "g", "h", "i-1", "tok", "e1", 1000.0)
    >>> decide_launch(a, None, s, now=1010.0)[0].record.deadline_s
    1600.0
    >>> decide_launch(a, InstanceRecord("i-1", "g", "warming", "h", "tok", 1000.0, 1600.0), s, 1010.0)
    Traceback (most recent call last):
    chalicelib.errors.Skip: duplicate launch action for i-1
    """
    if record is not None and (record.token == action.token or record.state != "warming"):
        raise Skip(f"duplicate launch action for {action.instance_id}")
    deadline = action.time_s + s.warmup_limit_s
    rec = InstanceRecord(
        action.instance_id,
        action.asg_name,
        "warming",
        action.hook_name,
        action.token,
        action.time_s,
        deadline,
    )
    if now >= deadline:  # delivered so late that warm-up has already run out
        return [
            Put(replace(rec, state="abandoned", deadline_s=None), None),
            Complete(action.asg_name, action.hook_name, action.instance_id, action.token, "ABANDON"),
        ]
    return [Put(rec, None if record is None else record.state)]


def decide_terminate(
    action: LifecycleAction, record: InstanceRecord | None, s: ScalingSettings, now: float
) -> list[Action]:
    """Mark the instance draining: the agent sees ``Terminated`` in IMDS and drains itself.

    >>> s = ScalingSettings(stage="t", asg_name="g")
    >>> a = LifecycleAction("terminate", "g", "h", "i-1", "tok", "e1", 1000.0)
    >>> [type(x).__name__ for x in decide_terminate(a, None, s, now=1001.0)]
    ['Put']
    """
    if record is not None and record.state == "draining" and record.token == action.token:
        raise Skip(f"duplicate terminate action for {action.instance_id}")
    rec = InstanceRecord(
        action.instance_id,
        action.asg_name,
        "draining",
        action.hook_name,
        action.token,
        action.time_s,
        action.time_s + s.drain_limit_s,
    )
    return [Put(rec, None if record is None else record.state)]


def sweep(
    records: Iterable[InstanceRecord], asg_states: Mapping[str, str], s: ScalingSettings, now: float
) -> list[Action]:
    """Reconcile records with what Auto Scaling reports and abandon stuck warm-ups.

    ``asg_states`` maps instance id -> lifecycle state from ``DescribeAutoScalingGroups``.

    >>> s = ScalingSettings(stage="t", asg_name="g")
    >>> r = InstanceRecord("i-1", "g", "warming", "h", "tok", 0.0, 900.0)
    >>> [type(a).__name__ for a in sweep([r], {"i-1": "Pending:Wait"}, s, now=901.0)]
    ['Put', 'Complete']
    >>> sweep([r], {"i-1": "InService"}, s, now=10.0)[0].record.state
    'in_service'
    """
    out: list[Action] = []
    for r in records:
        live = asg_states.get(r.instance_id)
        if live is None or live.startswith("Terminated"):
            out.append(Forget(r.instance_id))
        elif r.state == "warming" and live == "InService":
            out.append(Put(replace(r, state="in_service", since_s=now, deadline_s=None), "warming"))
        elif r.state == "warming" and r.deadline_s is not None and now >= r.deadline_s:
            out.append(Put(replace(r, state="abandoned", since_s=now, deadline_s=None), "warming"))
            out.append(Complete(r.asg_name, r.hook_name, r.instance_id, r.token, "ABANDON"))
    return out
