# ruff: noqa: F811  (pytest fixtures imported from test_autoscaling_lifecycle are used as parameters)
"""The per-minute scaling Lambda and the capacity-floor schedule end to end: metrics published the
way the instance agent publishes them (CloudWatch in moto), the decision through
``chalice.test.Client``, ``SetDesiredCapacity`` on the group, state kept between invocations."""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime

import boto3
import pytest
from test_autoscaling_lifecycle import GROUP, REGION, TABLE, aws, client, decision_log, env  # noqa: F401

from chalicelib.autoscaling_bp import ScalingAdapters, handle_capacity_floor, handle_scale
from chalicelib.scaling_settings import ScalingSettings

NS = "nlpfleet"
# a steady load of 6 instances' worth at the target: the policy adds its fixed headroom
# (SCALING_HEADROOM_MIN_INSTANCES; a steady load has no noise), see docs/autoscaling.md
SIZE_FOR_6 = math.ceil(6 + ScalingSettings.headroom_min_instances)


def publish(
    minutes_ago: range, per_instance_inflight: float, instances: int, throttled: float = 0.0, now=None
):
    """What ``instances`` agents publish for each minute (one datapoint per instance per metric)."""
    cw = boto3.client("cloudwatch", region_name=REGION)
    now_min = int(time.time() if now is None else now) // 60 * 60
    for ago in minutes_ago:
        ts = datetime.fromtimestamp(now_min - 60 * ago, UTC)
        dims = [{"Name": "AutoScalingGroupName", "Value": GROUP}]
        data = []
        for _ in range(instances):
            for name, value, unit in (
                ("RequestCount", 600.0, "Count"),
                ("ThrottledCount", throttled / instances, "Count"),
                ("InflightRequests", per_instance_inflight, "Count"),
                ("QueueDepth", 0.0, "Count"),
                ("LatencyP99", 0.1, "Seconds"),
            ):
                data.append(
                    {"MetricName": name, "Dimensions": dims, "Timestamp": ts, "Value": value, "Unit": unit}
                )
        for i in range(0, len(data), 20):
            cw.put_metric_data(Namespace=NS, MetricData=data[i : i + 20])


def in_service(asg, n):
    asg.set_desired_capacity(AutoScalingGroupName=GROUP, DesiredCapacity=n)
    for i in asg.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0][
        "Instances"
    ]:
        if i["LifecycleState"] == "Pending:Wait":
            asg.complete_lifecycle_action(
                AutoScalingGroupName=GROUP,
                LifecycleHookName="nlpfleet-warmup",
                InstanceId=i["InstanceId"],
                LifecycleActionResult="CONTINUE",
            )


def group(asg):
    return asg.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]


def scheduled_event(client):
    return client.events.generate_cw_event("aws.events", "Scheduled Event", {}, [], region=REGION)


def test_load_above_target_scales_out_and_pending_capacity_is_not_ordered_twice(aws, client, decision_log):
    asg = aws["asg"]
    in_service(asg, 2)
    publish(range(2, 12), per_instance_inflight=24.0, instances=2)  # 3x the target of 8
    out = client.lambda_.invoke("scale_inference_fleet", scheduled_event(client)).payload
    assert out["event"] == "scaling_decision" and out["previous_desired"] == 2
    assert out["desired"] == SIZE_FOR_6 and "scale-out" in out["reason"] and out["panic"]
    g = group(asg)
    assert g["DesiredCapacity"] == SIZE_FOR_6
    assert sum(i["LifecycleState"] == "Pending:Wait" for i in g["Instances"]) == SIZE_FOR_6 - 2
    # a minute later the same (delayed) metrics: the booting instances count, nothing more is ordered
    again = client.lambda_.invoke("scale_inference_fleet", scheduled_event(client)).payload
    assert again["desired"] == SIZE_FOR_6 and group(asg)["DesiredCapacity"] == SIZE_FOR_6
    assert [d["event"] for d in decision_log] == ["scaling_decision", "scaling_decision"]  # logged once each
    logged = decision_log[0]
    assert logged["fleet"]["in_service"] == 2 and logged["latest_metric"]["inflight"] == 48.0


def test_policy_state_survives_between_invocations(aws, client):
    asg = aws["asg"]
    in_service(asg, 2)
    publish(range(2, 6), per_instance_inflight=8.0, instances=2)
    client.lambda_.invoke("scale_inference_fleet", scheduled_event(client))
    ddb = boto3.client("dynamodb", region_name=REGION)
    item = ddb.get_item(TableName=TABLE, Key={"pk": {"S": f"policy#{GROUP}"}})["Item"]
    state = json.loads(item["state"]["S"])
    assert item["version"]["N"] == "1" and state["recent"] and state["seasonal"]
    client.lambda_.invoke("scale_inference_fleet", scheduled_event(client))
    item = ddb.get_item(TableName=TABLE, Key={"pk": {"S": f"policy#{GROUP}"}})["Item"]
    assert item["version"]["N"] == "2" and len(json.loads(item["state"]["S"])["recent"]) == 2


def test_low_load_scales_in_slowly_not_at_once(aws):
    asg = aws["asg"]
    in_service(asg, 10)
    s = ScalingSettings.from_env({"INFERENCE_ASG_NAME": GROUP, "SCALING_STATE_TABLE": TABLE})
    ad = ScalingAdapters.from_settings(s)
    now = time.time()
    publish(range(2, 30), per_instance_inflight=0.8, instances=10)  # needs 1 instance
    first = handle_scale(s, ad, now)
    assert first["desired"] == 9  # at most 10 % of the fleet per decision
    sizes = [handle_scale(s, ad, now + 60 * k)["desired"] for k in range(1, 4)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] >= 6


def test_dry_run_decides_and_logs_but_does_not_touch_the_group(aws):
    asg = aws["asg"]
    in_service(asg, 2)
    publish(range(2, 8), per_instance_inflight=24.0, instances=2)
    s = ScalingSettings.from_env(
        {"INFERENCE_ASG_NAME": GROUP, "SCALING_STATE_TABLE": TABLE, "DRY_RUN": "true"}
    )
    out = handle_scale(s, ScalingAdapters.from_settings(s), time.time())
    assert out["desired"] == SIZE_FOR_6 and "would have" in out["dry_run"]
    assert group(asg)["DesiredCapacity"] == 2


def test_a_shorter_metrics_window_forgets_an_old_burst(aws):
    """SCALING_METRICS_WINDOW_S bounds what each decision reads: a bursty half hour that has left a
    short window no longer inflates the noise part of the headroom (a compressed replay's day)."""
    asg = aws["asg"]
    in_service(asg, 4)
    publish(range(2, 7), per_instance_inflight=4.0, instances=2)  # the last 5 minutes: 1 instance, steady
    for ago in range(7, 30):  # before them, a bursty stretch: 1 and 5 instances' worth in turn
        publish(range(ago, ago + 1), per_instance_inflight=4.0 if ago % 2 else 20.0, instances=2)
    base = {
        "INFERENCE_ASG_NAME": GROUP,
        "SCALING_STATE_TABLE": TABLE,
        "DRY_RUN": "true",
        "SCALING_LEVEL_WINDOW_S": "300",
        "SCALING_LEVEL_SHORT_WINDOW_S": "0",
    }
    now = time.time()
    short = ScalingSettings.from_env({**base, "SCALING_METRICS_WINDOW_S": "300"})
    out = handle_scale(short, ScalingAdapters.from_settings(short), now)
    assert out["metrics_minutes"] <= 5 and out["noise"] == 0.0 and out["desired"] < 4
    default = ScalingSettings.from_env(base)
    out = handle_scale(default, ScalingAdapters.from_settings(default), now)
    assert out["metrics_minutes"] >= 25 and out["noise"] > 1.0 and out["desired"] > 4


@pytest.mark.parametrize(
    ("local_time", "expected_min"),
    [("2026-11-23T09:00:00-05:00", 4), ("2026-11-23T23:00:00-05:00", 1), ("2026-11-28T09:00:00-05:00", 2)],
)
def test_capacity_floor_follows_business_hours_in_the_stage_time_zone(aws, local_time, expected_min):
    asg = aws["asg"]
    in_service(asg, 1)
    s = ScalingSettings.from_env(
        {
            "INFERENCE_ASG_NAME": GROUP,
            "SCALING_STATE_TABLE": TABLE,
            "SCALING_FLOOR_SCHEDULE": "mon-fri 08:00-19:00=4; sat-sun 08:00-19:00=2",
            "SCALING_TIME_ZONE": "America/New_York",
        }
    )
    now = datetime.fromisoformat(local_time).timestamp()
    out = handle_capacity_floor(s, ScalingAdapters.from_settings(s), now)
    g = group(asg)
    assert g["MinSize"] == expected_min and g["DesiredCapacity"] >= expected_min
    assert out["min_size"] == expected_min


def test_floor_schedule_runs_from_the_cron_rule(aws, client, monkeypatch):
    monkeypatch.setenv("SCALING_FLOOR_SCHEDULE", "mon-sun 00:00-24:00=3")
    out = client.lambda_.invoke("apply_capacity_floor", scheduled_event(client)).payload
    assert out["action"] == "updated" and group(aws["asg"])["MinSize"] == 3
    assert group(aws["asg"])["DesiredCapacity"] == 3


def at(seconds: float) -> dict:
    """A Scheduled Event as EventBridge stamps it (``time``: when the schedule fired)."""
    return {
        "version": "0",
        "id": "8d8d3a9c-2ad3-4a6f-8c1a-000000000001",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": REGION,
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/scale"],
        "detail": {},
    }


def test_the_decision_follows_the_schedule_time_of_a_clock_ahead_of_this_machine(aws, client):
    """A stand-in whose clock runs ahead (the local stack's) stamps its schedule and the agents'
    datapoints on that clock: the decision reads the minutes before the event's ``time``."""
    asg = aws["asg"]
    in_service(asg, 2)
    ahead = time.time() + 6 * 3600
    publish(range(2, 12), per_instance_inflight=24.0, instances=2, now=ahead)  # 3x the target
    out = client.lambda_.invoke("scale_inference_fleet", at(ahead)).payload
    assert out["metrics_minutes"] == 10 and out["desired"] == SIZE_FOR_6 and "scale-out" in out["reason"]
    # an hour later on that clock, those minutes have left the policy's half-hour window
    later = client.lambda_.invoke("scale_inference_fleet", at(ahead + 3600)).payload
    assert later["metrics_minutes"] == 0


def test_a_late_delivery_decides_on_the_present_not_on_the_schedule_time(aws, client):
    asg = aws["asg"]
    in_service(asg, 2)
    publish(range(2, 12), per_instance_inflight=24.0, instances=2)  # now, on the wall clock
    out = client.lambda_.invoke("scale_inference_fleet", at(time.time() - 2 * 3600)).payload
    assert out["metrics_minutes"] == 10 and out["desired"] == SIZE_FOR_6


def test_no_instance_is_launched_before_a_model_is_active(aws, client):
    """With a floor of one (SCALING_MIN_SIZE, the group's MinSize, the schedule) and no active
    model, the fleet stays at zero: an instance could only warm up, fail to load a model, be
    abandoned and replaced. The first rollout lifts the hold."""
    asg = aws["asg"]
    boto3.client("ssm", region_name=REGION).delete_parameter(Name="/nlpfleet/dev/active-model")
    asg.update_auto_scaling_group(AutoScalingGroupName=GROUP, MinSize=1, DesiredCapacity=1)
    env = {
        "INFERENCE_ASG_NAME": GROUP,
        "SCALING_STATE_TABLE": TABLE,
        "SCALING_MIN_SIZE": "1",
        "SCALING_FLOOR_SCHEDULE": "mon-sun 00:00-24:00=2",
    }
    s = ScalingSettings.from_env(env)
    out = handle_scale(s, ScalingAdapters.from_settings(s), time.time())
    assert out["desired"] == 0 and "no active model" in out["reason"]
    g = group(asg)
    assert g["DesiredCapacity"] == 0 and g["MinSize"] == 0
    floor = handle_capacity_floor(s, ScalingAdapters.from_settings(s), time.time())
    assert floor["min_size"] == 0 and "no active model" in floor["reason"]
    assert group(asg)["MinSize"] == 0 and group(asg)["DesiredCapacity"] == 0
    # the model is published: the floors apply again
    from test_autoscaling_lifecycle import publish_model

    publish_model()
    again = handle_scale(s, ScalingAdapters.from_settings(s), time.time())
    assert again["desired"] == 2 and "no active model" not in again["reason"]


def test_a_serving_fleet_is_not_stopped_when_the_model_parameter_goes_missing(aws):
    asg = aws["asg"]
    in_service(asg, 2)
    publish(range(2, 12), per_instance_inflight=8.0, instances=2)
    boto3.client("ssm", region_name=REGION).delete_parameter(Name="/nlpfleet/dev/active-model")
    s = ScalingSettings.from_env({"INFERENCE_ASG_NAME": GROUP, "SCALING_STATE_TABLE": TABLE})
    out = handle_scale(s, ScalingAdapters.from_settings(s), time.time())
    assert out["desired"] >= 2 and "no active model" not in out["reason"]
    floor = handle_capacity_floor(s, ScalingAdapters.from_settings(s), time.time())
    assert "reason" not in floor and group(asg)["DesiredCapacity"] >= 2


def test_a_lowered_floor_releases_min_size_within_a_minute(aws):
    """The capacity-floor schedule raised MinSize to 3; the floor is now 1 (the night, or
    SCALING_MIN_SIZE lowered): the next scaling minute lowers MinSize, so the fleet can scale in
    without waiting for the next floor tick."""
    asg = aws["asg"]
    asg.update_auto_scaling_group(AutoScalingGroupName=GROUP, MinSize=3, DesiredCapacity=3)
    in_service(asg, 3)
    publish(range(2, 12), per_instance_inflight=0.5, instances=3)
    env = {"INFERENCE_ASG_NAME": GROUP, "SCALING_STATE_TABLE": TABLE, "SCALING_MIN_SIZE": "1"}
    s = ScalingSettings.from_env(env)
    out = handle_scale(s, ScalingAdapters.from_settings(s), time.time())
    assert out["min_size"] == {"from": 3, "to": 1}
    assert group(asg)["MinSize"] == 1 and group(asg)["DesiredCapacity"] == out["desired"]
    # a floor that still holds is left alone
    s3 = ScalingSettings.from_env({**env, "SCALING_MIN_SIZE": "3"})
    asg.update_auto_scaling_group(AutoScalingGroupName=GROUP, MinSize=3, DesiredCapacity=3)
    again = handle_scale(s3, ScalingAdapters.from_settings(s3), time.time())
    assert "min_size" not in again and group(asg)["MinSize"] == 3 and again["desired"] >= 3
