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
