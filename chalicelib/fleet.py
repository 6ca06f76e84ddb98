"""Thin boto3 adapters for the autoscaler: the ASG, the fleet's CloudWatch metrics, the scaling
state table. Plain data in and out; ``ClientError`` becomes ``AwsError`` (or ``ConcurrentUpdate``
for a lost conditional write), so handlers never see botocore exceptions.

Metrics contract (the instance agent publishes, the policy reads), namespace
``ScalingSettings.metrics_namespace``, dimension ``AutoScalingGroupName``, one datapoint per
instance per minute:

=====================  =========  ==========================================================
metric                 unit       per instance per minute
=====================  =========  ==========================================================
``RequestCount``       Count      answered requests (non-429)
``ThrottledCount``     Count      requests refused with 429
``InflightRequests``   Count      mean admitted, unanswered requests, queued included
``QueueDepth``         Count      mean texts waiting for a model run (a subset)
``LatencyP99``         Seconds    p99 of ``nlpfleet_request_latency_seconds`` over the minute
=====================  =========  ==========================================================

The fleet's minute is the ``Sum`` over instances (``Maximum`` for p99); ``SampleCount`` of
``InflightRequests`` is how many instances reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import Clients, aws_error, error_code
from chalicelib.errors import ConcurrentUpdate
from chalicelib.lifecycle import InstanceRecord
from chalicelib.scaling import FleetCounts, MinuteMetrics

METRICS = {
    "RequestCount": ("requests", "Sum"),
    "ThrottledCount": ("throttled", "Sum"),
    "InflightRequests": ("inflight", "Sum"),
    "QueueDepth": ("queue_depth", "Sum"),
    "LatencyP99": ("p99_latency_s", "Maximum"),
}


@dataclass(frozen=True)
class GroupSnapshot:
    name: str
    desired: int
    min_size: int
    max_size: int
    instances: dict[str, str]  # instance id -> lifecycle state

    def counts(self, max_size: int | None = None) -> FleetCounts:
        states = list(self.instances.values())
        return FleetCounts(
            desired=self.desired,
            in_service=sum(1 for s in states if s == "InService"),
            pending=sum(1 for s in states if s.startswith("Pending")),
            draining=sum(1 for s in states if s.startswith("Terminating")),
            min_size=self.min_size,
            max_size=self.max_size if max_size is None else min(self.max_size, max_size),
        )


class AutoScalingGroup:
    """``DescribeAutoScalingGroups``, ``SetDesiredCapacity``, lifecycle action calls."""

    def __init__(self, clients: Clients):
        self._c = clients

    def describe(self, name: str) -> GroupSnapshot:
        try:
            groups = self._c.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])
        except ClientError as e:
            raise aws_error("DescribeAutoScalingGroups", e) from e
        if not groups["AutoScalingGroups"]:
            from chalicelib.errors import AwsError

            raise AwsError(f"Auto Scaling group {name} not found", {"asg": name})
        g = groups["AutoScalingGroups"][0]
        return GroupSnapshot(
            name=name,
            desired=int(g["DesiredCapacity"]),
            min_size=int(g["MinSize"]),
            max_size=int(g["MaxSize"]),
            instances={i["InstanceId"]: i["LifecycleState"] for i in g.get("Instances", [])},
        )

    def set_desired(self, name: str, desired: int) -> None:
        try:
            self._c.autoscaling.set_desired_capacity(
                AutoScalingGroupName=name, DesiredCapacity=desired, HonorCooldown=False
            )
        except ClientError as e:
            raise aws_error("SetDesiredCapacity", e) from e

    def set_min_size(self, name: str, min_size: int, desired: int) -> None:
        try:
            self._c.autoscaling.update_auto_scaling_group(
                AutoScalingGroupName=name, MinSize=min_size, DesiredCapacity=desired
            )
        except ClientError as e:
            raise aws_error("UpdateAutoScalingGroup", e) from e

    def complete(self, asg: str, hook: str, instance_id: str, token: str, result: str) -> bool:
        """Complete a lifecycle action. False when Auto Scaling no longer waits on it (already
        completed by the agent, or timed out): a no-op, not an error."""
        kwargs = {
            "AutoScalingGroupName": asg,
            "LifecycleHookName": hook,
            "InstanceId": instance_id,
            "LifecycleActionResult": result,
        }
        if token:
            kwargs["LifecycleActionToken"] = token
        try:
            self._c.autoscaling.complete_lifecycle_action(**kwargs)
        except ClientError as e:
            if error_code(e) == "ValidationError" and "No active Lifecycle Action" in str(e):
                return False
            raise aws_error("CompleteLifecycleAction", e) from e
        return True


class FleetMetrics:
    """The fleet's per-minute metrics from CloudWatch (``GetMetricData``)."""

    def __init__(self, clients: Clients):
        self._c = clients

    def window(self, namespace: str, asg: str, start_s: int, end_s: int) -> tuple[MinuteMetrics, ...]:
        dims = [{"Name": "AutoScalingGroupName", "Value": asg}]
        queries = [
            {
                "Id": f"m{i}",
                "MetricStat": {
                    "Metric": {"Namespace": namespace, "MetricName": name, "Dimensions": dims},
                    "Period": 60,
                    "Stat": stat,
                },
            }
            for i, (name, (_, stat)) in enumerate(METRICS.items())
        ]
        queries.append(
            {
                "Id": "n",
                "MetricStat": {
                    "Metric": {"Namespace": namespace, "MetricName": "InflightRequests", "Dimensions": dims},
                    "Period": 60,
                    "Stat": "SampleCount",
                },
            }
        )
        by_t: dict[int, dict[str, Any]] = {}
        fields = [f for f, _ in METRICS.values()] + ["instances"]
        ids = {q["Id"]: f for q, f in zip(queries, fields, strict=True)}
        kwargs = {
            "MetricDataQueries": queries,
            "StartTime": datetime.fromtimestamp(start_s, UTC),
            "EndTime": datetime.fromtimestamp(end_s, UTC),
            "ScanBy": "TimestampAscending",
        }
        try:
            while True:
                page = self._c.get("cloudwatch").get_metric_data(**kwargs)
                for res in page["MetricDataResults"]:
                    for ts, v in zip(res["Timestamps"], res["Values"], strict=True):
                        t = int(ts.timestamp()) // 60 * 60
                        by_t.setdefault(t, {})[ids[res["Id"]]] = v
                if not page.get("NextToken"):
                    break
                kwargs["NextToken"] = page["NextToken"]
        except ClientError as e:
            raise aws_error("GetMetricData", e) from e
        out = []
        for t in sorted(by_t):
            v = by_t[t]
            out.append(
                MinuteMetrics(
                    t=t,
                    requests=float(v.get("requests", 0.0)),
                    throttled=float(v.get("throttled", 0.0)),
                    inflight=float(v.get("inflight", 0.0)),
                    queue_depth=float(v.get("queue_depth", 0.0)),
                    p99_latency_s=v.get("p99_latency_s"),
                    instances=int(v.get("instances", 0)),
                )
            )
        return tuple(out)


class ScalingStore:
    """The scaling state table (key ``pk``): ``policy#<asg>`` holds the policy state with a
    version for optimistic concurrency, ``instance#<id>`` one record per inference instance."""

    def __init__(self, clients: Clients, table: str):
        self._c = clients
        self._table = table

    def load_policy_state(self, asg: str) -> tuple[dict[str, Any] | None, int]:
        try:
            item = self._c.dynamodb.get_item(
                TableName=self._table, Key={"pk": {"S": f"policy#{asg}"}}, ConsistentRead=True
            ).get("Item")
        except ClientError as e:
            raise aws_error("GetItem", e) from e
        if not item:
            return None, 0
        return json.loads(item["state"]["S"]), int(item["version"]["N"])

    def save_policy_state(self, asg: str, state: dict[str, Any], version: int, extra: dict[str, Any]) -> None:
        """Write version ``version + 1`` only if the stored one is still ``version`` (two
        overlapping invocations cannot both apply a decision on the same state)."""
        item = {
            "pk": {"S": f"policy#{asg}"},
            "state": {"S": json.dumps(state, separators=(",", ":"))},
            "version": {"N": str(version + 1)},
            "last_decision": {"S": json.dumps(extra, default=str, separators=(",", ":"))},
        }
        cond = "attribute_not_exists(pk)" if version == 0 else "version = :v"
        kwargs: dict[str, Any] = {"TableName": self._table, "Item": item, "ConditionExpression": cond}
        if version:
            kwargs["ExpressionAttributeValues"] = {":v": {"N": str(version)}}
        try:
            self._c.dynamodb.put_item(**kwargs)
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                raise ConcurrentUpdate(f"policy state of {asg} changed under us", {"asg": asg}) from e
            raise aws_error("PutItem", e) from e

    def get_instance(self, instance_id: str) -> InstanceRecord | None:
        try:
            item = self._c.dynamodb.get_item(
                TableName=self._table, Key={"pk": {"S": f"instance#{instance_id}"}}, ConsistentRead=True
            ).get("Item")
        except ClientError as e:
            raise aws_error("GetItem", e) from e
        return None if not item else InstanceRecord.from_item(json.loads(item["record"]["S"]))

    def put_instance(self, record: InstanceRecord, expected_state: str | None) -> None:
        item = {
            "pk": {"S": f"instance#{record.instance_id}"},
            "state": {"S": record.state},
            "record": {"S": json.dumps(record.to_item())},
        }
        kwargs: dict[str, Any] = {"TableName": self._table, "Item": item}
        if expected_state is None:
            kwargs["ConditionExpression"] = "attribute_not_exists(pk)"
        else:
            kwargs["ConditionExpression"] = "#s = :s"
            kwargs["ExpressionAttributeNames"] = {"#s": "state"}
            kwargs["ExpressionAttributeValues"] = {":s": {"S": expected_state}}
        try:
            self._c.dynamodb.put_item(**kwargs)
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                raise ConcurrentUpdate(
                    f"instance {record.instance_id} changed under us", {"instance_id": record.instance_id}
                ) from e
            raise aws_error("PutItem", e) from e

    def forget_instance(self, instance_id: str) -> None:
        try:
            self._c.dynamodb.delete_item(TableName=self._table, Key={"pk": {"S": f"instance#{instance_id}"}})
        except ClientError as e:
            raise aws_error("DeleteItem", e) from e

    def instances(self) -> list[InstanceRecord]:
        out: list[InstanceRecord] = []
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "FilterExpression": "begins_with(pk, :p)",
            "ExpressionAttributeValues": {":p": {"S": "instance#"}},
            "ConsistentRead": True,
        }
        try:
            while True:
                page = self._c.dynamodb.scan(**kwargs)
                out += [InstanceRecord.from_item(json.loads(i["record"]["S"])) for i in page.get("Items", [])]
                if "LastEvaluatedKey" not in page:
                    return out
                kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        except ClientError as e:
            raise aws_error("Scan", e) from e
