"""The AWS stand-in: a moto server on a free loopback port, and the environment that points
boto3 (in this process and in every child process) at it.

moto keeps its state in process-global backends, so one process holds one AWS. The stack
supervisor (``localstack/stack.py``) runs it in a thread; instances, the CLI and tests reach it
over HTTP through ``AWS_ENDPOINT_URL`` like any other AWS endpoint.

Example::

    >>> with MotoServer() as aws:                            # doctest: +SKIP
    ...     s3 = aws.client("s3")
    ...     s3.create_bucket(Bucket="b")
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.request
from collections.abc import Mapping

from moto.server import ThreadedMotoServer

REGION = "us-east-1"
ACCOUNT_ID = "123456789012"  # moto's default account
LOOPBACK = "127.0.0.1"

log = logging.getLogger(__name__)


def aws_env(endpoint_url: str, region: str = REGION) -> dict[str, str]:
    """Environment variables that send every boto3 client to ``endpoint_url`` with dummy
    credentials. ``AWS_ENDPOINT_URL`` is botocore's service-wide endpoint override, so code that
    creates plain ``boto3.client("s3")`` clients needs no change to run against the stand-in."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        # never reach the real instance metadata service for credentials or region
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class MotoServer:
    """A moto server on ``127.0.0.1`` (port 0 = a free port chosen by the OS)."""

    def __init__(self, port: int = 0, region: str = REGION):
        self.region = region
        self._server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
        self.endpoint_url: str | None = None
        self._clients: dict[tuple, object] = {}

    def start(self) -> MotoServer:
        # werkzeug logs every request at INFO: far too chatty for a running stack
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        self.reset()  # backends are process-global: start from an empty AWS
        log.info("moto server on %s", self.endpoint_url)
        return self

    def stop(self) -> None:
        if self.endpoint_url is not None:
            self._server.stop()
            self.endpoint_url = None

    def reset(self) -> None:
        """Forget every resource (moto's ``/moto-api/reset``)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    @property
    def env(self) -> dict[str, str]:
        if self.endpoint_url is None:
            raise RuntimeError("moto server is not running")
        return aws_env(self.endpoint_url, self.region)

    def client(self, service: str, **kwargs):
        """A client for ``service``, cached per thread (creating one costs tens of milliseconds
        of CPU; the stack's pollers ask for one every second)."""
        if kwargs:
            return client(service, self.env, **kwargs)
        key = (service, threading.get_ident(), self.endpoint_url)
        c = self._clients.get(key)
        if c is None:
            c = self._clients[key] = client(service, self.env)
        return c

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def client(service: str, env: Mapping[str, str] | None = None, **kwargs):
    """A boto3 client configured from ``env`` (default: ``os.environ``) rather than from
    whatever the process environment holds, so a test can talk to one stand-in explicitly."""
    import boto3

    env = os.environ if env is None else env
    return boto3.session.Session(
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=env.get("AWS_SESSION_TOKEN"),
        region_name=env.get("AWS_DEFAULT_REGION", REGION),
    ).client(service, endpoint_url=env.get("AWS_ENDPOINT_URL"), **kwargs)
