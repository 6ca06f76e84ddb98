# ruff: noqa: F811  (pytest fixtures imported from test_api are used as parameters)
"""Event handlers end to end (chalice.test.Client + moto): EC2 state changes, spot warnings,
S3 dataset uploads and model manifests, the heartbeat sweep, including duplicated and
out-of-order deliveries."""

import base64
import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
from test_api import BUCKET, REGION, aws, client, finetune, instances, manifest, post, upload  # noqa: F401

from chalicelib import jobs as J
from chalicelib.aws import Clients
from chalicelib.jobs_store import JobsStore

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "events"


def sample(name, **detail):
    ev = json.loads((FIXTURES / name).read_text())
    for k, v in detail.items():
        if isinstance(v, dict) and isinstance(ev["detail"].get(k), dict):
            ev["detail"][k] = {**ev["detail"][k], **v}
        else:
            ev["detail"][k] = v
    return ev


def ec2_event(client, instance_id, state):
    return client.lambda_.invoke(
        "on_ec2_event", sample("ec2_state_change.json", **{"instance-id": instance_id, "state": state})
    ).payload


def spot_event(client, instance_id):
    ev = sample("ec2_spot_interruption.json", **{"instance-id": instance_id})
    return client.lambda_.invoke("on_ec2_event", ev).payload


def s3_event(client, key, size, version_id=None, time="2026-11-26T10:10:00Z"):
    name = (
        "s3_object_created_manifest.json" if key.startswith("models/") else "s3_object_created_dataset.json"
    )
    ev = sample(name, object={"key": key, "size": size, "version-id": version_id})
    ev["time"] = time
    return client.lambda_.invoke("on_object_created", ev).payload


def kill(aws, instance_id):
    aws["ec2"].terminate_instances(InstanceIds=[instance_id])


def sweep(client):
    ev = client.events.generate_cw_event("aws.events", "Scheduled Event", {}, [], region=REGION)
    return client.lambda_.invoke("sweep_heartbeats", ev).payload


def get(client, job_id):
    return client.http.get(f"/jobs/{job_id}").json_body


def launch(aws, client, **kw):
    job = post(client, "/jobs", finetune(upload(aws), **kw)).json_body
    return job["job_id"], job["instance"]["instance_id"]


def user_data(aws, instance_id):
    ud = aws["ec2"].describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return json.loads(base64.b64decode(ud["UserData"]["Value"]))


def test_running_then_duplicates_and_late_pending_change_nothing(aws, client):
    job_id, iid = launch(aws, client)
    assert ec2_event(client, iid, "running")["outcome"] == "running"
    assert get(client, job_id)["state"] == "RUNNING"
    assert ec2_event(client, iid, "running")["outcome"] == "skip"  # duplicate delivery
    assert ec2_event(client, iid, "pending")["outcome"] == "skip"  # late, out of order
    assert [h["to"] for h in get(client, job_id)["history"]] == ["QUEUED", "LAUNCHED", "RUNNING"]
    assert ec2_event(client, "i-00000000000000000", "running")["outcome"] == "skip"  # not a job instance


def test_instance_gone_without_result_relaunches_with_resume_then_fails_after_max_attempts(aws, client):
    job_id, first = launch(aws, client, max_attempts=2)
    ec2_event(client, first, "running")
    kill(aws, first)
    out = ec2_event(client, first, "terminated")
    assert out["outcome"] == "relaunch" and out["state"] == "LAUNCHED"
    job = get(client, job_id)
    second = job["instance"]["instance_id"]
    assert second != first and job["attempt"] == 2 and "attempt 2 of 2" in job["history"][-1]["reason"]
    data = user_data(aws, second)
    assert data["launch"]["resume"] is True and data["attempt"] == 2
    assert data["spec"]["checkpoint_uri"] == f"s3://{BUCKET}/jobs/{job_id}/checkpoints/"
    # the same termination delivered again: no third instance, no change
    assert ec2_event(client, first, "terminated")["outcome"] == "skip"
    assert len(instances(aws)) == 1
    # the second instance dies too: attempts exhausted
    kill(aws, second)
    out = ec2_event(client, second, "terminated")
    job = get(client, job_id)
    assert out["outcome"] == "fail" and job["state"] == "FAILED"
    assert "after 2 attempt(s)" in job["error"] and len(job["attempts"]) == 2
    assert all(a["ended_at"] for a in job["attempts"])


def test_spot_warning_interrupts_then_termination_relaunches(aws, client):
    job_id, iid = launch(aws, client)
    ec2_event(client, iid, "running")
    assert spot_event(client, iid)["outcome"] == "interrupted"
    assert get(client, job_id)["state"] == "INTERRUPTED"
    assert spot_event(client, iid)["outcome"] == "skip"
    out = ec2_event(client, iid, "terminated")
    assert out["outcome"] == "relaunch"
    job = get(client, job_id)
    assert job["state"] == "LAUNCHED" and job["attempt"] == 2
    assert "spot interruption" in job["history"][-1]["reason"]
    assert user_data(aws, job["instance"]["instance_id"])["launch"]["resume"] is True


def test_terminal_states_are_never_left(aws, client):
    job_id, iid = launch(aws, client)
    store = JobsStore(Clients(REGION), "nlpfleet-dev-jobs")
    now = datetime.now(UTC)
    store.update(job_id, lambda j: J.record_progress(j, {"step": 10}, now))
    store.update(job_id, lambda j: J.finish(j, ok=True, now=now, result={"model_uri": "s3://x/y/"}))
    assert ec2_event(client, iid, "terminated")["outcome"] == "skip"
    assert spot_event(client, iid)["outcome"] == "skip"
    assert client.http.delete(f"/jobs/{job_id}").status_code == 409
    job = get(client, job_id)
    assert job["state"] == "SUCCEEDED" and job["result"] == {"model_uri": "s3://x/y/"}


def test_cancel_then_late_running_event(aws, client):
    job_id, iid = launch(aws, client)
    client.http.delete(f"/jobs/{job_id}")
    assert ec2_event(client, iid, "running")["outcome"] == "skip"
    assert get(client, job_id)["state"] == "CANCELLED"


def test_a_conditional_write_loses_to_a_concurrent_cancel_and_respects_it(aws, client):
    job_id, _ = launch(aws, client)
    store = JobsStore(Clients(REGION), "nlpfleet-dev-jobs")
    now = datetime.now(UTC)
    calls = []

    def heartbeat(j):
        if not calls:  # a concurrent DELETE lands between this read and its write
            store.update(job_id, lambda k: J.transition(k, J.CANCELLED, reason="cancelled by user", now=now))
        calls.append(j.state)
        return J.record_progress(j, {"step": 1}, now)

    try:
        store.update(job_id, heartbeat)
        raise AssertionError("a heartbeat must not overwrite a cancellation")
    except J.InvalidTransition:
        pass
    assert calls == ["LAUNCHED", "CANCELLED"]  # re-read after losing the race
    assert get(client, job_id)["state"] == "CANCELLED"


def test_heartbeat_sweep_fails_silent_jobs_and_terminates_them(aws, client):
    silent, silent_iid = launch(aws, client)
    alive, alive_iid = launch(aws, client, name="alive")
    store = JobsStore(Clients(REGION), "nlpfleet-dev-jobs")
    now = datetime.now(UTC)
    store.update(silent, lambda j: J.record_progress(j, {"step": 1}, now - timedelta(hours=1)))
    store.update(alive, lambda j: J.record_progress(j, {"step": 1}, now))
    out = sweep(client)
    assert [a["job_id"] for a in out["acted"]] == [silent]
    job = get(client, silent)
    assert job["state"] == "FAILED" and "no heartbeat" in job["error"]
    states = {
        i["InstanceId"]: i["State"]["Name"]
        for i in instances(aws, ("running", "pending", "shutting-down", "terminated"))
    }
    assert states[silent_iid] in ("shutting-down", "terminated") and states[alive_iid] in (
        "pending",
        "running",
    )
    assert get(client, alive)["state"] == "RUNNING"
    assert sweep(client)["acted"] == []


def test_dataset_upload_creates_one_job_per_object_version(aws, client):
    s3 = aws["s3"]
    key = "datasets/banking77/train.csv"
    s3.put_object(
        Bucket=BUCKET,
        Key=key + ".job.json",
        Body=json.dumps({"type": "preprocess", "label_field": "category", "shard_examples": 500}),
    )
    v1 = s3.put_object(Bucket=BUCKET, Key=key, Body=b"text,category\nhi,greeting\n" * 100)["VersionId"]
    first = s3_event(client, key, 2600, v1)
    assert first["outcome"] == "created" and first["spec_from"].endswith(".job.json")
    assert s3_event(client, key, 2600, v1)["outcome"] == "duplicate"  # redelivered
    job = get(client, first["job_id"])
    assert job["type"] == "preprocess" and job["spec"]["shard_examples"] == 500
    assert job["source"]["version"] == v1 and job["state"] == "LAUNCHED"
    v2 = s3.put_object(Bucket=BUCKET, Key=key, Body=b"text,category\nyo,greeting\n" * 100)["VersionId"]
    second = s3_event(client, key, 2600, v2)
    assert second["outcome"] == "created" and second["job_id"] != first["job_id"]
    assert len(instances(aws)) == 2
    # no sidecar: the configured defaults (a finetune named after the dataset folder)
    s3.put_object(Bucket=BUCKET, Key="datasets/clinc150/train.csv", Body=b"text,category\na,b\n" * 50)
    third = s3_event(client, "datasets/clinc150/train.csv", 900, "v-c")
    job3 = get(client, third["job_id"])
    assert third["spec_from"] == "defaults" and job3["type"] == "finetune"
    assert job3["spec"]["model_name"] == "clinc150" and job3["spec"]["label_field"] == "category"


def test_invalid_sidecar_is_refused_and_creates_nothing(aws, client):
    s3 = aws["s3"]
    s3.put_object(
        Bucket=BUCKET, Key="datasets/x.csv.job.json", Body=json.dumps({"type": "finetune", "epochs": -1})
    )
    s3.put_object(Bucket=BUCKET, Key="datasets/x.csv", Body=b"text,label\na,b\n")
    out = s3_event(client, "datasets/x.csv", 16, "v1")
    assert out["outcome"] == "refused" and "epochs" in out["details"]["fields"]
    assert client.http.get("/jobs").json_body["jobs"] == [] and instances(aws) == []
    assert s3_event(client, "datasets/x.csv.job.json", 40, "v1")["outcome"] == "skip"
    assert s3_event(client, "datasets/", 0, "v1")["outcome"] == "skip"


def active(client):
    try:
        return json.loads(
            boto3.client("ssm", region_name=REGION).get_parameter(Name="/nlpfleet/dev/active-model")[
                "Parameter"
            ]["Value"]
        )
    except Exception:
        return None


def test_manifest_upload_records_the_active_model_once_and_in_order(aws, client):
    s3 = aws["s3"]
    k1, k2 = "models/banking77/v1/manifest.json", "models/banking77/v2/manifest.json"
    v1 = s3.put_object(Bucket=BUCKET, Key=k1, Body=json.dumps(manifest(version="v1")))["VersionId"]
    v2 = s3.put_object(Bucket=BUCKET, Key=k2, Body=json.dumps(manifest(version="v2")))["VersionId"]
    out = s3_event(client, k2, 10, v2, time="2026-11-26T11:00:00Z")
    assert out["outcome"] == "activated"
    val = active(client)
    assert (val["name"], val["version"], val["uri"]) == (
        "banking77",
        "v2",
        f"s3://{BUCKET}/models/banking77/v2/",
    )
    assert len(val["manifest_sha256"]) == 64
    assert s3_event(client, k2, 10, v2, time="2026-11-26T11:00:00Z")["outcome"] == "skip"  # duplicate
    late = s3_event(client, k1, 10, v1, time="2026-11-26T10:59:00Z")  # older upload delivered late
    assert late["outcome"] == "skip" and active(client)["version"] == "v2"
    assert client.http.get("/fleet").json_body["active_model"]["version"] == "v2"


def test_invalid_manifest_is_refused_and_nothing_changes(aws, client):
    s3 = aws["s3"]
    bad = copy.deepcopy(manifest(version="v3"))
    bad["variants"]["fp32"]["published"] = False
    v = s3.put_object(Bucket=BUCKET, Key="models/banking77/v3/manifest.json", Body=json.dumps(bad))[
        "VersionId"
    ]
    out = s3_event(client, "models/banking77/v3/manifest.json", 10, v)
    assert out["outcome"] == "refused" and "parity gate" in out["reason"]
    v = s3.put_object(Bucket=BUCKET, Key="models/other/v1/manifest.json", Body=b"{oops")["VersionId"]
    assert s3_event(client, "models/other/v1/manifest.json", 5, v)["outcome"] == "refused"
    v = s3.put_object(
        Bucket=BUCKET, Key="models/banking77/v9/manifest.json", Body=json.dumps(manifest(version="v8"))
    )["VersionId"]
    assert "path says" in s3_event(client, "models/banking77/v9/manifest.json", 10, v)["reason"]
    assert active(client) is None
    assert s3_event(client, "models/banking77/v3/model.onnx", 10, "x")["outcome"] == "skip"


def test_real_s3_to_eventbridge_delivery_matches_the_handler_pattern(aws, client):
    """moto delivers S3 → EventBridge for a bucket with EventBridgeConfiguration; the rule uses
    the pattern app.py registers, so this checks the pattern and parser against that shape."""
    import app as app_module

    pattern = next(
        e.event_pattern for e in app_module.app.event_sources if getattr(e, "name", "") == "on_object_created"
    )
    s3, sqs, events = (
        aws["s3"],
        boto3.client("sqs", region_name=REGION),
        boto3.client("events", region_name=REGION),
    )
    s3.put_bucket_notification_configuration(
        Bucket=BUCKET, NotificationConfiguration={"EventBridgeConfiguration": {}}
    )
    q = sqs.create_queue(QueueName="events")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="objects", EventPattern=json.dumps(pattern))
    events.put_targets(Rule="objects", Targets=[{"Id": "q", "Arn": arn}])
    s3.put_object(Bucket=BUCKET, Key="datasets/tickets.csv", Body=b"text,label\nhello,greet\n" * 40)
    s3.put_object(Bucket=BUCKET, Key="elsewhere/ignored.csv", Body=b"x")
    msgs = sqs.receive_message(QueueUrl=q, MaxNumberOfMessages=10).get("Messages", [])
    assert len(msgs) == 1
    delivered = json.loads(msgs[0]["Body"])
    out = client.lambda_.invoke("on_object_created", delivered).payload
    assert out["outcome"] == "created", out
    assert get(client, out["job_id"])["spec"]["input_uri"] == f"s3://{BUCKET}/datasets/tickets.csv"


def test_events_from_another_stage_or_bucket_are_skipped(aws, client):
    other = aws["ec2"].run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "nlpfleet:job-id", "Value": "j-prod-1"}]}
        ],
    )["Instances"][0]["InstanceId"]
    assert ec2_event(client, other, "terminated")["outcome"] == "skip"
    ev = sample("s3_object_created_dataset.json", bucket={"name": "someone-elses-bucket"})
    assert client.lambda_.invoke("on_object_created", ev).payload["outcome"] == "skip"
