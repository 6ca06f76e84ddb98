"""S3, SSM and Auto Scaling reads/writes the control plane needs (adapters, boto3 only here).

- ``Objects``: object size (HEAD), small JSON documents (sidecars, manifests) with a size cap,
  the published manifests under ``models/``.
- ``ActiveModel``: the SSM parameter ``/nlpfleet/<stage>/active-model`` (docs/CONTRACTS.md).
- ``FleetReader``: the inference Auto Scaling group as plain data for ``GET /fleet``.
"""

from __future__ import annotations

import json

from botocore.exceptions import ClientError

from chalicelib.aws import Clients, aws_error, error_code


class ObjectMissing(Exception):
    pass


class DocumentTooLarge(Exception):
    pass


class Objects:
    def __init__(self, clients: Clients):
        self._clients = clients

    @property
    def _s3(self):
        return self._clients.s3

    def size(self, bucket: str, key: str) -> int:
        try:
            return int(self._s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as e:
            if error_code(e) in ("404", "NoSuchKey", "NotFound"):
                raise ObjectMissing(f"s3://{bucket}/{key}") from e
            raise aws_error("S3 HeadObject", e) from e

    def read_json(
        self, bucket: str, key: str, max_bytes: int, version_id: str | None = None
    ) -> tuple[object, bytes]:
        """The parsed document and its raw bytes. Raises ``ObjectMissing``,
        ``DocumentTooLarge`` or ``ValueError`` (not JSON)."""
        kwargs = {"Bucket": bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        try:
            resp = self._s3.get_object(**kwargs)
        except ClientError as e:
            if error_code(e) in ("404", "NoSuchKey", "NoSuchVersion", "NotFound"):
                raise ObjectMissing(f"s3://{bucket}/{key}") from e
            raise aws_error("S3 GetObject", e) from e
        if int(resp.get("ContentLength", 0)) > max_bytes:
            raise DocumentTooLarge(f"s3://{bucket}/{key} is over {max_bytes} bytes")
        raw = resp["Body"].read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise DocumentTooLarge(f"s3://{bucket}/{key} is over {max_bytes} bytes")
        return json.loads(raw), raw

    def manifest_keys(self, bucket: str, limit: int = 1000) -> list[str]:
        keys: list[str] = []
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="models/")
            for page in pages:
                for obj in page.get("Contents", []):
                    parts = obj["Key"].split("/")
                    if len(parts) == 4 and parts[3] == "manifest.json":
                        keys.append(obj["Key"])
                if len(keys) >= limit:
                    break
        except ClientError as e:
            if error_code(e) == "NoSuchBucket":
                return []
            raise aws_error("S3 ListObjectsV2", e) from e
        return keys[:limit]


class ActiveModel:
    def __init__(self, clients: Clients, name: str):
        self._clients = clients
        self.name = name

    def get(self) -> dict | None:
        try:
            value = self._clients.ssm.get_parameter(Name=self.name)["Parameter"]["Value"]
        except ClientError as e:
            if error_code(e) == "ParameterNotFound":
                return None
            raise aws_error("SSM GetParameter", e) from e
        try:
            doc = json.loads(value)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def put(self, value: dict) -> None:
        try:
            self._clients.ssm.put_parameter(
                Name=self.name,
                Value=json.dumps(value, sort_keys=True),
                Type="String",
                Overwrite=True,
                Description="nlpfleet active model (written by the control plane on a valid manifest)",
            )
        except ClientError as e:
            raise aws_error("SSM PutParameter", e) from e


class FleetReader:
    def __init__(self, clients: Clients):
        self._clients = clients

    def describe(self, asg_name: str) -> dict | None:
        try:
            resp = self._clients.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[asg_name])
        except ClientError as e:
            raise aws_error("AutoScaling DescribeAutoScalingGroups", e) from e
        groups = resp.get("AutoScalingGroups", [])
        if not groups:
            return None
        g = groups[0]
        return {
            "name": g["AutoScalingGroupName"],
            "min_size": g["MinSize"],
            "max_size": g["MaxSize"],
            "desired_capacity": g["DesiredCapacity"],
            "instances": [
                {
                    "instance_id": i["InstanceId"],
                    "instance_type": i.get("InstanceType"),
                    "availability_zone": i.get("AvailabilityZone"),
                    "lifecycle_state": i.get("LifecycleState"),
                    "health_status": i.get("HealthStatus"),
                    "protected_from_scale_in": i.get("ProtectedFromScaleIn", False),
                }
                for i in g.get("Instances", [])
            ],
        }


def prefix_size(objects: Objects, bucket: str, prefix: str) -> int:
    """Total bytes under a prefix (a folder of shards as a job input)."""
    total, found = 0, False
    try:
        for page in objects._s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                total += int(obj["Size"])
                found = True
    except ClientError as e:
        if error_code(e) == "NoSuchBucket":
            raise ObjectMissing(f"s3://{bucket}/{prefix}") from e
        raise aws_error("S3 ListObjectsV2", e) from e
    if not found:
        raise ObjectMissing(f"s3://{bucket}/{prefix}")
    return total
