"""The local stack as a user drives it with the ``nlpfleet`` CLI: ``up``, uploads, a job submitted
over the API and followed to its end, the fleet and model views, ``down`` leaving nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest


def cli(state_dir, *args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "nlpfleet.cli", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
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
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    sd = tmp_path_factory.mktemp("stack")
    out = cli(sd, "up").stdout
    assert "local stack up" in out
    st = json.loads((sd / "stack.json").read_text())
    yield sd, st
    cli(sd, "down", check=False)


def test_submit_watch_and_views(stack, tmp_path, data_dir):
    sd, st = stack
    rows = (data_dir / "banking77" / "train.csv").read_text().splitlines()
    (tmp_path / "small.csv").write_text("\n".join(rows[:300]) + "\n")
    # outside datasets/: uploading it makes no job
    cli(sd, "upload", str(tmp_path / "small.csv"), "--prefix", "raw/small", "--train-file", "small.csv")
    assert json.loads(cli(sd, "status", "--json").stdout) == []

    bucket = st["environment"]["BUCKET"]
    planned = json.loads(
        cli(
            sd, "plan", "--set", "type=preprocess", "--set", f"input_uri=s3://{bucket}/raw/small/small.csv"
        ).stdout
    )
    assert planned  # the planner's answer, as the API gives it

    bad = cli(sd, "submit", "--set", "type=finetune", check=False)
    assert bad.returncode == 2 and "400" in bad.stderr  # refused with the API's reason

    out = cli(
        sd,
        "submit",
        "--json",
        "--set",
        "type=preprocess",
        "--set",
        f"input_uri=s3://{bucket}/raw/small/small.csv",
        "--set",
        "label_field=category",
    ).stdout
    job_id = json.loads(out)["job_id"]
    watch = cli(sd, "status", job_id, "--watch", "--interval", "1")
    assert "SUCCEEDED" in watch.stdout
    job = json.loads(cli(sd, "status", job_id, "--json").stdout)
    assert job["state"] == "SUCCEEDED" and job["result"]

    assert "group nlpfleet-dev-inference" in cli(sd, "fleet").stdout
    assert json.loads(cli(sd, "models", "--json").stdout)["models"] == []
    assert job_id in cli(sd, "logs", "-n", "400").stdout  # the handlers' decisions are in the stack log


def test_down_leaves_no_process(stack):
    sd, st = stack
    state = httpx.get(st["admin_url"] + "/local/state").json()
    pids = [st["pid"]] + [i["pid"] for i in state["instances"] if i["pid"]]
    cli(sd, "down")
    assert not any(alive(p) for p in pids)
    assert not (sd / "stack.json").exists()
    for url in (st["api_url"], st["lb_url"], st["endpoint_url"]):
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
