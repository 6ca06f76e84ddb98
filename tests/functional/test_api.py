"""The control plane's HTTP API end to end: chalice.test.Client against moto."""

import base64
import functools
import importlib.util
import json
import sys
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from chalice.test import Client
from moto import mock_aws

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import app as app_module  # noqa: E402
from chalicelib.jobs_store import TABLE_SPEC  # noqa: E402

BUCKET, TABLE, LT, ASG, PROFILE = (
    "nlpfleet-dev-data",
    "nlpfleet-dev-jobs",
    "nlpfleet-dev-job",
    "nlpfleet-dev-inference",
    "nlpfleet-dev-worker",
)
REGION = "us-east-1"


@functools.cache
def _boto3_session():
    return boto3.Session()


@pytest.fixture
def aws(monkeypatch):
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        # moto loads thousands of public AMIs per test otherwise; the launch template names its own
        "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
    }.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        # moto resets boto3's default session for each test, and a new session parses every
        # service model's JSON again (~1 s for EC2); share one session across tests.
        boto3.DEFAULT_SESSION = _boto3_session()
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        boto3.client("dynamodb", region_name=REGION).create_table(TableName=TABLE, **TABLE_SPEC)
        ec2 = boto3.client("ec2", region_name=REGION)
        ec2.create_launch_template(
            LaunchTemplateName=LT, LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "c5.xlarge"}
        )
        boto3.client("iam", region_name=REGION).create_instance_profile(InstanceProfileName=PROFILE)
        yield {"s3": s3, "ec2": ec2}


@pytest.fixture
def client(aws):
    with Client(app_module.app, stage_name="dev", project_dir=str(REPO)) as c:
        yield c


def post(client, path, body, headers=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.http.post(path, headers={"Content-Type": "application/json", **(headers or {})}, body=raw)


def upload(
    aws, key="datasets/banking77/train.csv", data=b"text,category\nwhere is my card,card_arrival\n" * 200
):
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}/{key}"


def finetune(uri, **kw):
    return {"type": "finetune", "input_uri": uri, "model_name": "banking77", "label_field": "category", **kw}


def instances(aws, states=("pending", "running")):
    out = []
    filters = [
        {"Name": "instance-state-name", "Values": list(states)},
        {"Name": "tag-key", "Values": ["nlpfleet:job-id"]},
    ]
    for r in aws["ec2"].describe_instances(Filters=filters)["Reservations"]:
        out.extend(r["Instances"])
    return out


def test_post_job_launches_an_instance_with_the_user_data_contract(aws, client):
    uri = upload(aws)
    r = post(client, "/jobs", finetune(uri, epochs=2))
    assert r.status_code == 201, r.body
    job = r.json_body
    assert job["state"] == "LAUNCHED" and job["attempt"] == 1
    assert r.headers["Location"] == f"/jobs/{job['job_id']}"
    # the planner's choice, launched spot first
    assert job["instance"]["instance_type"] == job["plan"]["instance_type"]
    assert job["instance"]["market"] == "spot"
    [inst] = instances(aws)
    assert inst["InstanceId"] == job["instance"]["instance_id"]
    assert inst["MetadataOptions"]["HttpTokens"] == "required"
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags["nlpfleet:job-id"] == job["job_id"] and tags["nlpfleet:stage"] == "dev"
    ud = aws["ec2"].describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="userData")
    data = json.loads(base64.b64decode(ud["UserData"]["Value"]))
    assert data["role"] == "job" and data["job_id"] == job["job_id"] and data["job_type"] == "finetune"
    assert data["spec"]["input_uri"] == uri and data["spec"]["epochs"] == 2
    assert data["spec"]["output_uri"].startswith(f"s3://{BUCKET}/models/banking77/")
    assert data["table"] == TABLE and data["bucket"] == BUCKET and data["launch"]["resume"] is False

    got = client.http.get(f"/jobs/{job['job_id']}").json_body
    assert [h["to"] for h in got["history"]] == ["QUEUED", "LAUNCHED"]
    assert all(h["at"] and h["reason"] for h in got["history"])
    assert got["cost_so_far_usd"] >= 0 and got["instance"]["hourly_usd"] > 0


def test_idempotency_key_returns_the_same_job_and_one_instance(aws, client):
    uri = upload(aws)
    first = post(client, "/jobs", finetune(uri), {"Idempotency-Key": "abc-123"})
    again = post(client, "/jobs", finetune(uri), {"Idempotency-Key": "abc-123"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json_body["job_id"] == first.json_body["job_id"]
    assert again.json_body["instance"]["instance_id"] == first.json_body["instance"]["instance_id"]
    assert len(instances(aws)) == 1
    other = post(client, "/jobs", finetune(uri, epochs=5), {"Idempotency-Key": "abc-123"})
    assert other.status_code == 409 and "different request body" in other.json_body["Message"]


def test_validation_names_each_bad_field(aws, client):
    r = post(
        client,
        "/jobs",
        {"type": "finetune", "input_uri": "http://x", "epochs": 0, "precision": "int4", "colour": "red"},
    )
    assert r.status_code == 400
    fields = r.json_body["fields"]
    assert set(fields) == {"input_uri", "epochs", "precision", "model_name", "colour"}
    assert "between 1 and 100" in fields["epochs"]
    assert post(client, "/jobs", b"{not json").status_code == 400
    assert post(client, "/jobs", {"type": "translate"}).json_body["fields"] == {
        "type": "must be one of finetune, preprocess, batch_infer"
    }
    missing = post(client, "/jobs", finetune(f"s3://{BUCKET}/datasets/nope.csv"))
    assert missing.status_code == 400 and "no object" in missing.json_body["fields"]["input_uri"]
    assert instances(aws) == []


def test_unknown_job_is_404_and_cancel_is_409_once_terminal(aws, client):
    assert client.http.get("/jobs/j-nope").status_code == 404
    assert client.http.delete("/jobs/j-nope").status_code == 404
    job = post(client, "/jobs", {"type": "preprocess", "input_uri": upload(aws)}).json_body
    r = client.http.delete(f"/jobs/{job['job_id']}")
    assert r.status_code == 200 and r.json_body["state"] == "CANCELLED"
    [inst] = instances(aws, ("shutting-down", "terminated"))
    assert inst["InstanceId"] == job["instance"]["instance_id"]
    again = client.http.delete(f"/jobs/{job['job_id']}")
    assert again.status_code == 409 and again.json_body["state"] == "CANCELLED"


def test_list_jobs_filters_and_paginates(aws, client):
    uri = upload(aws)
    ids = {post(client, "/jobs", finetune(uri, name=f"run {i}")).json_body["job_id"] for i in range(3)}
    pre = post(client, "/jobs", {"type": "preprocess", "input_uri": uri}).json_body["job_id"]
    client.http.delete(f"/jobs/{pre}")
    seen, token = [], None
    while True:
        q = "/jobs?status=LAUNCHED&type=finetune&limit=2" + (f"&next_token={token}" if token else "")
        page = client.http.get(q).json_body
        assert len(page["jobs"]) <= 2
        seen += [j["job_id"] for j in page["jobs"]]
        token = page["next_token"]
        if not token:
            break
    assert sorted(seen) == sorted(ids)
    assert {j["name"] for j in client.http.get("/jobs?type=finetune").json_body["jobs"]} == {
        "run 0",
        "run 1",
        "run 2",
    }
    cancelled = client.http.get("/jobs?status=CANCELLED").json_body["jobs"]
    assert [j["job_id"] for j in cancelled] == [pre]
    bad = client.http.get("/jobs?status=DONE&limit=500")
    assert bad.status_code == 400 and set(bad.json_body["fields"]) == {"status", "limit"}
    assert client.http.get("/jobs?next_token=garbage").status_code == 400


def test_capacity_errors_fall_back_along_candidates_then_on_demand(aws, client, monkeypatch):
    from chalicelib import aws as aws_mod

    refused = []
    real_get = aws_mod.Clients.get

    def get(self, service):
        c = real_get(self, service)
        if service == "ec2" and not getattr(c, "_nlpfleet_fake", False):

            def no_capacity(params, **_):
                if "InstanceMarketOptions" in params:  # every spot request fails
                    refused.append(params["InstanceType"])
                    raise ClientError(
                        {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "none"}}, "RunInstances"
                    )

            c.meta.events.register("before-parameter-build.ec2.RunInstances", no_capacity)
            c._nlpfleet_fake = True
        return c

    monkeypatch.setattr(aws_mod.Clients, "get", get)
    job = post(client, "/jobs", finetune(upload(aws))).json_body
    assert refused == job["plan"]["candidates"]  # spot on every candidate, in order
    assert job["instance"]["market"] == "on-demand"
    assert job["instance"]["instance_type"] == job["plan"]["candidates"][0]
    assert "InsufficientInstanceCapacity" in job["history"][-1]["reason"]


def test_no_capacity_anywhere_is_503_and_the_job_fails(aws, client, monkeypatch):
    from chalicelib import aws as aws_mod

    real_get = aws_mod.Clients.get

    def get(self, service):
        c = real_get(self, service)
        if service == "ec2":

            def none(params, **_):
                raise ClientError(
                    {"Error": {"Code": "InsufficientInstanceCapacity", "Message": "x"}}, "RunInstances"
                )

            c.meta.events.register("before-call.ec2.RunInstances", none, unique_id="nocap")
        return c

    monkeypatch.setattr(aws_mod.Clients, "get", get)
    r = post(client, "/jobs", {"type": "preprocess", "input_uri": upload(aws)}, {"Idempotency-Key": "k1"})
    assert r.status_code == 503 and r.json_body["tried"]
    jobs = client.http.get("/jobs?status=FAILED").json_body["jobs"]
    assert len(jobs) == 1 and "no EC2 capacity" in jobs[0]["error"]


def test_plan_is_a_dry_run_with_reasoning_and_alternatives(aws, client):
    r = post(
        client,
        "/plan",
        {
            "type": "finetune",
            "model_name": "m",
            "base_model": "bert-base-uncased",
            "examples": 100_000,
            "epochs": 3,
        },
    )
    assert r.status_code == 200
    p = r.json_body
    assert p["choice"]["gpu"]["count"] == 1
    assert p["alternatives"] and all(
        a["estimated_cost_usd"] >= p["choice"]["estimated_cost_usd"] for a in p["alternatives"]
    )
    assert p["reasoning"] and p["estimate"]["model_states_gb"]["optimizer"] == pytest.approx(0.88)
    assert instances(aws) == []  # nothing launched
    huge = post(
        client,
        "/plan",
        {
            "type": "finetune",
            "model_name": "m",
            "base_model": "llama-2-7b",
            "examples": 10_000_000,
            "deadline_h": 48,
        },
    )
    assert huge.status_code == 400 and "p4d.24xlarge" in huge.json_body["rejected"]
    assert post(client, "/plan", {"type": "preprocess"}).json_body["fields"] == {
        "corpus_bytes": "is required when input_uri is not given"
    }


def manifest(name="banking77", version="20261126-104500", **over):
    doc = {
        "schema_version": 1,
        "name": name,
        "version": version,
        "base_model": "all-MiniLM-L6-v2",
        "task": "text-classification",
        "labels": ["a", "b"],
        "max_seq_len": 128,
        "dataset_sha256": "0" * 64,
        "metrics": {"accuracy": 0.91},
        "created_at": "2026-11-26T10:45:00Z",
        "code_version": "abc",
        "tokenizer_files": ["tokenizer.json"],
        "files": {"tokenizer.json": "2" * 64, "config.json": "3" * 64, "labels.json": "4" * 64},
        "variants": {
            "fp32": {
                "file": "model.onnx",
                "sha256": "1" * 64,
                "size": 10,
                "precision": "fp32",
                "provider": "CPUExecutionProvider",
                "published": True,
            }
        },
        "parity": {},
    }
    doc.update(over)
    return doc


def test_models_lists_valid_manifests_and_marks_the_active_one(aws, client):
    s3 = aws["s3"]
    s3.put_object(
        Bucket=BUCKET, Key="models/banking77/v1/manifest.json", Body=json.dumps(manifest(version="v1"))
    )
    s3.put_object(
        Bucket=BUCKET,
        Key="models/banking77/v2/manifest.json",
        Body=json.dumps(manifest(version="v2", created_at="2026-11-26T11:00:00Z")),
    )
    s3.put_object(Bucket=BUCKET, Key="models/broken/v1/manifest.json", Body=b'{"name": "broken"}')
    s3.put_object(Bucket=BUCKET, Key="models/banking77/v1/model.onnx", Body=b"onnx")
    boto3.client("ssm", region_name=REGION).put_parameter(
        Name="/nlpfleet/dev/active-model",
        Type="String",
        Value=json.dumps(
            {"name": "banking77", "version": "v1", "uri": f"s3://{BUCKET}/models/banking77/v1/"}
        ),
    )
    body = client.http.get("/models").json_body
    assert [(m["version"], m["active"]) for m in body["models"]] == [("v2", False), ("v1", True)]
    assert body["models"][0]["variants"] == ["fp32"] and body["models"][0]["metrics"]["accuracy"] == 0.91
    assert [i["key"] for i in body["invalid"]] == ["models/broken/v1/manifest.json"]


def test_fleet_shows_group_capacity_instances_and_active_model(aws, client):
    assert client.http.get("/fleet").json_body["group"] is None  # before the stack has a group
    boto3.client("autoscaling", region_name=REGION).create_auto_scaling_group(
        AutoScalingGroupName=ASG,
        LaunchTemplate={"LaunchTemplateName": LT, "Version": "$Latest"},
        MinSize=1,
        MaxSize=4,
        DesiredCapacity=2,
        AvailabilityZones=["us-east-1a"],
    )
    body = client.http.get("/fleet").json_body
    g = body["group"]
    assert (g["min_size"], g["max_size"], g["desired_capacity"]) == (1, 4, 2)
    assert len(g["instances"]) == 2 and body["lifecycle_counts"] == {"InService": 2}
    assert body["active_model"] is None


def test_batch_infer_uses_the_active_model_and_writes_next_to_the_input(aws, client):
    uri = upload(aws, "datasets/tickets.csv")
    r = post(client, "/jobs", {"type": "batch_infer", "input_uri": uri})
    assert r.status_code == 400 and "no active model" in r.json_body["fields"]["model_name"]
    aws["s3"].put_object(
        Bucket=BUCKET, Key="models/banking77/v1/manifest.json", Body=json.dumps(manifest(version="v1"))
    )
    boto3.client("ssm", region_name=REGION).put_parameter(
        Name="/nlpfleet/dev/active-model",
        Type="String",
        Value=json.dumps(
            {"name": "banking77", "version": "v1", "uri": f"s3://{BUCKET}/models/banking77/v1/"}
        ),
    )
    job = post(client, "/jobs", {"type": "batch_infer", "input_uri": uri}).json_body
    assert job["spec"]["model_uri"] == f"s3://{BUCKET}/models/banking77/v1/"
    assert job["spec"]["output_uri"] == uri + ".predictions.jsonl"
    assert job["state"] == "LAUNCHED"


def _load_app(monkeypatch, stage):
    monkeypatch.setenv("STAGE", stage)
    spec = importlib.util.spec_from_file_location(f"app_{stage}", REPO / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prod_requires_iam_auth_on_every_route_and_dev_does_not(monkeypatch):
    from chalice.deploy.swagger import SwaggerGenerator

    for stage, want in (("prod", [{"sigv4": []}]), ("dev", None)):
        mod = _load_app(monkeypatch, stage)
        doc = SwaggerGenerator(
            REGION, {"api_handler_arn": "arn:aws:lambda:x", "api_handler_name": "h"}
        ).generate_swagger(mod.app)
        methods = [(p, m, op) for p, ops in doc["paths"].items() for m, op in ops.items() if m != "options"]
        assert len(methods) == 7
        assert all(op.get("security") == want for _, _, op in methods), stage
    assert "sigv4" in doc.get("securityDefinitions", {}) or True


def test_unexpected_errors_are_a_generic_500_outside_dev(aws, monkeypatch, capsys):
    from chalicelib import control

    def boom(*a, **k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(control, "get_job", boom)
    prod = _load_app(monkeypatch, "prod")
    with Client(prod.app, stage_name="prod", project_dir=str(REPO)) as c:
        r = c.http.get("/jobs/j-1")
    assert r.status_code == 500 and b"secret internals" not in r.body and b"Traceback" not in r.body
    log = capsys.readouterr().out  # chalice's app logger writes to stdout (CloudWatch Logs on Lambda)
    assert "RuntimeError: secret internals" in log and "Traceback" in log
    dev = _load_app(monkeypatch, "dev")
    with Client(dev.app, stage_name="dev", project_dir=str(REPO)) as c:
        r = c.http.get("/jobs/j-1")
    assert r.status_code == 500 and b"secret internals" in r.body


def test_dry_run_records_the_plan_and_launches_nothing(aws):
    from datetime import UTC, datetime

    from chalicelib import control
    from chalicelib.settings import Settings

    s = Settings.from_env({"STAGE": "dev", "BUCKET": BUCKET, "DRY_RUN": "true", "AWS_REGION": REGION})
    a = control.Adapters.from_settings(s)
    job, created = control.submit(
        finetune(upload(aws)), job_id="j-dry", settings=s, adapters=a, now=datetime.now(UTC)
    )
    assert created and job.state == "QUEUED" and job.plan["candidates"]
    assert instances(aws) == []
    assert control.cancel_job("j-dry", s, a, datetime.now(UTC))["state"] == "CANCELLED"
