"""The deployable stack's security and wiring properties, read from infra/nlpfleet.yaml and the
Lambda policy files (no AWS, no subprocess).

What an operator would otherwise find out in production: an instance reachable through IMDSv1,
an unencrypted volume, a public bucket, a policy that grants ``*``, an AWS call the control
plane makes that its role does not allow, user data that the instance refuses at boot.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import importlib.util
import json
import re
from pathlib import Path

import botocore.session
import pytest
from cfnlint.decode import decode

from chalicelib.jobs_store import TABLE_SPEC

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra" / "nlpfleet.yaml"
STAGES = ("dev", "prod")

# Actions that support no resource-level permission: "*" is their only possible Resource.
NO_RESOURCE_SCOPE = {
    "ec2:DescribeInstances",
    "ec2:DescribeTags",
    "autoscaling:DescribeAutoScalingGroups",
    "autoscaling:DescribeAutoScalingInstances",
    "autoscaling:DescribeLifecycleHooks",
    "cloudwatch:GetMetricData",
    "cloudwatch:GetMetricStatistics",
    "cloudwatch:PutMetricData",
    "elasticloadbalancing:DescribeTargetHealth",
}


def _load(path: Path) -> dict:
    template, matches = decode(str(path))
    assert not matches, matches
    return template


@pytest.fixture(scope="module")
def template() -> dict:
    return _load(INFRA)


@pytest.fixture(scope="module")
def resources(template) -> dict:
    return template["Resources"]


def _of_type(resources: dict, typ: str) -> dict:
    return {k: v for k, v in resources.items() if v.get("Type") == typ}


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def lambda_policy(stage: str) -> dict:
    return json.loads((REPO / ".chalice" / f"policy-{stage}.json").read_text())


def instance_policies(resources: dict) -> dict[str, dict]:
    out = {}
    for lid, res in _of_type(resources, "AWS::IAM::Role").items():
        for pol in res["Properties"].get("Policies", []):
            out[f"{lid}/{pol['PolicyName']}"] = pol["PolicyDocument"]
    return out


def all_policies(resources: dict) -> dict[str, dict]:
    docs = instance_policies(resources)
    for stage in STAGES:
        docs[f"policy-{stage}.json"] = lambda_policy(stage)
    return docs


def _listify(value) -> list:
    return value if isinstance(value, list) else [value]


# ------------------------------------------------------------------ bucket, tables, logs


def test_bucket_sends_events_to_eventbridge_blocks_public_access_encrypts_and_versions(resources):
    (bucket,) = _of_type(resources, "AWS::S3::Bucket").values()
    props = bucket["Properties"]
    assert props["NotificationConfiguration"]["EventBridgeConfiguration"]["EventBridgeEnabled"] is True
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    assert props["VersioningConfiguration"]["Status"] == "Enabled"
    assert props["OwnershipControls"]["Rules"][0]["ObjectOwnership"] == "BucketOwnerEnforced"
    # datasets and models outlive a delete-stack
    assert bucket["DeletionPolicy"] == "Retain"


def test_bucket_policy_refuses_plain_http(resources):
    (pol,) = _of_type(resources, "AWS::S3::BucketPolicy").values()
    (stmt,) = pol["Properties"]["PolicyDocument"]["Statement"]
    assert stmt["Effect"] == "Deny"
    assert stmt["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_jobs_table_has_the_keys_and_indexes_the_control_plane_queries(resources):
    props = resources["JobsTable"]["Properties"]
    assert props["TableName"] == {"Fn::Sub": "nlpfleet-${Stage}-jobs"}
    assert props["KeySchema"] == TABLE_SPEC["KeySchema"]
    assert sorted(props["AttributeDefinitions"], key=str) == sorted(
        TABLE_SPEC["AttributeDefinitions"], key=str
    )
    assert props["GlobalSecondaryIndexes"] == TABLE_SPEC["GlobalSecondaryIndexes"]
    assert props["BillingMode"] == TABLE_SPEC["BillingMode"]


def test_tables_are_encrypted(resources):
    for lid, table in _of_type(resources, "AWS::DynamoDB::Table").items():
        assert table["Properties"]["SSESpecification"]["SSEEnabled"] is True, lid


# ------------------------------------------------------------------ instances


def test_launch_templates_require_imdsv2_encrypt_volumes_and_carry_an_instance_profile(resources):
    lts = _of_type(resources, "AWS::EC2::LaunchTemplate")
    assert set(lts) == {"JobLaunchTemplate", "InferenceLaunchTemplate"}
    for lid, lt in lts.items():
        data = lt["Properties"]["LaunchTemplateData"]
        assert data["MetadataOptions"]["HttpTokens"] == "required", lid
        assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1, lid
        assert data["BlockDeviceMappings"], lid
        for bdm in data["BlockDeviceMappings"]:
            assert bdm["Ebs"]["Encrypted"] is True, lid
            assert bdm["Ebs"]["VolumeType"] == "gp3", lid
        assert "Fn::GetAtt" in data["IamInstanceProfile"]["Arn"], lid
        assert data["ImageId"] == {"Ref": "AmiId"}, lid
    # a finished job powers off: that must terminate, not stop (and keep billing for EBS)
    assert lts["JobLaunchTemplate"]["Properties"]["LaunchTemplateData"][
        "InstanceInitiatedShutdownBehavior"
    ] == ("terminate")


def _resolve_sub(text: str, values: dict[str, str]) -> str:
    def repl(m):
        return values[m.group(1)]

    return re.sub(r"\$\{([^}]+)\}", repl, text)


def test_inference_user_data_is_the_launch_contract_and_the_image_accepts_it(resources):
    boot = _load_module("nlpfleet_boot", REPO / "ami" / "files" / "nlpfleet-boot.py")
    user_data = resources["InferenceLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
    sub = user_data["Fn::Base64"]["Fn::Sub"]
    values = {"DataBucket": "nlpfleet-dev-databucket-1", "JobsTable": "nlpfleet-dev-jobs", "AWS::Region": "eu-west-1",
              "Stage": "dev", "WarmupTimeoutSeconds": "900", "DrainSeconds": "60"}  # fmt: skip
    text = _resolve_sub(sub, values)
    doc = boot.parse_user_data(base64.b64decode(base64.b64encode(text.encode())))
    assert doc["role"] == "inference"
    assert doc["active_model_param"] == "/nlpfleet/dev/active-model"
    env = boot.render_env(doc, {"name": "m", "version": "1", "uri": "s3://b/models/m/1/"})
    assert env["NLPFLEET_PORT"] == "8080"
    assert env["NLPFLEET_MODEL_URI"] == "s3://b/models/m/1/"
    assert "AWS_ENDPOINT_URL" not in env  # only the local stack points boto3 elsewhere
    # the agent accepts it, with its limits following the stack's hook and drain timings
    from inference.agent import AgentSettings

    agent = AgentSettings.from_user_data(doc)
    assert (agent.warmup_timeout_s, agent.drain_timeout_s) == (900, 60)
    assert (agent.launch_hook, agent.terminate_hook) == ("nlpfleet-warmup", "nlpfleet-drain")
    assert agent.model_dir == "/var/lib/nlpfleet/models"  # the image's state directory


def test_image_refuses_user_data_that_carries_credentials():
    boot = _load_module("nlpfleet_boot", REPO / "ami" / "files" / "nlpfleet-boot.py")
    good = {"role": "job", "job_id": "j1", "job_type": "finetune", "spec": {"epochs": 1}, "bucket": "b",
            "table": "t", "region": "us-east-1", "stage": "dev"}  # fmt: skip
    assert boot.parse_user_data(json.dumps(good).encode())["job_id"] == "j1"
    for bad in (
        {**good, "aws_secret_access_key": "x"},
        {**good, "spec": {"hub_token": "x"}},
        {**good, "spec": {"note": "AKIAABCDEFGHIJKLMNOP"}},
    ):
        with pytest.raises(boot.BootError, match="credentials"):
            boot.parse_user_data(json.dumps(bad).encode())
    with pytest.raises(boot.BootError, match="lacks job_id"):
        boot.parse_user_data(json.dumps({**good, "job_id": ""}).encode())
    with pytest.raises(boot.BootError, match="role"):
        boot.parse_user_data(b'{"role": "miner"}')


def test_inference_group_spans_the_subnets_behind_the_load_balancer_with_both_hooks(resources):
    asg = resources["InferenceGroup"]["Properties"]
    assert asg["VPCZoneIdentifier"] == {"Ref": "SubnetIds"}
    assert asg["TargetGroupARNs"] == [{"Ref": "InferenceTargetGroup"}]
    assert asg["HealthCheckType"] == "ELB"
    assert asg["MinSize"] == "0" and "DesiredCapacity" not in asg  # the control plane owns capacity
    hooks = {h["Properties"]["LifecycleTransition"]: h["Properties"] for h in _of_type(
        resources, "AWS::AutoScaling::LifecycleHook").values()}  # fmt: skip
    launch = hooks["autoscaling:EC2_INSTANCE_LAUNCHING"]
    terminate = hooks["autoscaling:EC2_INSTANCE_TERMINATING"]
    for hook in (launch, terminate):
        assert hook["AutoScalingGroupName"] == {"Ref": "InferenceGroup"}
    # never put a broken instance in service; never block a termination on a dead agent
    assert launch["DefaultResult"] == "ABANDON"
    assert terminate["DefaultResult"] == "CONTINUE"
    assert launch["HeartbeatTimeout"] == {"Ref": "WarmupTimeoutSeconds"}
    assert terminate["HeartbeatTimeout"] == {"Ref": "TerminateHookTimeoutSeconds"}


def test_target_group_checks_readyz_and_drains_for_the_drain_time(resources, template):
    tg = resources["InferenceTargetGroup"]["Properties"]
    assert tg["HealthCheckPath"] == "/readyz"
    assert tg["Port"] == 8080
    attrs = {a["Key"]: a["Value"] for a in tg["TargetGroupAttributes"]}
    assert attrs["deregistration_delay.timeout_seconds"] == {"Ref": "DrainSeconds"}
    # The load balancer keeps a deregistered instance's connections at least as long as the
    # server's own drain lets requests in flight finish; systemd waits for that drain before
    # it would SIGKILL the server.
    from inference.serve_settings import Settings as ServeSettings

    serve = ServeSettings(model="/m")
    assert template["Parameters"]["DrainSeconds"]["Default"] >= serve.drain_grace_s + serve.drain_timeout_s
    unit = (REPO / "ami/files/systemd/nlpfleet-inference.service").read_text()
    stop_s = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M)[1])
    assert stop_s > serve.drain_grace_s + serve.drain_timeout_s
    # In the fleet the agent drains the server for DrainSeconds (user data), plus its grace and
    # a 30 s kill margin: the terminate hook must outlast that, and systemd must not cut it short.
    from inference.agent import AgentSettings

    params = template["Parameters"]
    agent_drain_s = params["DrainSeconds"]["Default"] + AgentSettings("r", "p").drain_grace_s + 30
    assert params["TerminateHookTimeoutSeconds"]["Default"] > agent_drain_s
    agent_unit = (REPO / "ami/files/systemd/nlpfleet-agent.service").read_text()
    assert (
        int(re.search(r"^TimeoutStopSec=(\d+)$", agent_unit, re.M)[1])
        > AgentSettings("r", "p").drain_timeout_s
    )


def test_instances_accept_traffic_only_from_the_load_balancer(resources):
    ingress = resources["InferenceSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert [r.get("SourceSecurityGroupId") for r in ingress] == [{"Ref": "LoadBalancerSecurityGroup"}]
    assert "SecurityGroupIngress" not in resources["JobSecurityGroup"]["Properties"]


# ------------------------------------------------------------------ IAM


def test_no_policy_allows_a_wildcard_action(resources):
    for name, doc in all_policies(resources).items():
        for stmt in doc["Statement"]:
            if stmt["Effect"] != "Allow":
                continue
            for action in _listify(stmt["Action"]):
                assert action != "*" and not action.endswith(":*"), f"{name}: {action}"


def test_wildcard_resources_only_for_actions_that_have_no_resource_scope(resources):
    for name, doc in all_policies(resources).items():
        for stmt in doc["Statement"]:
            if stmt["Effect"] != "Allow" or "*" not in _listify(stmt["Resource"]):
                continue
            actions = set(_listify(stmt["Action"]))
            assert actions <= NO_RESOURCE_SCOPE, f"{name} {stmt.get('Sid')}: {actions - NO_RESOURCE_SCOPE}"
            if "cloudwatch:PutMetricData" in actions:
                assert stmt["Condition"]["StringLike"]["cloudwatch:namespace"].startswith("nlpfleet")


def _resource_text(stmt) -> list[str]:
    return [json.dumps(r) for r in _listify(stmt["Resource"])]


def test_scoped_statements_name_this_stacks_resources(resources):
    """Every non-'*' resource is built from the stack (Ref/GetAtt/Sub of its own resources and
    pseudo-parameters) and names nlpfleet's own bucket, tables, template, group or parameter."""
    own = set(resources) | {"AWS::Partition", "AWS::Region", "AWS::AccountId", "AWS::StackName", "Stage"}
    for name, doc in all_policies(resources).items():
        for stmt in doc["Statement"]:
            if stmt["Effect"] != "Allow" or "*" in _listify(stmt["Resource"]):
                continue
            for res in _listify(stmt["Resource"]):
                text = res["Fn::Sub"] if isinstance(res, dict) and "Fn::Sub" in res else None
                if text is None:
                    ref = res.get("Ref") or res.get("Fn::GetAtt", [None])[0]
                    assert ref in own, f"{name}: {res}"
                    continue
                names = {n.split(".")[0] for n in re.findall(r"\$\{([^}]+)\}", text)}
                assert names <= own, f"{name}: {text}"
                tail = text.split(":", 5)[-1]
                scoped = names & set(resources) or "nlpfleet" in tail or "AWS::StackName" in names
                # EC2 RunInstances/CreateTags/TerminateInstances name resource types (instance/*)
                # and are scoped by their condition: the job launch template, the launch action,
                # the instance's job tag.
                assert scoped or stmt.get("Condition"), f"{name}: {text}"


# botocore operations the code calls -> IAM actions its role must allow.
SERVICES = {
    "ec2": "ec2",
    "s3": "s3",
    "ssm": "ssm",
    "dynamodb": "dynamodb",
    "autoscaling": "autoscaling",
    "cloudwatch": "cloudwatch",
    "elbv2": "elasticloadbalancing",
}
S3_ACTIONS = {
    "ListObjectsV2": "ListBucket",
    "ListObjects": "ListBucket",
    "HeadBucket": "ListBucket",
    "HeadObject": "GetObject",
    "CopyObject": "PutObject",
    "CreateMultipartUpload": "PutObject",
    "UploadPart": "PutObject",
    "CompleteMultipartUpload": "PutObject",
    "DeleteObjects": "DeleteObject",
}
TRANSFER = {"upload_file": ["s3:PutObject"], "upload_fileobj": ["s3:PutObject"],
            "download_file": ["s3:GetObject"], "download_fileobj": ["s3:GetObject"]}  # fmt: skip


@functools.cache
def _operation_index() -> dict[str, list[str]]:
    session = botocore.session.get_session()
    index: dict[str, list[str]] = {}
    for svc, prefix in SERVICES.items():
        model = session.get_service_model(svc)
        for op in model.operation_names:
            action = S3_ACTIONS.get(op, op) if svc == "s3" else op
            index.setdefault(botocore.xform_name(op), []).append(f"{prefix}:{action}")
    index.update(TRANSFER)
    return index


def aws_calls(paths: list[Path]) -> dict[str, list[str]]:
    """{snake_case operation: [IAM actions, any of which allows it]} for the calls in ``paths``."""
    index = _operation_index()
    found = {}
    for path in paths:
        text = path.read_text()
        names = set(re.findall(r"\.(\w+)\(", text)) | set(re.findall(r"get_paginator\(\s*[\"'](\w+)", text))
        for n in names & set(index):
            found[n] = index[n]
    return found


def allows(doc: dict, action: str) -> bool:
    for stmt in doc["Statement"]:
        if stmt["Effect"] == "Allow" and any(
            fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _listify(stmt["Action"])
        ):
            return True
    return False


@pytest.mark.parametrize("stage", STAGES)
def test_lambda_policy_allows_every_aws_call_the_control_plane_makes(stage):
    sources = [REPO / "app.py", *sorted((REPO / "chalicelib").glob("*.py"))]
    calls = aws_calls([p for p in sources if p.exists()])
    assert {"run_instances", "put_item", "get_parameter"} <= set(calls)  # the scan sees real calls
    doc = lambda_policy(stage)
    missing = {op: actions for op, actions in calls.items() if not any(allows(doc, a) for a in actions)}
    assert not missing, f"policy-{stage}.json lacks (run infra/lambda_policy.py after adding): {missing}"


def _allows_on(doc: dict, action: str, logical_id: str) -> bool:
    """An Allow statement grants ``action`` on a resource built from ``logical_id``."""
    for stmt in doc["Statement"]:
        if stmt["Effect"] != "Allow":
            continue
        if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _listify(stmt["Action"])):
            continue
        if any(re.search(rf"\b{logical_id}\b", json.dumps(r)) for r in _listify(stmt["Resource"])):
            return True
    return False


# Which table each adapter works on (its calls must be allowed on that table, not just somewhere).
TABLE_OF = {"jobs_store.py": "JobsTable", "fleet.py": "ScalingStateTable"}


@pytest.mark.parametrize("stage", STAGES)
def test_lambda_policy_allows_each_adapters_table_calls_on_its_own_table(stage):
    doc = lambda_policy(stage)
    for module, table in TABLE_OF.items():
        path = REPO / "chalicelib" / module
        if not path.exists():
            continue
        calls = {op: a for op, a in aws_calls([path]).items() if a[0].startswith("dynamodb:")}
        assert calls, module
        missing = [op for op, actions in calls.items() if not any(_allows_on(doc, x, table) for x in actions)]
        assert not missing, f"policy-{stage}.json: {module} calls {missing} on {table}"


def test_lambda_policy_files_are_generated_from_infra_lambda_policy():
    gen = _load_module("lambda_policy", REPO / "infra" / "lambda_policy.py")
    assert gen.main(["--check"]) == 0
    dev, prod = lambda_policy("dev"), lambda_policy("prod")
    assert "/nlpfleet/dev/active-model" in json.dumps(dev) and "/nlpfleet/prod/" not in json.dumps(dev)
    assert "/nlpfleet/prod/active-model" in json.dumps(prod)


def test_lambda_can_pass_only_the_job_instance_role_and_launch_only_from_its_template():
    doc = lambda_policy("dev")
    by_sid = {s["Sid"]: s for s in doc["Statement"]}
    assert by_sid["PassJobInstanceRole"]["Resource"] == {"Fn::Sub": "${JobInstanceRole.Arn}"}
    assert (
        by_sid["PassJobInstanceRole"]["Condition"]["StringEquals"]["iam:PassedToService"]
        == "ec2.amazonaws.com"
    )
    run = [s for s in doc["Statement"] if "ec2:RunInstances" in _listify(s["Action"])]
    for stmt in run:
        lt = {
            "Fn::Sub": "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:launch-template/${JobLaunchTemplate}"
        }
        assert stmt["Resource"] == lt or stmt["Condition"]["ArnLike"]["ec2:LaunchTemplate"] == lt
    terminate = by_sid["TerminateOwnJobInstances"]
    assert terminate["Condition"] == {"Null": {"aws:ResourceTag/nlpfleet:job-id": "false"}}


def test_lambda_environment_names_are_ones_the_control_plane_reads(template):
    env = template["Globals"]["Function"]["Environment"]["Variables"]
    code = "\n".join(p.read_text() for p in (REPO / "chalicelib").glob("*.py"))
    unread = [k for k in env if f'"{k}"' not in code]
    # SUBNET_IDS and INFERENCE_TARGET_GROUP_ARN are offered for launches across subnets and
    # target-health reads; the rest must be names chalicelib reads.
    assert set(unread) <= {"SUBNET_IDS", "INFERENCE_TARGET_GROUP_ARN"}, unread


def _role_doc(resources: dict, role: str) -> dict:
    (pol,) = resources[role]["Properties"]["Policies"]
    return pol["PolicyDocument"]


def test_job_instance_role_allows_every_aws_call_a_job_makes(resources):
    sources = [
        REPO / "nlpfleet" / "instance.py",
        REPO / "nlpfleet" / "jobs_preprocess.py",
        REPO / "inference" / "artifact.py",
        *sorted((REPO / "training").glob("*.py")),
    ]
    calls = aws_calls([p for p in sources if p.exists()])
    assert {"get_object", "put_object"} <= set(calls)
    # progress and result through chalicelib.jobs_store.update: get_item, then a conditional
    # put_item (its list/scan paths serve the API, not the worker)
    calls.update({"get_item": ["dynamodb:GetItem"], "put_item": ["dynamodb:PutItem"]})
    doc = _role_doc(resources, "JobInstanceRole")
    missing = {op: a for op, a in calls.items() if not any(allows(doc, x) for x in a)}
    assert not missing, f"JobInstanceRole lacks: {missing}"


def test_inference_instance_role_allows_the_server_and_agent_calls_and_model_fetches(resources):
    sources = [REPO / "inference" / n for n in ("server.py", "agent.py", "runtime.py")]
    calls = aws_calls([p for p in sources if p.exists()])
    calls.update({"get_object": ["s3:GetObject"], "list_objects_v2": ["s3:ListBucket"]})  # fetch_artifact
    doc = _role_doc(resources, "InferenceInstanceRole")
    missing = {op: a for op, a in calls.items() if not any(allows(doc, x) for x in a)}
    assert not missing, f"InferenceInstanceRole lacks: {missing}"
    # an inference instance can never write to the bucket or the job table
    assert not any(allows(doc, a) for a in ("s3:PutObject", "s3:DeleteObject", "dynamodb:PutItem"))


def test_image_reads_user_data_only_through_an_imdsv2_session(tmp_path):
    """nlpfleet-boot asks IMDS for a session token first (the launch templates refuse IMDSv1)."""
    import http.server
    import threading

    boot = _load_module("nlpfleet_boot", REPO / "ami" / "files" / "nlpfleet-boot.py")
    body = b'{"role": "inference"}'
    seen = []

    class Imds(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            seen.append(("PUT", self.path, self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")))
            self._send(200, b"tok-1")

        def do_GET(self):
            seen.append(("GET", self.path, self.headers.get("X-aws-ec2-metadata-token")))
            ok = (
                self.headers.get("X-aws-ec2-metadata-token") == "tok-1"
            )  # IMDSv2 only, like HttpTokens=required
            self._send(200 if ok else 401, body if ok else b"")

        def _send(self, code, data):
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Imds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert boot.fetch_user_data(url, sleep=lambda s: None) == body
        assert seen == [("PUT", "/latest/api/token", "300"), ("GET", "/latest/user-data", "tok-1")]
    finally:
        server.shutdown()
    with pytest.raises(boot.BootError, match="after 2 tries"):
        boot.fetch_user_data(url, timeout_s=0.5, tries=2, sleep=lambda s: None)  # nobody listening
