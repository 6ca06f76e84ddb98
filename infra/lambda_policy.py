"""Generate the control plane's least-privilege IAM policy files, ``.chalice/policy-<stage>.json``.

Chalice copies the file verbatim into the ``AWS::IAM::Role`` of ``chalice package``; the
CloudFormation intrinsics in it (``Fn::Sub`` on ``${DataBucket}``, ``${JobsTable.Arn}``, ...)
resolve against the resources that ``infra/nlpfleet.yaml`` merges into the same template, so every
statement is scoped to this stack's own bucket, tables, launch template, group and parameter.
(Such a file only works with ``chalice package``: ``chalice deploy`` cannot resolve intrinsics.)

    python infra/lambda_policy.py          # rewrite both stages' files
    python infra/lambda_policy.py --check  # exit 1 if a file differs from what this generates

Each statement says which calls in chalicelib/ need it; tests/unit/test_stack_policy.py checks
that every AWS operation chalicelib/ calls is allowed here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("dev", "prod")
ARN = "arn:${AWS::Partition}"
EC2 = ARN + ":ec2:${AWS::Region}:${AWS::AccountId}"


def sub(text: str) -> dict:
    return {"Fn::Sub": text}


def policy(stage: str) -> dict:
    job_lt = sub(EC2 + ":launch-template/${JobLaunchTemplate}")
    asg = sub(
        ARN + ":autoscaling:${AWS::Region}:${AWS::AccountId}:autoScalingGroup:*:"
        f"autoScalingGroupName/nlpfleet-{stage}-inference"
    )
    statements = [
        {
            "Sid": "OwnLogs",  # Lambda's own log groups (function names start with the stack name)
            "Effect": "Allow",
            "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": [
                sub(ARN + ":logs:${AWS::Region}:${AWS::AccountId}:log-group:/aws/lambda/${AWS::StackName}-*"),
                sub(
                    ARN + ":logs:${AWS::Region}:${AWS::AccountId}:log-group:/aws/lambda/${AWS::StackName}-*:*"
                ),
            ],
        },
        {
            "Sid": "Jobs",  # jobs_store: put_item (conditional), get_item, query (by_state, by_instance), scan
            "Effect": "Allow",
            "Action": ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:Query", "dynamodb:Scan"],
            "Resource": [sub("${JobsTable.Arn}"), sub("${JobsTable.Arn}/index/*")],
        },
        {
            "Sid": "ScalingState",  # fleet: policy and per-instance records (get/put/delete_item, scan)
            "Effect": "Allow",
            "Action": ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:DeleteItem", "dynamodb:Scan"],
            "Resource": [sub("${ScalingStateTable.Arn}")],
        },
        {
            # storage: head_object (a job input's size: any key of the bucket a spec names),
            # get_object (manifests, dataset sidecars), list_objects_v2 (models/, input prefixes)
            "Sid": "ReadData",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:GetObjectVersion"],
            "Resource": sub("${DataBucket.Arn}/*"),
        },
        {
            "Sid": "ListData",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": sub("${DataBucket.Arn}"),
        },
        {
            "Sid": "ActiveModel",  # storage: get_parameter, put_parameter (rollout)
            "Effect": "Allow",
            "Action": ["ssm:GetParameter", "ssm:PutParameter"],
            "Resource": sub(
                ARN + f":ssm:${{AWS::Region}}:${{AWS::AccountId}}:parameter/nlpfleet/{stage}/active-model"
            ),
        },
        {
            "Sid": "LaunchFromJobTemplate",  # launcher: run_instances with the job launch template
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": job_lt,
        },
        {
            "Sid": "LaunchOnlyThroughJobTemplate",
            "Effect": "Allow",
            "Action": "ec2:RunInstances",
            "Resource": [
                sub(EC2 + ":instance/*"),
                sub(EC2 + ":volume/*"),
                sub(EC2 + ":network-interface/*"),
                sub(EC2 + ":subnet/*"),
                sub(EC2 + ":security-group/*"),
                sub(EC2 + ":spot-instances-request/*"),
                sub(ARN + ":ec2:${AWS::Region}::image/*"),
            ],
            "Condition": {"ArnLike": {"ec2:LaunchTemplate": job_lt}},
        },
        {
            "Sid": "TagAtLaunch",  # launcher: TagSpecifications of run_instances
            "Effect": "Allow",
            "Action": "ec2:CreateTags",
            "Resource": [
                sub(EC2 + ":instance/*"),
                sub(EC2 + ":volume/*"),
                sub(EC2 + ":spot-instances-request/*"),
            ],
            "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}},
        },
        {
            "Sid": "TerminateOwnJobInstances",  # launcher: terminate_instances (only instances it tagged)
            "Effect": "Allow",
            "Action": "ec2:TerminateInstances",
            "Resource": sub(EC2 + ":instance/*"),
            "Condition": {"Null": {"aws:ResourceTag/nlpfleet:job-id": "false"}},
        },
        {
            "Sid": "PassJobInstanceRole",  # the job launch template's instance profile
            "Effect": "Allow",
            "Action": "iam:PassRole",
            "Resource": sub("${JobInstanceRole.Arn}"),
            "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        },
        {
            # fleet: set_desired_capacity, update_auto_scaling_group (capacity floors: MinSize),
            # complete_lifecycle_action
            "Sid": "FleetControl",
            "Effect": "Allow",
            "Action": [
                "autoscaling:SetDesiredCapacity",
                "autoscaling:UpdateAutoScalingGroup",
                "autoscaling:CompleteLifecycleAction",
            ],
            "Resource": asg,
        },
        {
            # launcher: describe_instances; fleet: describe_auto_scaling_groups, get_metric_data.
            # These APIs support no resource-level permissions.
            "Sid": "ReadOnlyWithoutResourceScope",
            "Effect": "Allow",
            "Action": [
                "ec2:DescribeInstances",
                "autoscaling:DescribeAutoScalingGroups",
                "cloudwatch:GetMetricData",
            ],
            "Resource": "*",
        },
    ]
    return {"Version": "2012-10-17", "Statement": statements}


def render(stage: str) -> str:
    return json.dumps(policy(stage), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    stale = []
    for stage in STAGES:
        path = REPO / ".chalice" / f"policy-{stage}.json"
        text = render(stage)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        print("out of date (run python infra/lambda_policy.py):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
