# ruff: noqa: F811  (pytest fixtures imported from test_api are used as parameters)
"""The on-instance entry point, run for real under moto: a job launched by the control plane
reads its user data, runs ``preprocess`` on a banking77 slice, reports progress and its result
to the job record; the training data loader reads the shards it wrote."""

import base64
import csv
import json

import boto3
import pytest
from test_api import BUCKET, REGION, aws, client, post  # noqa: F401

from nlpfleet import instance


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The instance's scratch directory (NLPFLEET_SCRATCH): a job must leave it empty."""
    d = tmp_path / "scratch"
    d.mkdir()
    monkeypatch.setenv("NLPFLEET_SCRATCH", str(d))
    return d


def _user_data(aws, instance_id):
    ud = aws["ec2"].describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return json.loads(base64.b64decode(ud["UserData"]["Value"]))


def test_preprocess_job_runs_end_to_end_from_its_user_data(aws, client, data_dir, tmp_path, scratch):  # noqa: F811
    rows = list(csv.DictReader((data_dir / "banking77" / "train.csv").open()))[:600]
    rows[5]["text"] = "   "  # an invalid row: dropped and counted
    buf = ["text,category"] + [f'"{r["text"].replace(chr(34), "")}",{r["category"]}' for r in rows]
    aws["s3"].put_object(Bucket=BUCKET, Key="datasets/b77.csv", Body="\n".join(buf).encode())
    job = post(
        client,
        "/jobs",
        {
            "type": "preprocess",
            "input_uri": f"s3://{BUCKET}/datasets/b77.csv",
            "label_field": "category",
            "shard_examples": 250,
            "seq_len": 32,
        },
    ).json_body
    ud_file = tmp_path / "user-data.json"
    ud_file.write_text(json.dumps(_user_data(aws, job["instance"]["instance_id"])))

    assert instance.main(["--user-data", str(ud_file)]) == 0

    done = client.http.get(f"/jobs/{job['job_id']}").json_body
    assert done["state"] == "SUCCEEDED", done
    assert [h["to"] for h in done["history"]] == ["QUEUED", "LAUNCHED", "RUNNING", "SUCCEEDED"]
    assert done["heartbeat_at"] and done["progress"]
    res = done["result"]
    assert res["examples"] == 599 and res["shards"] == 3 and res["rejected"] == {"empty or missing text": 1}
    assert list(scratch.iterdir()) == []  # the corpus copy and shards do not stay on the instance's disk
    out = res["output_uri"]
    assert out == f"s3://{BUCKET}/preprocessed/{job['job_id']}/"
    keys = [
        o["Key"]
        for o in aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix=out.split(BUCKET + "/")[1])["Contents"]
    ]
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == [
        "_index.json",
        "part-00000.jsonl",
        "part-00001.jsonl",
        "part-00002.jsonl",
    ]
    first = json.loads(
        aws["s3"]
        .get_object(Bucket=BUCKET, Key=keys[1] if "part" in keys[1] else keys[0])["Body"]
        .read()
        .splitlines()[0]
    )
    assert set(first) == {"text", "label", "input_ids"} and first["input_ids"][0] == 101  # [CLS]
    assert len(first["input_ids"]) <= 32

    # the training worker's loader reads these shards as a training split
    from training.data import load_split

    split = load_split(out, "text", "label", boto3.client("s3", region_name=REGION))
    assert len(split.texts) == 599 and split.input_ids is not None
    assert set(split.labels) == {r["category"] for i, r in enumerate(rows) if i != 5}


def test_a_cancelled_job_stops_its_worker_and_records_nothing_more(aws, client, tmp_path):  # noqa: F811
    aws["s3"].put_object(
        Bucket=BUCKET, Key="datasets/small.csv", Body=b"text,label\nhello there,greet\n" * 30
    )
    job = post(
        client, "/jobs", {"type": "preprocess", "input_uri": f"s3://{BUCKET}/datasets/small.csv"}
    ).json_body
    client.http.delete(f"/jobs/{job['job_id']}")
    ud_file = tmp_path / "ud.json"
    ud_file.write_text(json.dumps(_user_data(aws, job["instance"]["instance_id"])))
    assert instance.main(["--user-data", str(ud_file)]) == instance.EXIT_FAILED
    assert client.http.get(f"/jobs/{job['job_id']}").json_body["state"] == "CANCELLED"


def test_bad_user_data_is_refused(tmp_path):
    f = tmp_path / "ud"
    f.write_text('{"role": "job"}')
    assert instance.main(["--user-data", str(f)]) == instance.EXIT_BAD_INPUT
    f.write_text("not json")
    assert instance.main(["--user-data", str(f)]) == instance.EXIT_BAD_INPUT


def test_batch_infer_classifies_every_text_and_writes_next_to_the_input(
    aws, client, trained_artifact, tmp_path, scratch
):  # noqa: F811
    from inference.artifact import publish_artifact

    s3 = aws["s3"]
    doc = json.loads((trained_artifact / "manifest.json").read_text())
    model_uri = f"s3://{BUCKET}/models/{doc['name']}/{doc['version']}/"
    publish_artifact(trained_artifact, model_uri, s3)
    texts = [
        "I still have not received my new card",
        "How do I top up by bank transfer?",
        "",
        "my pin is blocked",
    ]
    body = "text\n" + "\n".join(f'"{t}"' for t in texts)
    s3.put_object(Bucket=BUCKET, Key="datasets/tickets.csv", Body=body.encode())
    job = post(
        client,
        "/jobs",
        {"type": "batch_infer", "input_uri": f"s3://{BUCKET}/datasets/tickets.csv", "model_uri": model_uri},
    ).json_body
    assert job["spec"]["model_name"] == doc["name"], job
    ud = tmp_path / "ud.json"
    ud.write_text(json.dumps(_user_data(aws, job["instance"]["instance_id"])))

    assert instance.main(["--user-data", str(ud)]) == 0

    done = client.http.get(f"/jobs/{job['job_id']}").json_body
    assert done["state"] == "SUCCEEDED" and done["result"]["classified"] == 3
    assert list(scratch.iterdir()) == []
    out = s3.get_object(Bucket=BUCKET, Key="datasets/tickets.csv.predictions.jsonl")["Body"].read().decode()
    preds = [json.loads(line) for line in out.splitlines()]
    labels = json.loads((trained_artifact / "labels.json").read_text())
    assert [p["text"] for p in preds] == [t for t in texts if t]
    assert all(p["label"] in labels and 0 < p["score"] <= 1 for p in preds)


@pytest.mark.slow
def test_finetune_runs_the_training_worker_and_publishes_a_model(aws, client, data_dir, tmp_path, scratch):  # noqa: F811
    rows = [
        r
        for r in csv.DictReader((data_dir / "banking77" / "train.csv").open())
        if r["category"] in ("card_arrival", "top_up_failed", "lost_or_stolen_card")
    ][:300]
    buf = ["text,category"] + [f'"{r["text"].replace(chr(34), "")}",{r["category"]}' for r in rows]
    aws["s3"].put_object(Bucket=BUCKET, Key="datasets/tiny/train.csv", Body="\n".join(buf).encode())
    job = post(
        client,
        "/jobs",
        {
            "type": "finetune",
            "input_uri": f"s3://{BUCKET}/datasets/tiny/train.csv",
            "model_name": "tiny",
            "label_field": "category",
            "epochs": 1,
            "seq_len": 32,
            "batch_size": 16,
            "max_steps": 6,
            "checkpoint_every_steps": 3,
            "precision": "fp32",
        },
    ).json_body
    ud = tmp_path / "ud.json"
    ud.write_text(json.dumps(_user_data(aws, job["instance"]["instance_id"])))

    assert instance.main(["--user-data", str(ud)]) == 0

    done = client.http.get(f"/jobs/{job['job_id']}").json_body
    assert done["state"] == "SUCCEEDED", done["error"]
    res = done["result"]
    assert res["model_uri"] == job["spec"]["output_uri"] and res["published_variants"]
    # the checkpoints and the artifact (hundreds of MB for a real model) are in S3, not left on disk
    assert list(scratch.iterdir()) == []
    key = res["model_uri"].split(BUCKET + "/")[1] + "manifest.json"
    manifest = json.loads(aws["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert manifest["name"] == "tiny" and len(manifest["labels"]) == 3
    # checkpoints mirrored to where a relaunched attempt resumes from
    prefix = f"jobs/{job['job_id']}/checkpoints/"
    assert aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount", 0) > 0


def test_imdsv2_user_data_and_spot_notice_against_a_local_metadata_server():
    """A stand-in for IMDS that, like IMDSv2, refuses requests without a session token."""
    import http.server
    import threading

    state = {"notice": False}

    class Imds(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_PUT(self):
            ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            self.send_response(200 if ok else 400)
            self.end_headers()
            self.wfile.write(b"tok-1")

        def do_GET(self):
            if self.headers.get("X-aws-ec2-metadata-token") != "tok-1":
                self.send_response(401)
                self.end_headers()
                return
            body = None
            if self.path == "/latest/user-data":
                body = b'{"role": "inference", "region": "us-east-1"}'
            elif self.path == "/latest/meta-data/spot/instance-action" and state["notice"]:
                body = b'{"action": "terminate", "time": "2026-11-26T10:07:00Z"}'
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Imds)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert instance.parse_user_data(instance.imds_user_data(base=base))["role"] == "inference"
        got, stop = [], threading.Event()
        t = instance.watch_spot_notice(got.append, stop, poll_s=0.05, base=base)
        t.join(0.3)
        assert got == [] and t.is_alive()  # 404: no reclaim scheduled
        state["notice"] = True
        t.join(5)
        assert got == [{"action": "terminate", "time": "2026-11-26T10:07:00Z"}] and not t.is_alive()
    finally:
        srv.shutdown()


def test_a_superseded_attempt_cannot_write_to_the_job(aws, client, tmp_path):  # noqa: F811
    aws["s3"].put_object(Bucket=BUCKET, Key="datasets/s.csv", Body=b"text,label\nhello there,greet\n" * 30)
    job = post(
        client, "/jobs", {"type": "preprocess", "input_uri": f"s3://{BUCKET}/datasets/s.csv"}
    ).json_body
    first = job["instance"]["instance_id"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_user_data(aws, first)))
    aws["ec2"].terminate_instances(InstanceIds=[first])
    ev = {
        "version": "0",
        "id": "e1",
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
        "account": "123456789012",
        "time": "2026-11-26T10:00:00Z",
        "region": REGION,
        "resources": [],
        "detail": {"instance-id": first, "state": "terminated"},
    }
    assert client.lambda_.invoke("on_ec2_event", ev).payload["outcome"] == "relaunch"
    # the first instance's worker was not dead after all: its reports are refused
    assert instance.main(["--user-data", str(old)]) == instance.EXIT_FAILED
    now = client.http.get(f"/jobs/{job['job_id']}").json_body
    assert now["state"] == "LAUNCHED" and now["attempt"] == 2 and now["result"] is None


def test_inference_role_hands_its_user_data_to_the_agent(tmp_path, capsys):
    """``nlpfleet-instance`` with role inference runs the agent on the parsed user data; data the
    agent cannot use is refused with a message naming the missing key, not a traceback."""
    ud = tmp_path / "user-data.json"
    ud.write_text(json.dumps({"role": "inference", "region": REGION}))
    assert instance.main(["--user-data", str(ud)]) == instance.EXIT_BAD_INPUT
    assert "active_model_param" in capsys.readouterr().err
