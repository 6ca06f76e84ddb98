"""Lifecycle hooks end to end with moto: the documented Auto Scaling semantics the local stand-in
adds (``localstack.asg_lifecycle``), and the control plane's launch / terminate handlers through
``chalice.test.Client``, including duplicated deliveries, Auto Scaling's test notification and
warm-ups that run out of time."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from chalicelib.autoscaling_bp import ScalingAdapters, handle_lifecycle, handle_scale
from chalicelib.scaling_settings import ScalingSettings
from localstack.asg_lifecycle import AsgLifecycle

REGION = "us-east-1"
GROUP = "nlpfleet-dev-inference"
TABLE = "nlpfleet-dev-scaling"
WARM, DRAIN = "nlpfleet-warmup", "nlpfleet-drain"
REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "events"


class Clock:
    def __init__(self, t: float = 1_790_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_group(asg, ec2, dynamodb, desired=0, warm_timeout=300, drain_timeout=600):
    ec2.create_launch_template(
        LaunchTemplateName="nlpfleet-dev-inference",
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "g4dn.xlarge"},
    )
    asg.create_auto_scaling_group(
        AutoScalingGroupName=GROUP,
        LaunchTemplate={"LaunchTemplateName": "nlpfleet-dev-inference"},
        MinSize=0,
        MaxSize=20,
        DesiredCapacity=desired,
        AvailabilityZones=[f"{REGION}a"],
    )
    asg.put_lifecycle_hook(
        AutoScalingGroupName=GROUP,
        LifecycleHookName=WARM,
        LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
        HeartbeatTimeout=warm_timeout,
        DefaultResult="ABANDON",
    )
    asg.put_lifecycle_hook(
        AutoScalingGroupName=GROUP,
        LifecycleHookName=DRAIN,
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=drain_timeout,
        DefaultResult="CONTINUE",
    )
    dynamodb.create_table(
        TableName=TABLE,
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )


@pytest.fixture
def env(monkeypatch):
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "STAGE": "dev",
        "INFERENCE_ASG_NAME": GROUP,
        "SCALING_STATE_TABLE": TABLE,
        "SCALING_WARMUP_LIMIT_S": "900",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def aws(env):
    clock = Clock()
    with mock_aws(), AsgLifecycle(clock=clock) as lc:
        asg = boto3.client("autoscaling", region_name=REGION)
        make_group(asg, boto3.client("ec2", region_name=REGION), boto3.client("dynamodb", region_name=REGION))
        publish_model()
        yield {"asg": asg, "lc": lc, "clock": clock}


ACTIVE_MODEL_PARAM = "/nlpfleet/dev/active-model"


def publish_model():
    """A model is active (what the rollout writes): the fleet may have instances."""
    boto3.client("ssm", region_name=REGION).put_parameter(
        Name=ACTIVE_MODEL_PARAM,
        Value=json.dumps({"name": "banking77", "version": "1", "uri": "s3://b/models/banking77/1/"}),
        Type="String",
        Overwrite=True,
    )


def states(asg) -> dict[str, str]:
    g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
    return {i["InstanceId"]: i["LifecycleState"] for i in g["Instances"]}


def desired(asg) -> int:
    return asg.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0][
        "DesiredCapacity"
    ]


def complete(asg, hook, instance_id, result="CONTINUE"):
    asg.complete_lifecycle_action(
        AutoScalingGroupName=GROUP,
        LifecycleHookName=hook,
        InstanceId=instance_id,
        LifecycleActionResult=result,
    )


# ------------------------------------------------------------ the stand-in's Auto Scaling semantics


def test_launch_waits_for_the_agent_then_continue_puts_it_in_service(aws):
    asg, lc = aws["asg"], aws["lc"]
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=2)
    s = states(asg)
    assert sorted(s.values()) == ["Pending:Wait", "Pending:Wait"]
    launch_events = [e for e in lc.events if e["detail-type"] == "EC2 Instance-launch Lifecycle Action"]
    assert {e["detail"]["EC2InstanceId"] for e in launch_events} == set(s)
    assert all(e["detail"]["LifecycleHookName"] == WARM for e in launch_events)
    first = next(iter(s))
    complete(asg, WARM, first)
    assert states(asg)[first] == "InService"
    assert lc.target_lifecycle_state(first) == "InService"


def test_abandoned_launch_is_terminated_and_replaced(aws):
    asg = aws["asg"]
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    (broken,) = states(asg)
    complete(asg, WARM, broken, "ABANDON")
    s = states(asg)
    assert broken not in s and list(s.values()) == ["Pending:Wait"]
    assert desired(asg) == 1


def test_heartbeat_timeout_applies_the_default_result_and_heartbeats_extend_it(aws):
    asg, clock = aws["asg"], aws["clock"]
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=2)
    slow, silent = list(states(asg))
    clock.t += 250
    asg.record_lifecycle_action_heartbeat(AutoScalingGroupName=GROUP, LifecycleHookName=WARM, InstanceId=slow)
    clock.t += 100  # 350 s after launch: past the 300 s heartbeat timeout for the silent one only
    s = states(asg)
    assert s[slow] == "Pending:Wait"
    assert silent not in s  # ABANDON (the hook's default) terminated it ...
    assert len(s) == 2  # ... and the group launched a replacement
    clock.t += 201  # 300 s after the last heartbeat
    assert slow not in states(asg)


def test_heartbeats_cannot_keep_an_instance_waiting_past_the_global_timeout(aws):
    asg, clock, lc = aws["asg"], aws["clock"], aws["lc"]
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    (stuck,) = states(asg)
    start = clock.t
    for _ in range(102):  # 100 x heartbeat timeout (30000 s) is the cap for a 300 s hook
        clock.t += 299
        if stuck not in states(asg):
            break
        asg.record_lifecycle_action_heartbeat(
            AutoScalingGroupName=GROUP, LifecycleHookName=WARM, InstanceId=stuck
        )
    assert stuck not in states(asg)
    assert 30000 <= clock.t - start < 30000 + 299
    assert len(lc.events) == 2  # its launch action, then its replacement's


def test_scale_in_waits_for_drain_and_completing_twice_is_an_error(aws):
    asg = aws["asg"]
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=2)
    for i in states(asg):
        complete(asg, WARM, i)
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    s = states(asg)
    draining = [i for i, st in s.items() if st == "Terminating:Wait"]
    assert len(draining) == 1 and len(s) == 2  # still there: it drains before it goes
    assert aws["lc"].target_lifecycle_state(draining[0]) == "Terminated"
    complete(asg, DRAIN, draining[0])
    assert draining[0] not in states(asg) and desired(asg) == 1
    with pytest.raises(ClientError, match="No active Lifecycle Action"):
        complete(asg, DRAIN, draining[0])


def test_terminate_in_group_runs_the_terminate_hook(aws):
    asg = aws["asg"]
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    (i,) = states(asg)
    complete(asg, WARM, i)
    asg.terminate_instance_in_auto_scaling_group(InstanceId=i, ShouldDecrementDesiredCapacity=True)
    assert states(asg) == {i: "Terminating:Wait"} and desired(asg) == 0


def test_works_against_a_moto_server_over_http(env):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    with AsgLifecycle() as lc:
        server.start()
        try:
            host, port = server.get_host_and_port()
            url = f"http://{host}:{port}"
            asg = boto3.client("autoscaling", region_name=REGION, endpoint_url=url)
            make_group(
                asg,
                boto3.client("ec2", region_name=REGION, endpoint_url=url),
                boto3.client("dynamodb", region_name=REGION, endpoint_url=url),
            )
            asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
            (i,) = states(asg)
            assert states(asg)[i] == "Pending:Wait" and lc.waiting_for(i) is not None
            complete(asg, WARM, i)
            assert states(asg)[i] == "InService"
        finally:
            server.stop()


# ----------------------------------------------------------- the control plane's lifecycle handlers


@pytest.fixture
def client(aws):
    import sys

    from chalice.test import Client

    sys.path.insert(0, str(REPO))
    import app as app_module

    with Client(app_module.app, stage_name="dev", project_dir=str(REPO)) as c:
        yield c


@pytest.fixture
def decision_log():
    """The JSON lines the blueprint logs (its logger is a child of the app's, which does not
    propagate to the root logger that caplog watches)."""
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, rec):
            lines.append(json.loads(rec.getMessage()))

    handler = Collect()
    logger = logging.getLogger("nlpfleet.autoscaling")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def record(instance_id):
    ddb = boto3.client("dynamodb", region_name=REGION)
    item = ddb.get_item(TableName=TABLE, Key={"pk": {"S": f"instance#{instance_id}"}}).get("Item")
    return None if item is None else json.loads(item["record"]["S"])


def real_time_event(aws, kind: str, instance_id: str) -> dict:
    """The event the stand-in emitted for ``instance_id``, stamped with wall-clock time (the
    Chalice handlers read the real clock)."""
    import time

    detail_type = f"EC2 Instance-{kind} Lifecycle Action"
    ev = next(
        e
        for e in reversed(aws["lc"].events)
        if e["detail-type"] == detail_type and e["detail"]["EC2InstanceId"] == instance_id
    )
    ev = copy.deepcopy(ev)
    ev["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return ev


def test_launch_action_is_recorded_once_even_when_delivered_twice(aws, client, decision_log):
    asg = aws["asg"]
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    (i,) = states(asg)
    ev = real_time_event(aws, "launch", i)
    first = client.lambda_.invoke("on_instance_launch_action", ev).payload
    assert first["event"] == "lifecycle_action" and record(i)["state"] == "warming"
    again = client.lambda_.invoke("on_instance_launch_action", ev).payload
    assert again["event"] == "lifecycle_skipped" and "duplicate" in again["reason"]
    assert record(i)["state"] == "warming" and states(asg)[i] == "Pending:Wait"
    assert [d["event"] for d in decision_log] == ["lifecycle_action", "lifecycle_skipped"]  # once each


def test_test_notification_and_other_groups_are_acknowledged_not_failed(aws, client):
    ev = json.loads((FIXTURES / "autoscaling_test_notification.json").read_text())
    assert client.lambda_.invoke("on_instance_launch_action", ev).payload["event"] == "lifecycle_skipped"
    other = json.loads((FIXTURES / "autoscaling_launch_lifecycle_action.json").read_text())
    other["detail"]["AutoScalingGroupName"] = "someone-elses-group"
    out = client.lambda_.invoke("on_instance_launch_action", other).payload
    assert out["event"] == "lifecycle_skipped" and "another group" in out["reason"]


def test_warm_up_past_the_limit_is_abandoned_and_replaced(aws):
    """The agent died mid warm-up: the next scaling run abandons it; Auto Scaling replaces it."""
    asg, clock = aws["asg"], aws["clock"]
    s = ScalingSettings.from_env(
        {"INFERENCE_ASG_NAME": GROUP, "SCALING_STATE_TABLE": TABLE, "SCALING_WARMUP_LIMIT_S": "120"}
    )
    ad = ScalingAdapters.from_settings(s)
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    (stuck,) = states(asg)
    ev = aws["lc"].events[-1]
    assert handle_lifecycle(ev, s, ad, clock.t + 5)["event"] == "lifecycle_action"
    handle_scale(s, ad, clock.t + 60)  # within the limit: left alone
    assert states(asg)[stuck] == "Pending:Wait"
    out = handle_scale(s, ad, clock.t + 130)
    assert f"ABANDON {stuck}" in out["lifecycle"]
    now_states = states(asg)
    assert stuck not in now_states and list(now_states.values()) == ["Pending:Wait"]
    assert record(stuck)["state"] == "abandoned"
    # the agent wakes up late and tries to complete: Auto Scaling no longer waits on it
    assert ad.asg.complete(GROUP, WARM, stuck, "", "CONTINUE") is False


def test_launch_event_delivered_after_the_limit_is_abandoned_at_once(aws):
    asg, clock = aws["asg"], aws["clock"]
    s = ScalingSettings.from_env({"INFERENCE_ASG_NAME": GROUP, "SCALING_STATE_TABLE": TABLE})
    ad = ScalingAdapters.from_settings(s)
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    (late,) = states(asg)
    ev = aws["lc"].events[-1]
    clock.t += 100  # within the hook's 300 s, but the event reaches us 1000 s after it happened
    out = handle_lifecycle(ev, s, ad, clock.t + 900)
    assert f"ABANDON {late}" in out["done"] and late not in states(asg)


def test_terminate_action_marks_draining_and_the_policy_counts_it(aws, client):
    asg = aws["asg"]
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=2)
    for i in states(asg):
        complete(asg, WARM, i)
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=1)
    (leaving,) = [i for i, st in states(asg).items() if st == "Terminating:Wait"]
    ev = real_time_event(aws, "terminate", leaving)
    out = client.lambda_.invoke("on_instance_terminate_action", ev).payload
    assert out["event"] == "lifecycle_action" and record(leaving)["state"] == "draining"
    dup = client.lambda_.invoke("on_instance_terminate_action", ev).payload
    assert dup["event"] == "lifecycle_skipped"
    s = ScalingSettings.from_env({"INFERENCE_ASG_NAME": GROUP, "SCALING_STATE_TABLE": TABLE})
    decision = handle_scale(s, ScalingAdapters.from_settings(s), aws["clock"].t + 60)
    assert decision["fleet"]["draining"] == 1 and decision["fleet"]["in_service"] == 1
    # once the agent completes, the instance and its record go away
    complete(asg, DRAIN, leaving)
    handle_scale(s, ScalingAdapters.from_settings(s), aws["clock"].t + 120)
    assert record(leaving) is None
