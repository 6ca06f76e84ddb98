"""The local stack as a user drives it: ``nlpfleet up``, the API over HTTP, a dataset upload that
becomes a job through S3 → EventBridge → SQS → the real handler, ``nlpfleet down``."""

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from localstack.moto import aws_env, client


def cli(state_dir, *args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "nlpfleet.cli", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"nlpfleet {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    sd = tmp_path_factory.mktemp("stack")
    cli(sd, "up")
    st = json.loads((sd / "stack.json").read_text())
    yield sd, st
    cli(sd, "down", check=False)


def wait_for(fn, timeout=60.0, interval=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def test_upload_creates_one_job_even_when_the_event_is_duplicated(stack, tmp_path, data_dir):
    sd, st = stack
    assert httpx.get(st["api_url"] + "/jobs").json()["jobs"] == []
    rows = (data_dir / "banking77" / "train.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join(rows[:200]) + "\n")
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"type": "finetune", "model_name": "bank-small", "epochs": 1, "label_field": "category"})
    )
    cli(sd, "upload", str(tmp_path / "train.csv"), "--prefix", "datasets/small", "--spec", str(spec))

    jobs = wait_for(lambda: httpx.get(st["api_url"] + "/jobs").json()["jobs"])
    assert len(jobs) == 1
    job = jobs[0]
    assert job["source"]["key"] == "datasets/small/train.csv"
    assert job["source"]["spec_from"].endswith("train.csv.job.json")

    # S3 delivers at least once: the same event again (as the dispatcher saw it) makes no new job
    state = httpx.get(st["admin_url"] + "/local/state").json()
    route = state["dispatcher"]["OnObjectCreated"]
    event = next(e for e in route["recent"] if e["detail"]["object"]["key"] == "datasets/small/train.csv")
    sqs = client("sqs", aws_env(st["endpoint_url"]))
    sqs.send_message(QueueUrl=route["queue_url"], MessageBody=json.dumps(event))
    wait_for(
        lambda: (
            httpx.get(st["admin_url"] + "/local/state").json()["dispatcher"]["OnObjectCreated"]["invocations"]
            > route["invocations"]
        )
    )
    assert [j["job_id"] for j in httpx.get(st["api_url"] + "/jobs").json()["jobs"]] == [job["job_id"]]

    out = cli(sd, "status", "--json").stdout
    assert json.loads(out)[0]["job_id"] == job["job_id"]


def test_down_leaves_no_process(stack):
    sd, st = stack
    pids = [st["pid"]] + [
        i["pid"] for i in httpx.get(st["admin_url"] + "/local/state").json()["instances"] if i["pid"]
    ]
    cli(sd, "down")
    assert not any(alive(p) for p in pids)
    assert not (sd / "stack.json").exists()
    for url in (st["api_url"], st["lb_url"], st["endpoint_url"]):
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
