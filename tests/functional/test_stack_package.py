"""The one deployable template: `chalice package --merge-template infra/nlpfleet.yaml`, for both
stages, passes cfn-lint and wires Chalice's functions to the stack's own resources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import cfnlint
import pytest
from cfnlint.decode import decode

REPO = Path(__file__).resolve().parents[2]
STAGES = ("dev", "prod")
CHALICE = Path(sys.executable).with_name("chalice")
CFN_LINT = Path(sys.executable).with_name("cfn-lint")
# Names the stack, not config.json, must decide: they refer to resources the stack creates.
STACK_NAMES = {
    "BUCKET": {"Ref": "DataBucket"},
    "JOBS_TABLE": {"Ref": "JobsTable"},
    "INFERENCE_ASG": {"Ref": "InferenceGroup"},
    "INSTANCE_PROFILE": {"Fn::GetAtt": ["JobInstanceProfile", "Arn"]},
    "LAUNCH_TEMPLATE": {"Fn::Sub": "nlpfleet-${Stage}-job"},
    "ACTIVE_MODEL_PARAM": {"Fn::Sub": "/nlpfleet/${Stage}/active-model"},
}


def project_copy(dest: Path) -> Path:
    """What `chalice package` reads (app, chalicelib, .chalice), copied so that its deployment
    cache does not race other test runs in the checkout's .chalice/deployments."""
    shutil.copy(REPO / "app.py", dest)
    shutil.copy(REPO / "requirements.txt", dest)
    shutil.copytree(REPO / "chalicelib", dest / "chalicelib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        REPO / ".chalice", dest / ".chalice", ignore=shutil.ignore_patterns("deployments", "venv")
    )
    return dest


def package(stage: str, project: Path, out: Path) -> Path:
    env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1"}
    cmd = [str(CHALICE), "--project-dir", str(project), "package", "--stage", stage,
           "--merge-template", str(REPO / "infra" / "nlpfleet.yaml"), str(out)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return out / "sam.yaml"


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> dict[str, Path]:
    project = project_copy(tmp_path_factory.mktemp("project"))
    return {stage: package(stage, project, tmp_path_factory.mktemp(f"pkg-{stage}")) for stage in STAGES}


@pytest.fixture(scope="module")
def merged(packaged) -> dict[str, dict]:
    out = {}
    for stage, path in packaged.items():
        template, matches = decode(str(path))
        assert not matches, matches
        out[stage] = template
    return out


def _functions(template: dict) -> dict[str, dict]:
    return {k: v for k, v in template["Resources"].items() if v.get("Type") == "AWS::Serverless::Function"}


def test_cfn_lint_passes_on_the_merged_template(packaged):
    r = subprocess.run(
        [str(CFN_LINT), *(str(p) for p in packaged.values())], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_resource_in_the_merged_template_has_a_type(merged):
    # a function override in infra/ for a handler app.py no longer has would be typeless
    for template in merged.values():
        typeless = [k for k, v in template["Resources"].items() if "Type" not in v]
        assert not typeless, f"infra/nlpfleet.yaml overrides functions chalice did not generate: {typeless}"


def test_functions_run_on_a_runtime_lambda_still_creates(merged):
    # cfn-lint's copy of Lambda's runtime deprecation schedule
    lifecycle = json.loads(
        (Path(cfnlint.__file__).parent / "data/AdditionalSpecs/LmbdRuntimeLifecycle.json").read_text()
    )
    for template in merged.values():
        for lid, fn in _functions(template).items():
            runtime = fn["Properties"]["Runtime"]
            block = lifecycle.get(runtime, {}).get("create-block")
            assert block is None or date.fromisoformat(block) > date.today(), (
                f"{lid} runs on {runtime} (creation blocked since {block}): add it to infra/nlpfleet.yaml"
            )


def test_functions_use_the_stacks_names_not_hard_coded_ones(merged):
    for stage, template in merged.items():
        glob = template["Globals"]["Function"]["Environment"]["Variables"]
        for lid, fn in _functions(template).items():
            env = {**glob, **fn["Properties"].get("Environment", {}).get("Variables", {})}
            for key, want in STACK_NAMES.items():
                assert env[key] == want, f"{stage} {lid}: {key}={env[key]!r}, expected {want}"
            assert env["STAGE"] in (stage, {"Ref": "Stage"})


def test_lambda_roles_carry_the_stage_policy_with_stack_references(merged):
    for stage, template in merged.items():
        want = json.loads((REPO / ".chalice" / f"policy-{stage}.json").read_text())
        for lid, fn in _functions(template).items():
            role_id = fn["Properties"]["Role"]["Fn::GetAtt"][0]
            role = template["Resources"][role_id]
            assert role["Type"] == "AWS::IAM::Role"
            (pol,) = role["Properties"]["Policies"]
            assert json.loads(json.dumps(pol["PolicyDocument"])) == want, lid
            assert "ManagedPolicyArns" not in role["Properties"], lid


def test_s3_rule_matches_only_the_stacks_bucket(merged):
    for template in merged.values():
        patterns = [
            ev["Properties"]["Pattern"]
            for fn in _functions(template).values()
            for ev in (fn["Properties"].get("Events") or {}).values()
            if ev["Type"] == "CloudWatchEvent" and "aws.s3" in ev["Properties"]["Pattern"].get("source", [])
        ]
        assert patterns, "no S3 Object Created rule in the merged template"
        for pattern in patterns:
            assert pattern["detail-type"] == ["Object Created"]
            assert pattern["detail"]["bucket"]["name"] == [{"Ref": "DataBucket"}]


def test_lifecycle_rules_match_only_the_stacks_inference_group(merged):
    for template in merged.values():
        patterns = [
            ev["Properties"]["Pattern"]
            for fn in _functions(template).values()
            for ev in (fn["Properties"].get("Events") or {}).values()
            if ev["Type"] == "CloudWatchEvent"
            and "aws.autoscaling" in ev["Properties"]["Pattern"].get("source", [])
        ]
        kinds = {t for p in patterns for t in p["detail-type"]}
        assert kinds == {"EC2 Instance-launch Lifecycle Action", "EC2 Instance-terminate Lifecycle Action"}
        for pattern in patterns:
            assert pattern["detail"]["AutoScalingGroupName"] == [{"Ref": "InferenceGroup"}]


def test_stack_parameters_are_vpc_subnets_and_ami(merged):
    params = merged["dev"]["Parameters"]
    assert params["VpcId"]["Type"] == "AWS::EC2::VPC::Id"
    assert params["SubnetIds"]["Type"] == "List<AWS::EC2::Subnet::Id>"
    assert params["AmiId"]["Type"] == "AWS::EC2::Image::Id"
    assert merged["dev"]["Transform"] == "AWS::Serverless-2016-10-31"


def test_prod_api_requires_iam_authorization_on_every_route(merged):
    body = merged["prod"]["Resources"]["RestAPI"]["Properties"]["DefinitionBody"]
    assert body["securityDefinitions"]["sigv4"]["x-amazon-apigateway-authtype"] == "awsSigv4"
    routes = [(path, method, op) for path, methods in body["paths"].items() for method, op in methods.items()]
    assert {("/jobs", "post"), ("/fleet", "get")} <= {(p, m) for p, m, _ in routes}
    for path, method, op in routes:
        if method == "options":  # CORS preflight, if ever enabled, carries no credentials
            continue
        assert op.get("security") == [{"sigv4": []}], f"{method.upper()} {path} is open in prod"
