"""The infra part of the template creates in moto's CloudFormation (the local stack's AWS), and
what it creates behaves as the control plane and the instances expect: a job launched the way
chalicelib/launcher.py launches lands in the stack's subnet with the job profile, and the
inference group launches instances whose user data the image accepts.

Gaps of moto 5.2.5 this works around, as the local stack does: SAM Globals and Chalice's functions
are not part of what moto builds; AWS::S3::BucketPolicy and AWS::AutoScaling::LifecycleHook are
skipped; a bucket's NotificationConfiguration, PublicAccessBlockConfiguration and versioning
are not applied by moto's CloudFormation (tests/unit/test_stack_template.py checks them in the
template).
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import warnings
from pathlib import Path

import boto3
import pytest
from cfnlint.decode import decode
from moto import mock_aws

REPO = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS::")


def infra_only_template() -> dict:
    """infra/nlpfleet.yaml without what only exists after `chalice package` (SAM Globals and the
    overrides of Chalice's functions)."""
    template, matches = decode(str(REPO / "infra" / "nlpfleet.yaml"))
    assert not matches, matches
    template = json.loads(json.dumps(template))
    template.pop("Globals")
    template["Resources"] = {k: v for k, v in template["Resources"].items() if "Type" in v}
    return template


@pytest.fixture(scope="module")
def stack():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            # moto would load thousands of public AMIs; the stack gets one registered here
            "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
        }.items():
            mp.setenv(key, value)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        with mock_aws():
            yield _create_stack()


def _create_stack() -> dict:
    """A VPC with two subnets and an AMI, then the infra part of the template on top."""
    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24", AvailabilityZone=f"{REGION}{az}")["Subnet"][
            "SubnetId"
        ]
        for i, az in enumerate("ab", start=1)
    ]
    ami = ec2.register_image(Name="nlpfleet-gpu-test", RootDeviceName="/dev/sda1")["ImageId"]
    cf = boto3.client("cloudformation", region_name=REGION)
    params = {
        "Stage": "dev",
        "VpcId": vpc,
        "SubnetIds": ",".join(subnets),
        "LoadBalancerSubnetIds": ",".join(subnets),
        "AmiId": ami,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # moto warns about the resource types it skips
        cf.create_stack(
            StackName="nlpfleet-dev",
            TemplateBody=json.dumps(infra_only_template()),
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
            Capabilities=["CAPABILITY_IAM"],
        )
    desc = cf.describe_stacks(StackName="nlpfleet-dev")["Stacks"][0]
    assert desc["StackStatus"] == "CREATE_COMPLETE", desc.get("StackStatusReason")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in desc["Outputs"]}
    physical = {
        r["LogicalResourceId"]: r["PhysicalResourceId"]
        for r in cf.list_stack_resources(StackName="nlpfleet-dev")["StackResourceSummaries"]
        if r.get("LogicalResourceId")  # moto lists the resource types it skipped without one
    }
    return {
        "ec2": ec2,
        "ami": ami,
        "subnets": subnets,
        "vpc": vpc,
        "outputs": outputs,
        "physical": physical,
    }


def test_stack_creates_bucket_tables_log_group_and_names_them_in_outputs(stack):
    out = stack["outputs"]
    s3 = boto3.client("s3", region_name=REGION)
    enc = s3.get_bucket_encryption(Bucket=out["BucketName"])["ServerSideEncryptionConfiguration"]
    assert enc["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"

    ddb = boto3.client("dynamodb", region_name=REGION)
    jobs = ddb.describe_table(TableName=out["JobsTableName"])["Table"]
    assert jobs["TableName"] == "nlpfleet-dev-jobs"
    assert {i["IndexName"] for i in jobs["GlobalSecondaryIndexes"]} == {"by_state", "by_instance"}
    assert (
        ddb.describe_table(TableName="nlpfleet-dev-scaling")["Table"]["KeySchema"][0]["AttributeName"] == "pk"
    )

    logs = boto3.client("logs", region_name=REGION)
    (group,) = logs.describe_log_groups(logGroupNamePrefix="/nlpfleet/dev/instances")["logGroups"]
    assert group["retentionInDays"] == 30
    assert out["ActiveModelParameter"] == "/nlpfleet/dev/active-model"


def test_a_job_launches_from_the_stack_template_into_its_network_with_the_job_profile(stack):
    ec2 = stack["ec2"]
    user_data = {"role": "job", "job_id": "j-1", "job_type": "finetune", "spec": {}, "bucket": "b",
                 "table": "nlpfleet-dev-jobs", "region": REGION, "stage": "dev", "endpoint_url": None}  # fmt: skip
    resp = ec2.run_instances(
        LaunchTemplate={
            "LaunchTemplateName": stack["outputs"]["JobLaunchTemplateName"],
            "Version": "$Latest",
        },
        InstanceType="g4dn.xlarge",
        MinCount=1,
        MaxCount=1,
        UserData=base64.b64encode(json.dumps(user_data).encode()).decode(),
    )
    inst = resp["Instances"][0]
    assert inst["ImageId"] == stack["ami"]
    tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
    assert (tags["nlpfleet:stage"], tags["nlpfleet:role"]) == ("dev", "job")
    data = ec2.describe_launch_template_versions(LaunchTemplateName="nlpfleet-dev-job")[
        "LaunchTemplateVersions"
    ][0]["LaunchTemplateData"]
    # The launch names no subnet: EC2 takes it (and the security group) from the template's
    # network interface. (moto does not apply a template's network interfaces, so this reads the
    # template instead of the instance.)
    (nic,) = data["NetworkInterfaces"]
    assert nic["SubnetId"] == stack["subnets"][0]
    assert nic["Groups"] == [stack["physical"]["JobSecurityGroup"]]
    assert data["IamInstanceProfile"]["Arn"].split("/")[-1] == stack["physical"]["JobInstanceProfile"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert all(b["Ebs"]["Encrypted"] for b in data["BlockDeviceMappings"])


def test_inference_group_launches_instances_the_image_accepts(stack):
    asg = boto3.client("autoscaling", region_name=REGION)
    name = stack["outputs"]["InferenceGroupName"]
    (group,) = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (0, 20, 0)
    assert set(group["VPCZoneIdentifier"].split(",")) == set(stack["subnets"])
    (tg_arn,) = group["TargetGroupARNs"]
    elbv2 = boto3.client("elbv2", region_name=REGION)
    (tg,) = elbv2.describe_target_groups(TargetGroupArns=[tg_arn])["TargetGroups"]
    assert (tg["HealthCheckPath"], tg["Port"]) == ("/readyz", 8080)

    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=2)  # what the autoscaler does
    (group,) = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    ids = [i["InstanceId"] for i in group["Instances"]]
    assert len(ids) == 2
    ec2 = stack["ec2"]
    for res in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
        for inst in res["Instances"]:
            assert inst["SubnetId"] in stack["subnets"]
            raw = ec2.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="userData")
            user_data = base64.b64decode(raw["UserData"]["Value"])
            doc = _boot().parse_user_data(user_data)
            assert doc["role"] == "inference"
            assert doc["bucket"] == stack["outputs"]["BucketName"]
            assert doc["table"] == "nlpfleet-dev-jobs"


def _boot():
    spec = importlib.util.spec_from_file_location(
        "nlpfleet_boot", REPO / "ami" / "files" / "nlpfleet-boot.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_infra_only_template_keeps_everything_but_the_sam_parts():
    full, _ = decode(str(REPO / "infra" / "nlpfleet.yaml"))
    infra = infra_only_template()
    typed = {k for k, v in full["Resources"].items() if "Type" in v}
    assert set(infra["Resources"]) == typed
    assert copy.deepcopy(infra["Resources"]["DataBucket"]["Properties"]["NotificationConfiguration"]) == {
        "EventBridgeConfiguration": {"EventBridgeEnabled": True}
    }
