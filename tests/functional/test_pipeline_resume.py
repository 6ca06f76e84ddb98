"""The real pipeline end to end on a small banking77 slice: train a few steps → checkpoint →
SIGTERM (a spot interruption) → resume → SIGKILL (a crash) → resume → export → parity gate →
manifest → publish to S3 (moto) → fetch and verify. A run interrupted twice must end with the
same optimizer steps and the same dev metrics as an uninterrupted one.

The interrupted runs are real processes of the ``nlpfleet-train`` CLI (``python -m
training.worker``); the reference run and the S3-mirror run call ``training.worker.train``."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from inference.artifact import fetch_artifact, publish_artifact, verify_artifact
from inference.export import export_model
from training.checkpoint import list_checkpoints
from training.config import TrainConfig
from training.worker import EXIT_INTERRUPTED, train

REPO = Path(__file__).resolve().parents[2]
N_LABELS, PER_LABEL_TRAIN, PER_LABEL_DEV = 12, 8, 3
# 96 examples / batch 8 = 12 optimizer steps per epoch, 2 epochs = 24 steps.
COMMON = {
    "label_column": "category",
    "max_seq_len": 32,
    "batch_size": 8,
    "epochs": 2,
    "lr": 1e-3,
    "seed": 7,
    "checkpoint_every_steps": 4,
    "num_threads": 1,
    "freeze_embeddings": True,
    "log_every_steps": 1,
    "progress_bar": False,
}


def _slice(src: Path, dest: Path, per_label: int, labels: list[str]) -> Path:
    rows, seen = [], {}
    with open(src, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            c = row["category"]
            if c in labels and seen.get(c, 0) < per_label:
                seen[c] = seen.get(c, 0) + 1
                rows.append(row)
    with open(dest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "category"])
        w.writeheader()
        w.writerows(rows)
    return dest


@pytest.fixture(scope="module")
def small_data(data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    labels = sorted(json.loads((data_dir / "banking77" / "categories.json").read_text()))[:N_LABELS]
    return (
        _slice(data_dir / "banking77" / "train.csv", d / "train.csv", PER_LABEL_TRAIN, labels),
        _slice(data_dir / "banking77" / "dev.csv", d / "dev.csv", PER_LABEL_DEV, labels),
    )


@pytest.fixture(scope="module", autouse=True)
def _model(minilm_2layer):
    # Resume mechanics need a real BERT, not a good one: the 2-layer MiniLM is 3x faster.
    COMMON["model_dir"] = str(minilm_2layer)
    yield
    COMMON.pop("model_dir")


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    train_csv, dev_csv = small_data
    out = tmp_path_factory.mktemp("reference")
    return train(TrainConfig(train=str(train_csv), dev=str(dev_csv), output_dir=str(out), **COMMON))


def _cli(train_csv, dev_csv, out) -> list[str]:
    args = [sys.executable, "-m", "training.worker", "--train", str(train_csv), "--dev", str(dev_csv)]
    args += ["--output-dir", str(out)]
    for k, v in COMMON.items():
        flag = "--" + k.replace("_", "-")
        args += ([flag] if v else ["--no-" + k.replace("_", "-")]) if isinstance(v, bool) else [flag, str(v)]
    return args


def _run_until(args, at_step: int, sig: int | None, timeout_s: float = 240) -> tuple[int, str]:
    """Run the CLI; once it logs optimizer step ``at_step``, send ``sig``. Returns (rc, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NLPFLEET_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:
            lines.append(line)
            if sig is not None and f"step {at_step}/" in line:
                proc.send_signal(sig)
                sig = None
        proc.wait()
    finally:
        timer.cancel()
        proc.stdout.close()
    return proc.returncode, "".join(lines)


def test_interrupted_twice_and_resumed_matches_uninterrupted_then_publishes(small_data, reference, tmp_path):
    train_csv, dev_csv = small_data
    out = tmp_path / "run"
    args = _cli(train_csv, dev_csv, out)
    ckpts = out / "checkpoints"

    # 1. Spot interruption: SIGTERM mid-run → checkpoint at once (not a periodic multiple), exit 3.
    rc, err = _run_until(args, at_step=6, sig=signal.SIGTERM)
    assert rc == EXIT_INTERRUPTED, err[-3000:]
    steps = [s for s, _ in list_checkpoints(ckpts)]
    # The signal lands during step 6 or 7: the checkpoint is written right after that step.
    assert steps and 6 <= steps[-1] <= 8, steps
    first_stop = steps[-1]
    assert not (out / "model").exists()

    # 2. Resumed, then killed hard (no chance to checkpoint) after a periodic checkpoint.
    rc, err = _run_until(args, at_step=first_stop + 7, sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL, err[-3000:]
    assert f"resumed from {ckpts}" in err
    last = list_checkpoints(ckpts)[-1][0]
    assert first_stop < last < first_stop + 7

    # 3. Resumed again: runs to the end.
    rc, err = _run_until(args, at_step=-1, sig=None)
    assert rc == 0, err[-3000:]
    result = json.loads((out / "train_result.json").read_text())
    assert result["resumed_from_step"] == last
    assert result["steps"] == reference.steps == 24
    for k in ("accuracy", "macro_f1"):
        assert result["metrics"][k] == pytest.approx(reference.metrics[k], abs=0.011), (k, result, reference)
    assert [h["step"] for h in result["history"]] == [h["step"] for h in reference.history] == [12, 24]
    # It learns: the second epoch's training loss is below the first's and below chance (ln 12 = 2.48).
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[1] < losses[0] and losses[1] < 2.45, losses

    # 4. Export behind the parity gate, publish (manifest last), fetch and verify.
    labels = result["labels"]
    dev_rows = list(csv.DictReader(open(dev_csv, newline="", encoding="utf-8")))
    manifest = export_model(
        out / "model",
        tmp_path / "artifact",
        name="banking-small",
        version="resumed-1",
        labels=labels,
        heldout_texts=[r["text"] for r in dev_rows],
        heldout_labels=[labels.index(r["category"]) for r in dev_rows],
        dataset_sha256=result["dataset_sha256"],
        metrics=result["metrics"],
        max_seq_len=32,
        num_threads=1,
        variants=("fp32", "int8"),
    )
    assert manifest["variants"]["fp32"]["published"]
    assert manifest["parity"]["fp32"]["max_abs_diff"] <= 1e-3
    assert manifest["metrics"] == result["metrics"]
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="fleet-models")
        publish_artifact(tmp_path / "artifact", "s3://fleet-models/models/banking-small/resumed-1/", s3)
        fetched = fetch_artifact("s3://fleet-models/models/banking-small/resumed-1", tmp_path / "fetched", s3)
    assert verify_artifact(fetched)["dataset_sha256"] == result["dataset_sha256"]


@mock_aws
def test_stop_mirrors_checkpoint_to_s3_and_a_fresh_machine_resumes_from_it(small_data, reference, tmp_path):
    train_csv, dev_csv = small_data
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="fleet-ckpt")
    uri = "s3://fleet-ckpt/checkpoints/job-1/"
    stop = threading.Event()
    events = []

    def progress(e):
        events.append(e)
        if e["event"] == "step" and e["step"] == 10:
            stop.set()

    cfg = TrainConfig(
        train=str(train_csv),
        dev=str(dev_csv),
        output_dir=str(tmp_path / "a"),
        checkpoint_s3_uri=uri,
        **COMMON,
    )
    first = train(cfg, progress, s3_client=s3, stop=stop)
    assert first.status == "interrupted" and first.steps == 10
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="fleet-ckpt")["Contents"]]
    assert "checkpoints/job-1/step-00000010/COMPLETE" in keys
    assert [e["event"] for e in events][-2:] == ["checkpoint", "interrupted"]
    assert {e["event"] for e in events} >= {"start", "step", "checkpoint"}

    # A replacement instance: empty local disk, same S3 prefix.
    fresh = TrainConfig(
        train=str(train_csv),
        dev=str(dev_csv),
        output_dir=str(tmp_path / "b"),
        checkpoint_s3_uri=uri,
        **COMMON,
    )
    second = train(fresh, s3_client=s3)
    assert second.status == "completed" and second.resumed_from_step == 10
    assert second.steps == reference.steps
    assert second.metrics["accuracy"] == pytest.approx(reference.metrics["accuracy"], abs=0.011)
