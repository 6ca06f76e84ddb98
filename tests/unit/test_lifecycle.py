"""Lifecycle actions as pure decisions: parsing the EventBridge shapes Auto Scaling documents,
duplicates and test notifications as ``Skip``, the warm-up limit, reconciliation with the group."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from chalicelib.errors import Skip
from chalicelib.lifecycle import (
    Complete,
    Forget,
    InstanceRecord,
    MalformedLifecycleEvent,
    Put,
    decide_launch,
    decide_terminate,
    parse_lifecycle_event,
    sweep,
)
from chalicelib.scaling_settings import ScalingSettings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "events"
S = ScalingSettings(stage="dev", asg_name="nlpfleet-dev-inference", warmup_limit_s=600, drain_limit_s=300)


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def test_parses_the_documented_launch_and_terminate_shapes():
    launch = parse_lifecycle_event(fixture("autoscaling_launch_lifecycle_action.json"))
    assert (launch.kind, launch.hook_name, launch.instance_id) == (
        "launch",
        "nlpfleet-warmup",
        "i-1234567890abcdef0",
    )
    term = parse_lifecycle_event(fixture("autoscaling_terminate_lifecycle_action.json"))
    assert term.kind == "terminate" and term.token.startswith("9765")


def test_test_notification_is_a_skip_not_an_error():
    with pytest.raises(Skip, match="TEST_NOTIFICATION"):
        parse_lifecycle_event(fixture("autoscaling_test_notification.json"))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.pop("detail"),
        lambda e: e["detail"].pop("LifecycleActionToken"),
        lambda e: e["detail"].update(LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING"),
        lambda e: e.update({"detail-type": "EC2 Instance Launch Successful"}),
        lambda e: e.update(time="yesterday"),
    ],
)
def test_malformed_events_are_refused(mutate):
    ev = copy.deepcopy(fixture("autoscaling_launch_lifecycle_action.json"))
    mutate(ev)
    with pytest.raises(MalformedLifecycleEvent):
        parse_lifecycle_event(ev)


def test_launch_then_duplicate_then_redelivery_after_abandon():
    a = parse_lifecycle_event(fixture("autoscaling_launch_lifecycle_action.json"))
    (put,) = decide_launch(a, None, S, a.time_s + 5)
    assert isinstance(put, Put) and put.record.state == "warming" and put.expected_state is None
    assert put.record.deadline_s == a.time_s + 600
    with pytest.raises(Skip):
        decide_launch(a, put.record, S, a.time_s + 6)
    with pytest.raises(Skip):  # already abandoned by the sweep: a late duplicate changes nothing
        decide_launch(
            a, InstanceRecord(a.instance_id, a.asg_name, "abandoned", token="other"), S, a.time_s + 700
        )


def test_terminate_marks_draining_once():
    a = parse_lifecycle_event(fixture("autoscaling_terminate_lifecycle_action.json"))
    in_service = InstanceRecord(a.instance_id, a.asg_name, "in_service")
    (put,) = decide_terminate(a, in_service, S, a.time_s + 1)
    assert put.record.state == "draining" and put.expected_state == "in_service"
    with pytest.raises(Skip):
        decide_terminate(a, put.record, S, a.time_s + 2)


def test_sweep_abandons_only_overdue_warmups_and_forgets_gone_instances():
    recs = [
        InstanceRecord("i-late", "g", "warming", "h", "t1", 0.0, 600.0),
        InstanceRecord("i-fine", "g", "warming", "h", "t2", 500.0, 1100.0),
        InstanceRecord("i-up", "g", "warming", "h", "t3", 0.0, 600.0),
        InstanceRecord("i-gone", "g", "draining", "h", "t4", 0.0, 300.0),
    ]
    live = {"i-late": "Pending:Wait", "i-fine": "Pending:Wait", "i-up": "InService"}
    actions = sweep(recs, live, S, now=700.0)
    assert Complete("g", "h", "i-late", "t1", "ABANDON") in actions
    assert Forget("i-gone") in actions
    assert [a.record.state for a in actions if isinstance(a, Put)] == ["abandoned", "in_service"]
    assert not any(getattr(a, "instance_id", None) == "i-fine" for a in actions if isinstance(a, Complete))
