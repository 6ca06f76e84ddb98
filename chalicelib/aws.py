"""Lazily created boto3 clients (moto intercepts only clients made after it starts).

One ``Clients`` per invocation: the first use of a service creates its client, later uses
reuse it. ``endpoint_url`` points every client at the local stack's moto server.
"""

from __future__ import annotations

from botocore.exceptions import ClientError

from chalicelib.errors import AwsError


class Clients:
    def __init__(self, region: str, endpoint_url: str | None = None):
        self.region = region
        self.endpoint_url = endpoint_url
        self._clients: dict[str, object] = {}

    def get(self, service: str):
        if service not in self._clients:
            import boto3

            kwargs = {"region_name": self.region}
            if self.endpoint_url:
                kwargs["endpoint_url"] = self.endpoint_url
            self._clients[service] = boto3.client(service, **kwargs)
        return self._clients[service]

    @property
    def ec2(self):
        return self.get("ec2")

    @property
    def dynamodb(self):
        return self.get("dynamodb")

    @property
    def s3(self):
        return self.get("s3")

    @property
    def ssm(self):
        return self.get("ssm")

    @property
    def autoscaling(self):
        return self.get("autoscaling")


def error_code(err: ClientError) -> str:
    return err.response.get("Error", {}).get("Code", "")


def aws_error(what: str, err: ClientError) -> AwsError:
    code = error_code(err)
    msg = err.response.get("Error", {}).get("Message", "")
    return AwsError(f"{what} failed: {code} {msg}".strip(), {"aws_error": code})
