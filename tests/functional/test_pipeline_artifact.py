"""The exported artifact as its users see it: a valid manifest, files that hash to it, variants
that classify like the PyTorch model, publishing to S3 with the manifest last, and a fetch that
refuses tampered bytes."""

import json
import shutil

import boto3
import numpy as np
import pytest
from moto import mock_aws

from chalicelib.manifest import artifact_files, published_variants, validate_manifest
from inference.artifact import ArtifactError, fetch_artifact, publish_artifact, verify_artifact


def _classify(artifact, variant_file, texts):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(artifact))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(artifact / variant_file), opts, providers=["CPUExecutionProvider"])
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="np")
    logits = sess.run(None, {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()})[0]
    return logits.argmax(1)


def test_manifest_is_valid_and_records_the_gate(trained_artifact):
    m = verify_artifact(trained_artifact)
    validate_manifest(m)
    assert m["labels"] == json.loads((trained_artifact / "labels.json").read_text())
    assert len(m["labels"]) == 77
    assert set(m["variants"]) == {"fp32", "int8", "fp16"}
    assert m["variants"]["fp32"]["published"], m["parity"]["fp32"]
    # fp32 is the same model as PyTorch: logits within 1e-3 on every held-out text.
    assert m["parity"]["fp32"]["max_abs_diff"] <= 1e-3
    for name, v in m["variants"].items():
        p = m["parity"][name]
        assert v["published"] == p["passed"]
        assert p["passed"] or p["reasons"], f"{name} failed without a reason"
        assert (trained_artifact / v["file"]).stat().st_size == v["size"]
    assert m["variants"]["fp16"]["provider"] == "CUDAExecutionProvider"
    # int8 MatMul weights (the embedding table stays fp32: see inference/export.py).
    assert m["variants"]["int8"]["size"] < 0.7 * m["variants"]["fp32"]["size"]
    # Well above chance (1/77 = 1.3 %) on the held-out dev slice.
    assert m["metrics"]["accuracy"] > 0.15


def test_onnx_fp32_classifies_dev_texts_above_chance(trained_artifact, data_dir):
    import csv

    labels = json.loads((trained_artifact / "labels.json").read_text())
    rows = list(csv.DictReader(open(data_dir / "banking77" / "dev.csv", newline="", encoding="utf-8")))[::10]
    pred = _classify(trained_artifact, "model.onnx", [r["text"] for r in rows])
    acc = np.mean([labels[p] == r["category"] for p, r in zip(pred, rows, strict=True)])
    assert acc > 0.10, acc


class _Recorder:
    """Wraps an S3 client and records the order keys were written in."""

    def __init__(self, client):
        self.client, self.keys = client, []

    def upload_file(self, filename, bucket, key):
        self.keys.append(key)
        return self.client.upload_file(filename, bucket, key)

    def put_object(self, **kw):
        self.keys.append(kw["Key"])
        return self.client.put_object(**kw)

    def __getattr__(self, name):
        return getattr(self.client, name)


@mock_aws
def test_publish_writes_manifest_last_and_fetch_verifies(trained_artifact, tmp_path):
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="fleet")
    uri = "s3://fleet/models/banking77/v1/"
    rec = _Recorder(s3)
    m = publish_artifact(trained_artifact, uri, rec)
    assert rec.keys[-1] == "models/banking77/v1/manifest.json"
    uploaded = {k.rsplit("/", 1)[1] for k in rec.keys}
    assert uploaded == set(artifact_files(m)) | {"manifest.json"}
    # Unpublished variants never reach S3.
    for name, v in m["variants"].items():
        assert (v["file"] in uploaded) == (name in published_variants(m))

    local = fetch_artifact(uri, tmp_path / "fetched", s3)
    assert verify_artifact(local)["version"] == m["version"]

    # Tamper with the published fp32 model: a fetch must refuse it.
    s3.put_object(Bucket="fleet", Key="models/banking77/v1/model.onnx", Body=b"not a model")
    with pytest.raises(ArtifactError, match="model.onnx"):
        fetch_artifact(uri, tmp_path / "again", s3)
    assert not (tmp_path / "again" / "manifest.json").exists()


def test_verify_refuses_a_changed_file(trained_artifact, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(trained_artifact, copy)
    with open(copy / "labels.json", "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="labels.json: sha256"):
        verify_artifact(copy)
    (copy / "labels.json").unlink()
    with pytest.raises(ArtifactError, match="labels.json: missing"):
        verify_artifact(copy)
