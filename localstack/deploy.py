"""Deploy the product's template into the stand-in, the way ``aws cloudformation deploy`` would.

1. ``chalice package --merge-template`` produces the one template a real deployment uses;
2. ``localstack.template.split_template`` keeps what moto builds and takes out the functions;
3. moto's ``CreateStack`` builds the resources (and resolves the values the functions need);
4. what moto's CloudFormation skips is applied through the service APIs, from the same
   template properties: lifecycle hooks (``PutLifecycleHook``) and a bucket's
   ``NotificationConfiguration.EventBridgeConfiguration`` (``PutBucketNotificationConfiguration``)
   and ``VersioningConfiguration`` (``PutBucketVersioning``): moto 5.2.5 ignores both properties
   when it builds an ``AWS::S3::Bucket``;
5. the result says, for each function, its environment and the queue its events land in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localstack.template import LocalFunction, LocalPlan, resolve, split_template

log = logging.getLogger(__name__)


def chalice_package(
    project_dir: str | Path,
    out_dir: str | Path,
    *,
    stage: str = "dev",
    merge_template: str | Path | None = None,
    env: dict | None = None,
) -> Path:
    """Run ``chalice package`` (CloudFormation format) and return the template's path
    (``sam.json``, or ``sam.yaml`` when the merged template is YAML: chalice then writes YAML)."""
    chalice = Path(sys.executable).with_name("chalice")
    cmd = [
        str(chalice),
        "--project-dir",
        str(project_dir),
        "package",
        "--stage",
        stage,
        "--pkg-format",
        "cloudformation",
        "--template-format",
        "json",
    ]
    if merge_template:
        cmd += ["--merge-template", str(merge_template)]
    cmd.append(str(out_dir))
    run_env = dict(os.environ if env is None else env)
    run_env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"chalice package failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    out = Path(out_dir)
    return out / "sam.json" if (out / "sam.json").exists() else out / "sam.yaml"


@dataclass(frozen=True)
class Deployment:
    stack_name: str
    outputs: dict[str, str]
    functions: tuple[LocalFunction, ...]  # environment resolved
    queues: dict[str, str]  # function logical id -> queue URL its events land in
    hooks: tuple[dict, ...]
    skipped: tuple[str, ...]

    def function(self, logical_id: str) -> LocalFunction:
        return next(f for f in self.functions if f.logical_id == logical_id)

    def environment(self, logical_id: str | None = None) -> dict[str, str]:
        """A function's environment (default: the API handler's, else the first function's)."""
        if logical_id is None:
            api = [f for f in self.functions if f.is_api]
            fn = api[0] if api else self.functions[0]
        else:
            fn = self.function(logical_id)
        return dict(fn.environment)

    def conflicts(self) -> dict[str, dict[str, str]]:
        """Variables whose value differs between functions: {name: {function: value}}."""
        seen: dict[str, dict[str, str]] = {}
        for fn in self.functions:
            for k, v in fn.environment.items():
                seen.setdefault(k, {})[fn.logical_id] = v
        return {k: by_fn for k, by_fn in seen.items() if len(set(by_fn.values())) > 1}


def deploy(
    template: dict,
    make_client: Callable[[str], object],
    *,
    stack_name: str,
    parameters: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> Deployment:
    plan: LocalPlan = split_template(template)
    for s in plan.skipped:
        log.info("not built by moto: %s", s)
    cf = make_client("cloudformation")
    cf.create_stack(
        StackName=stack_name,
        TemplateBody=json.dumps(plan.moto_template),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in (parameters or {}).items()],
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"],
    )
    deadline = time.monotonic() + timeout_s
    while True:
        stack = cf.describe_stacks(StackName=stack_name)["Stacks"][0]
        status = stack["StackStatus"]
        if status == "CREATE_COMPLETE":
            break
        if status.endswith("FAILED") or "ROLLBACK" in status:
            raise RuntimeError(f"stack {stack_name}: {status} {stack.get('StackStatusReason', '')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"stack {stack_name} still {status}")
        time.sleep(0.2)
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}

    _apply_bucket_properties(plan.moto_template, cf, make_client("s3"), stack_name)

    functions = []
    queues = {}
    sqs = make_client("sqs")
    for fn in plan.functions:
        fn = dataclasses.replace(fn, environment=resolve(fn.environment, outputs))
        functions.append(fn)
        if fn.queue_output:
            ref = outputs[fn.queue_output]
            # an SQS event source names its queue by ARN; our own queues come back as URLs
            queues[fn.logical_id] = (
                sqs.get_queue_url(QueueName=ref.split(":")[-1])["QueueUrl"] if ref.startswith("arn:") else ref
            )

    hooks = tuple(resolve(h, outputs) for h in plan.hooks)
    if hooks:
        asg = make_client("autoscaling")
        for hook in hooks:
            params = {k: v for k, v in hook.items()}
            if "HeartbeatTimeout" in params:
                params["HeartbeatTimeout"] = int(params["HeartbeatTimeout"])
            asg.put_lifecycle_hook(**params)
            log.info(
                "lifecycle hook %s applied to %s", hook["LifecycleHookName"], hook["AutoScalingGroupName"]
            )
    return Deployment(
        stack_name=stack_name,
        outputs=outputs,
        functions=tuple(functions),
        queues=queues,
        hooks=hooks,
        skipped=plan.skipped,
    )


def _apply_bucket_properties(moto_template: dict, cf, s3, stack_name: str) -> None:
    physical = {
        r.get("LogicalResourceId"): r.get("PhysicalResourceId")
        for r in cf.describe_stack_resources(StackName=stack_name)["StackResources"]
    }
    for lid, res in moto_template["Resources"].items():
        if res.get("Type") != "AWS::S3::Bucket":
            continue
        props = res.get("Properties", {})
        versioning = (props.get("VersioningConfiguration") or {}).get("Status")
        if versioning in ("Enabled", "Suspended"):
            s3.put_bucket_versioning(Bucket=physical[lid], VersioningConfiguration={"Status": versioning})
        notif = props.get("NotificationConfiguration", {})
        eb = notif.get("EventBridgeConfiguration")
        if eb is None or eb.get("EventBridgeEnabled") in (False, "false"):
            continue
        s3.put_bucket_notification_configuration(
            Bucket=physical[lid], NotificationConfiguration={"EventBridgeConfiguration": {}}
        )
        log.info("bucket %s sends its events to EventBridge", physical[lid])
