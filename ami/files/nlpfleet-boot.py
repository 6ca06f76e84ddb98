#!/usr/bin/env python3
"""Boot-time role selection for an nlpfleet instance (installed as /opt/nlpfleet/bin/nlpfleet-boot).

Run once per boot by ``nlpfleet-boot.service``: reads the launch contract (JSON user data, see
docs/CONTRACTS.md) from IMDSv2 or ``--user-data FILE``, refuses user data that carries
credentials, resolves the active model for inference instances from the SSM parameter named in
the user data, writes ``/run/nlpfleet/nlpfleet.env`` (read by the systemd units) and
``/run/nlpfleet/user-data.json``, renders the CloudWatch agent configuration for the stage, then
starts the units of the role:

    inference -> nlpfleet-agent.service: the instance agent (inference.agent) fetches the active
                 model, runs the inference server as its child, completes the lifecycle hooks,
                 publishes metrics, hot-swaps and drains
    job       -> nlpfleet-job.service (runs the job, powers the instance off when done)

nlpfleet-inference.service runs the server alone on the model resolved here, for serving without
the agent (a box outside the Auto Scaling group, debugging): `systemctl start nlpfleet-inference`.

Example (what a test or an operator on the box runs):

    nlpfleet-boot --user-data ud.json --root /tmp/prefix --no-start
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

IMDS = "http://169.254.169.254"
ROLE_UNITS = {
    "inference": ("nlpfleet-agent.service",),
    "job": ("nlpfleet-job.service",),
}
REQUIRED = {
    "inference": ("bucket", "table", "region", "stage", "active_model_param"),
    "job": ("job_id", "job_type", "spec", "bucket", "table", "region", "stage"),
}
CWA_TEMPLATE = Path("/opt/nlpfleet/share/cloudwatch-agent.json")
CWA_CTL = Path("/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl")
_SECRET_KEY = re.compile(r"secret|password|passwd|private_key|access_key|(^|_)(token|api_?key)$", re.I)
_SECRET_VALUE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


class BootError(RuntimeError):
    """The instance cannot take a role: the message says why (it lands in the journal)."""


def fetch_user_data(base_url: str = IMDS, timeout_s: float = 2.0, tries: int = 5, sleep=time.sleep) -> bytes:
    """User data over IMDSv2 (session token first: the launch templates require it)."""
    last: Exception | None = None
    for attempt in range(tries):
        if attempt:
            sleep(min(2**attempt, 10))
        try:
            req = urllib.request.Request(
                f"{base_url}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
            )
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                token = resp.read().decode()
            req = urllib.request.Request(
                f"{base_url}/latest/user-data", headers={"X-aws-ec2-metadata-token": token}
            )
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.read()
        except OSError as exc:  # URLError and HTTPError are OSErrors
            last = exc
    raise BootError(f"no user data from IMDSv2 after {tries} tries: {last}")


def _secret_paths(doc, path="") -> list[str]:
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            here = f"{path}.{key}" if path else str(key)
            if _SECRET_KEY.search(str(key)):
                found.append(here)
            found.extend(_secret_paths(value, here))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found.extend(_secret_paths(value, f"{path}[{i}]"))
    elif isinstance(doc, str) and _SECRET_VALUE.search(doc):
        found.append(path)
    return found


def parse_user_data(raw: bytes) -> dict:
    """Validate the launch contract; credentials never travel in user data (the instance
    profile provides them), so a document that carries any is refused."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise BootError(f"user data is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BootError("user data must be a JSON object")
    role = doc.get("role")
    if role not in ROLE_UNITS:
        raise BootError(f"user data role must be one of {sorted(ROLE_UNITS)}, got {role!r}")
    missing = [k for k in REQUIRED[role] if not doc.get(k)]
    if missing:
        raise BootError(f"user data for role {role} lacks {', '.join(missing)}")
    secrets = _secret_paths(doc)
    if secrets:
        raise BootError(f"user data carries credentials ({', '.join(secrets)}); use the instance profile")
    return doc


def resolve_active_model(doc: dict, ssm=None) -> dict:
    """The active model record (``{"name", "version", "uri", ...}``) from the SSM parameter."""
    if ssm is None:
        import boto3

        ssm = boto3.client("ssm", region_name=doc["region"], endpoint_url=doc.get("endpoint_url") or None)
    name = doc["active_model_param"]
    try:
        value = ssm.get_parameter(Name=name)["Parameter"]["Value"]
    except Exception as exc:  # botocore's ClientError and connection errors alike
        raise BootError(f"cannot read active model parameter {name}: {exc}") from None
    try:
        record = json.loads(value)
        uri = record["uri"]
    except (ValueError, KeyError, TypeError):
        raise BootError(f"active model parameter {name} is not a model record: {value!r}") from None
    if not uri:
        raise BootError(f"active model parameter {name} has an empty uri")
    return record


def render_env(doc: dict, model: dict | None) -> dict[str, str]:
    """Environment for the role's units (systemd EnvironmentFile)."""
    env = {
        "NLPFLEET_ROLE": doc["role"],
        "NLPFLEET_STAGE": doc["stage"],
        "NLPFLEET_BUCKET": doc["bucket"],
        "NLPFLEET_TABLE": doc["table"],
        "NLPFLEET_USER_DATA": "/run/nlpfleet/user-data.json",
        "AWS_REGION": doc["region"],
        "AWS_DEFAULT_REGION": doc["region"],
    }
    if doc.get("endpoint_url"):  # the local stack's moto server; never set on AWS
        env["AWS_ENDPOINT_URL"] = doc["endpoint_url"]
        env["NLPFLEET_S3_ENDPOINT_URL"] = doc["endpoint_url"]
    if doc["role"] == "inference":
        env["NLPFLEET_PORT"] = str(int(doc.get("port") or 8080))
        env["NLPFLEET_ACTIVE_MODEL_PARAM"] = doc["active_model_param"]
        if model is not None:
            env["NLPFLEET_MODEL_URI"] = model["uri"]
            env["NLPFLEET_MODEL_VERSION"] = f"{model.get('name', '')}/{model.get('version', '')}"
    else:
        env["NLPFLEET_JOB_ID"] = doc["job_id"]
        env["NLPFLEET_JOB_TYPE"] = doc["job_type"]
    return env


def _env_line(key: str, value: str) -> str:
    # systemd EnvironmentFile: double quotes, backslash escapes.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'{key}="{escaped}"\n'


def render_cloudwatch_config(template: str, doc: dict) -> str:
    return template.replace("@STAGE@", doc["stage"]).replace("@ROLE@", doc["role"])


def write_runtime(root: Path, doc: dict, env: dict[str, str]) -> Path:
    run = root / "run" / "nlpfleet"
    run.mkdir(parents=True, exist_ok=True)
    (run / "user-data.json").write_text(json.dumps(doc, indent=2) + "\n")
    env_file = run / "nlpfleet.env"
    env_file.write_text("".join(_env_line(k, v) for k, v in sorted(env.items())))
    template = root / CWA_TEMPLATE.relative_to("/")
    if template.exists():
        (run / "cloudwatch-agent.json").write_text(render_cloudwatch_config(template.read_text(), doc))
    return env_file


def start(role: str, root: Path) -> None:
    cwa = root / CWA_CTL.relative_to("/")
    if cwa.exists():
        subprocess.run(
            [
                str(cwa),
                "-a",
                "fetch-config",
                "-m",
                "ec2",
                "-s",
                "-c",
                "file:/run/nlpfleet/cloudwatch-agent.json",
            ],
            check=False,  # logs are worth having, but not worth refusing the role over
        )
    subprocess.run(["systemctl", "start", "--no-block", *ROLE_UNITS[role]], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nlpfleet-boot", description=__doc__.splitlines()[0])
    ap.add_argument("--user-data", type=Path, help="read the launch contract from FILE, not IMDSv2")
    ap.add_argument("--imds-url", default=IMDS, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, default=Path("/"), help="filesystem root to write under")
    ap.add_argument("--no-start", action="store_true", help="write the configuration, start nothing")
    args = ap.parse_args(argv)
    try:
        raw = args.user_data.read_bytes() if args.user_data else fetch_user_data(args.imds_url)
        doc = parse_user_data(raw)
        model = None
        if doc["role"] == "inference":
            try:
                model = resolve_active_model(doc)
            except BootError as exc:
                # the agent reads the parameter itself and abandons the launch if it is missing
                print(f"nlpfleet-boot: warning: {exc}", file=sys.stderr, flush=True)
        env = render_env(doc, model)
        env_file = write_runtime(args.root, doc, env)
        units = " ".join(ROLE_UNITS[doc["role"]])
        print(
            f"nlpfleet-boot: role={doc['role']} stage={doc['stage']} env={env_file} units={units}", flush=True
        )
        if not args.no_start:
            start(doc["role"], args.root)
    except BootError as exc:
        print(f"nlpfleet-boot: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
