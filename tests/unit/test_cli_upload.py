"""``nlpfleet upload`` of a dataset folder: the training file (last, after its job spec) and the
eval split; a README or label list beside them is not uploaded (it would be no dataset)."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from nlpfleet import cli


@pytest.fixture()
def bucket(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="data")
        yield s3


def _folder(tmp_path, names):
    for n in names:
        (tmp_path / n).write_text("text,category\nhello,greet\n")
    return tmp_path


def test_folder_upload_sends_train_eval_and_spec_only(bucket, tmp_path, capsys):
    src = _folder(tmp_path, ["train.csv", "dev.csv", "README.md", "categories.json"])
    argv = ["--api-url", "http://127.0.0.1:9", "--region", "us-east-1", "upload", str(src)]
    rc = cli.main([*argv, "--prefix", "datasets/b77", "--bucket", "data", "--set", "model_name=b77"])
    assert rc == 0
    keys = sorted(o["Key"] for o in bucket.list_objects_v2(Bucket="data")["Contents"])
    assert keys == ["datasets/b77/dev.csv", "datasets/b77/train.csv", "datasets/b77/train.csv.job.json"]
    spec = json.loads(bucket.get_object(Bucket="data", Key="datasets/b77/train.csv.job.json")["Body"].read())
    assert spec["eval_uri"] == "s3://data/datasets/b77/dev.csv" and spec["model_name"] == "b77"
    assert "README.md, categories.json" in capsys.readouterr().out


def test_folder_without_training_file_is_refused(bucket, tmp_path, capsys):
    src = _folder(tmp_path, ["dev.csv"])
    argv = ["--api-url", "http://127.0.0.1:9", "--region", "us-east-1", "upload", str(src)]
    assert cli.main([*argv, "--prefix", "datasets/b77", "--bucket", "data"]) == 2
    assert "no training file 'train.csv'" in capsys.readouterr().err
    assert "Contents" not in bucket.list_objects_v2(Bucket="data")
