"""Launching a job's instance: the options to try (pure) and the EC2 adapter that tries them.

``launch_options`` turns the planner's ordered candidates into the attempts a launch makes:
spot on each candidate in order when the job allows it, then on-demand on each; ``Ec2`` walks
that list and moves on when EC2 answers with a capacity error. Each option has its own client
token, ``<job id>-a<attempt>-<option index>``, so a retried launch (a Lambda retry, a
duplicated request) gets the instance the first one started instead of a second one.

Example::

    >>> [(o.instance_type, o.market) for o in launch_options(["g4dn.xlarge", "g5.xlarge"], True)]
    [('g4dn.xlarge', 'spot'), ('g5.xlarge', 'spot'), ('g4dn.xlarge', 'on-demand'), ('g5.xlarge', 'on-demand')]
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from botocore.exceptions import ClientError

from chalicelib.aws import Clients, aws_error, error_code
from chalicelib.errors import CapacityUnavailable

# EC2 error codes after which another instance type or market may still work.
CAPACITY_ERRORS = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        "Unsupported",
    }
)
TAG_JOB = "nlpfleet:job-id"
TAG_TOKEN = "nlpfleet:launch-token"


@dataclass(frozen=True)
class LaunchOption:
    instance_type: str
    market: str  # spot | on-demand


@dataclass(frozen=True)
class Launched:
    instance_id: str
    instance_type: str
    market: str
    token: str
    tried: tuple[str, ...]


def launch_options(candidates: list[str], allow_spot: bool) -> list[LaunchOption]:
    spot = [LaunchOption(t, "spot") for t in candidates] if allow_spot else []
    return spot + [LaunchOption(t, "on-demand") for t in candidates]


def client_token(job_id: str, attempt: int, index: int) -> str:
    return f"{job_id}-a{attempt}-{index}"[:64]


def user_data(
    job_id: str,
    job_type: str,
    spec: dict,
    *,
    bucket: str,
    table: str,
    region: str,
    stage: str,
    endpoint_url: str | None,
    attempt: int,
    launch: dict,
) -> dict:
    """The launch contract (docs/CONTRACTS.md) a job instance reads from IMDSv2."""
    return {
        "role": "job",
        "job_id": job_id,
        "job_type": job_type,
        "spec": spec,
        "bucket": bucket,
        "table": table,
        "region": region,
        "stage": stage,
        "endpoint_url": endpoint_url,
        "attempt": attempt,
        "launch": launch,
    }


class Ec2:
    def __init__(
        self, clients: Clients, *, launch_template: str, instance_profile: str = "", stage: str = "dev"
    ):
        self._clients = clients
        self.launch_template = launch_template
        self.instance_profile = instance_profile
        self.stage = stage

    @property
    def _ec2(self):
        return self._clients.ec2

    def _existing(self, token: str) -> dict | None:
        try:
            resp = self._ec2.describe_instances(
                Filters=[
                    {"Name": f"tag:{TAG_TOKEN}", "Values": [token]},
                    {"Name": "instance-state-name", "Values": ["pending", "running"]},
                ]
            )
        except ClientError as e:
            raise aws_error("EC2 DescribeInstances", e) from e
        for r in resp.get("Reservations", []):
            for i in r.get("Instances", []):
                return i
        return None

    def launch(
        self, job_id: str, attempt: int, options: list[LaunchOption], data: dict, tags: dict[str, str]
    ) -> Launched:
        """Try each option in order; the first that EC2 accepts wins. Raises
        ``CapacityUnavailable`` when every option hit a capacity error."""
        tried: list[str] = []
        # boto3 base64-encodes UserData for RunInstances itself.
        payload = json.dumps(data, separators=(",", ":"))
        for index, opt in enumerate(options):
            token = client_token(job_id, attempt, index)
            found = self._existing(token)
            if found:
                return Launched(
                    found["InstanceId"],
                    found.get("InstanceType", opt.instance_type),
                    opt.market,
                    token,
                    tuple(tried),
                )
            all_tags = {
                **tags,
                TAG_JOB: job_id,
                TAG_TOKEN: token,
                "nlpfleet:market": opt.market,
                "Name": f"nlpfleet-{self.stage}-{job_id}",
            }
            kwargs = {
                "LaunchTemplate": {"LaunchTemplateName": self.launch_template, "Version": "$Latest"},
                "InstanceType": opt.instance_type,
                "MinCount": 1,
                "MaxCount": 1,
                "ClientToken": token,
                "UserData": payload,
                "MetadataOptions": {
                    "HttpTokens": "required",
                    "HttpEndpoint": "enabled",
                    "HttpPutResponseHopLimit": 2,
                },
                "InstanceInitiatedShutdownBehavior": "terminate",
                "TagSpecifications": [
                    {
                        "ResourceType": rt,
                        "Tags": [{"Key": k, "Value": v} for k, v in sorted(all_tags.items())],
                    }
                    for rt in ("instance", "volume")
                ],
            }
            if self.instance_profile:
                key = "Arn" if self.instance_profile.startswith("arn:") else "Name"
                kwargs["IamInstanceProfile"] = {key: self.instance_profile}
            if opt.market == "spot":
                kwargs["InstanceMarketOptions"] = {
                    "MarketType": "spot",
                    "SpotOptions": {
                        "SpotInstanceType": "one-time",
                        "InstanceInterruptionBehavior": "terminate",
                    },
                }
            try:
                resp = self._ec2.run_instances(**kwargs)
            except ClientError as e:
                code = error_code(e)
                if code in CAPACITY_ERRORS:
                    tried.append(f"{opt.instance_type}/{opt.market}: {code}")
                    continue
                raise aws_error(f"EC2 RunInstances ({opt.instance_type}/{opt.market})", e) from e
            inst = resp["Instances"][0]
            return Launched(inst["InstanceId"], opt.instance_type, opt.market, token, tuple(tried))
        raise CapacityUnavailable(tried)

    def terminate(self, instance_id: str) -> None:
        try:
            self._ec2.terminate_instances(InstanceIds=[instance_id])
        except ClientError as e:
            if error_code(e) in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
                return
            raise aws_error("EC2 TerminateInstances", e) from e

    def job_id_of(self, instance_id: str) -> str | None:
        """The job an instance was launched for, from its tags (None: not a job instance)."""
        try:
            resp = self._ec2.describe_instances(InstanceIds=[instance_id])
        except ClientError as e:
            if error_code(e).startswith("InvalidInstanceID"):
                return None
            raise aws_error("EC2 DescribeInstances", e) from e
        for r in resp.get("Reservations", []):
            for i in r.get("Instances", []):
                for t in i.get("Tags", []):
                    if t["Key"] == TAG_JOB:
                        return t["Value"]
        return None
