"""Training data straight from S3: a file, and a prefix of JSONL shards (the preprocess job's output)."""

import boto3
import pytest
from moto import mock_aws

from training.data import DataError, load_split


@mock_aws
def test_s3_file_and_prefix(tmp_path):
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="data-bkt")
    s3.put_object(Bucket="data-bkt", Key="datasets/x/train.csv", Body=b"text,label\na,x\nb,y\n")
    s3.put_object(Bucket="data-bkt", Key="prep/x/part-0.jsonl", Body=b'{"text": "a", "label": "x"}\n')
    s3.put_object(Bucket="data-bkt", Key="prep/x/part-1.jsonl", Body=b'{"text": "b", "label": "y"}\n')
    assert load_split("s3://data-bkt/datasets/x/train.csv", s3_client=s3).texts == ("a", "b")
    assert load_split("s3://data-bkt/prep/x/", s3_client=s3).labels == ("x", "y")
    with pytest.raises(DataError, match="no .jsonl shards"):
        load_split("s3://data-bkt/nothing/", s3_client=s3)


@mock_aws
def test_worker_trains_from_an_s3_prefix_of_pretokenized_shards(data_dir, minilm_2layer, tmp_path):
    """The preprocess job's output (JSONL shards with ``input_ids``) is a valid training input."""
    import csv
    import json

    from transformers import AutoTokenizer

    from training.config import TrainConfig
    from training.worker import train

    tok = AutoTokenizer.from_pretrained(str(minilm_2layer))
    rows, seen = [], {}
    with open(data_dir / "banking77" / "train.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if (r["category"] in seen or len(seen) < 4) and seen.get(r["category"], 0) < 10:
                seen[r["category"]] = seen.get(r["category"], 0) + 1
                rows.append(
                    {"text": r["text"], "label": r["category"], "input_ids": tok(r["text"])["input_ids"]}
                )
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="data-bkt")
    for i in range(0, len(rows), 16):
        body = "".join(json.dumps(r) + "\n" for r in rows[i : i + 16]).encode()
        s3.put_object(Bucket="data-bkt", Key=f"prep/job-1/part-{i // 16:05d}.jsonl", Body=body)
    events = []
    result = train(
        TrainConfig(
            train="s3://data-bkt/prep/job-1/",
            output_dir=str(tmp_path / "run"),
            model_dir=str(minilm_2layer),
            max_seq_len=16,  # shards' ids are longer for some rows: truncated, [SEP] kept
            batch_size=8,
            max_steps=3,
            num_threads=1,
            progress_bar=False,
            log_every_steps=1,
        ),
        events.append,
        s3_client=s3,
    )
    assert result.status == "completed" and result.steps == 3
    assert result.labels == sorted(seen)
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert (tmp_path / "run" / "model" / "labels.json").is_file()
