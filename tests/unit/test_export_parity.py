"""The parity gate's rules and the artifact's integrity checks, without a model: hand-made logits
and a hand-made artifact directory, an in-memory S3 fake."""

import hashlib
import io
import json

import pytest

from chalicelib.manifest import validate_manifest
from inference.artifact import ArtifactError, fetch_artifact, parse_s3_uri, publish_artifact, verify_artifact
from inference.export import ExportError, export_model
from inference.parity import ParityThresholds, judge, measure

T = ParityThresholds()


def m(**kw):
    base = {"n": 200, "max_abs_diff": 0.0, "top1_agreement": 1.0, "accuracy": 0.9, "reference_accuracy": 0.9}
    return {**base, **kw}


@pytest.mark.parametrize(
    "variant, measured, ok, why",
    [
        ("fp32", m(max_abs_diff=9e-4), True, None),
        ("fp32", m(max_abs_diff=2e-3), False, "max |logit diff| 2.00e-03 > 1e-03"),
        ("fp32", m(max_abs_diff=float("nan")), False, "max |logit diff|"),
        ("int8", m(max_abs_diff=0.4, top1_agreement=0.995, accuracy=0.895), True, None),
        ("int8", m(top1_agreement=0.985), False, "top-1 agreement 98.50% < 99.00%"),
        ("int8", m(top1_agreement=0.995, accuracy=0.885), False, "accuracy 1.50 points below fp32"),
        ("fp16", m(top1_agreement=1.0, n=10), False, "only 10 held-out texts"),
    ],
)
def test_gate_rules(variant, measured, ok, why):
    passed, reasons = judge(variant, measured, T)
    assert passed is ok
    assert (why is None and reasons == []) or any(why in r for r in reasons)


def test_measure_compares_decisions_and_logits():
    ref = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.1, 0.0, 0.2]]
    cand = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.3, 0.0, 0.2]]  # last row flips to class 0
    got = measure(ref, cand, [0, 1, 2])
    assert got["max_abs_diff"] == pytest.approx(0.2)
    assert got["top1_agreement"] == pytest.approx(2 / 3)
    assert (got["accuracy"], got["reference_accuracy"]) == (pytest.approx(2 / 3), 1.0)
    # classes 0, 1, 2: F1 = 2/3 (one extra prediction), 1, 0 (never predicted)
    assert got["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert got["reference_macro_f1"] == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        measure(ref, cand[:2], [0, 1])


def test_export_refuses_bad_inputs_before_any_work(tmp_path):
    with pytest.raises(ExportError, match="no config.json"):
        export_model(tmp_path, tmp_path / "o", name="x", version="1", labels=["a", "b"], heldout_texts=[],
                     heldout_labels=[], dataset_sha256="0" * 64, metrics={})  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b", "2": "c"}}))
    with pytest.raises(ExportError, match="3 labels but 2"):
        export_model(tmp_path, tmp_path / "o", name="x", version="1", labels=["a", "b"], heldout_texts=["t"],
                     heldout_labels=[0], dataset_sha256="0" * 64, metrics={})  # fmt: skip
    with pytest.raises(ExportError, match="class ids"):
        export_model(tmp_path, tmp_path / "o", name="x", version="1", labels=["a", "b", "c"],
                     heldout_texts=["t"], heldout_labels=["a"], dataset_sha256="0" * 64, metrics={})  # fmt: skip
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- artifact integrity


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def artifact(tmp_path):
    d = tmp_path / "art"
    d.mkdir()
    files = {
        "model.onnx": b"fp32-bytes",
        "model.int8.onnx": b"int8",
        "tokenizer.json": b"{}",
        "config.json": b"{}",
        "labels.json": b'["a", "b"]',
    }
    for k, v in files.items():
        (d / k).write_bytes(v)
    doc = {
        "schema_version": 1, "name": "toy", "version": "1", "base_model": "toy", "task": "text-classification",
        "labels": ["a", "b"], "max_seq_len": 8, "dataset_sha256": "0" * 64, "metrics": {},
        "created_at": "2026-11-26T10:00:00Z", "code_version": "t", "tokenizer_files": ["tokenizer.json"],
        "files": {k: sha(files[k]) for k in ("tokenizer.json", "config.json", "labels.json")},
        "variants": {
            "fp32": {"file": "model.onnx", "sha256": sha(files["model.onnx"]), "size": 10, "precision": "fp32",
                     "provider": "CPUExecutionProvider", "published": True},
            "int8": {"file": "model.int8.onnx", "sha256": sha(b"int8"), "size": 4, "precision": "int8",
                     "provider": "CPUExecutionProvider", "published": False},
        },
        "parity": {},
    }  # fmt: skip
    validate_manifest(doc)
    (d / "manifest.json").write_text(json.dumps(doc))
    return d


class FakeS3:
    """The four S3 calls the artifact module makes, in memory, with the order of writes."""

    def __init__(self):
        self.objects, self.writes = {}, []

    def upload_file(self, filename, bucket, key):
        self.put_object(Bucket=bucket, Key=key, Body=open(filename, "rb").read())

    def put_object(self, Bucket, Key, Body, **_):
        self.objects[(Bucket, Key)] = Body
        self.writes.append(Key)

    def get_object(self, Bucket, Key):
        if (Bucket, Key) not in self.objects:
            raise KeyError(f"NoSuchKey {Key}")
        return {"Body": io.BytesIO(self.objects[(Bucket, Key)])}

    def download_file(self, bucket, key, filename):
        open(filename, "wb").write(self.get_object(bucket, key)["Body"].read())


def test_verify_checks_every_published_file(artifact):
    assert verify_artifact(artifact)["name"] == "toy"
    (artifact / "model.int8.onnx").write_bytes(b"changed")  # unpublished: not checked
    verify_artifact(artifact)
    (artifact / "model.onnx").write_bytes(b"fp32-bytez")  # same size, other bytes
    with pytest.raises(ArtifactError, match="model.onnx: sha256"):
        verify_artifact(artifact)
    (artifact / "model.onnx").write_bytes(b"short")
    with pytest.raises(ArtifactError, match="model.onnx: size 5 != manifest 10"):
        verify_artifact(artifact)


def test_a_directory_without_a_valid_manifest_is_refused(artifact):
    (artifact / "manifest.json").write_text('{"name": "toy"}')
    with pytest.raises(ArtifactError, match="missing field 'version'"):
        verify_artifact(artifact)
    (artifact / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        verify_artifact(artifact)


def test_publish_uploads_published_files_then_the_manifest(artifact, tmp_path):
    s3 = FakeS3()
    publish_artifact(artifact, "s3://models-bkt/models/toy/1", s3)
    assert s3.writes[-1] == "models/toy/1/manifest.json"
    assert "models/toy/1/model.int8.onnx" not in s3.writes
    assert sorted(s3.writes[:-1]) == sorted(
        f"models/toy/1/{f}" for f in ("model.onnx", "tokenizer.json", "config.json", "labels.json")
    )
    got = fetch_artifact("s3://models-bkt/models/toy/1/", tmp_path / "dl", s3)
    assert (got / "model.onnx").read_bytes() == b"fp32-bytes"
    s3.objects[("models-bkt", "models/toy/1/config.json")] = b"{ }"
    with pytest.raises(ArtifactError, match="config.json: sha256"):
        fetch_artifact("s3://models-bkt/models/toy/1/", tmp_path / "dl2", s3)
    assert not (tmp_path / "dl2" / "manifest.json").exists()
    with pytest.raises(ArtifactError, match="cannot read manifest"):
        fetch_artifact("s3://models-bkt/models/none/1/", tmp_path / "dl3", s3)


def test_publish_refuses_a_tampered_directory_before_uploading(artifact):
    (artifact / "labels.json").write_text('["b", "a"]')
    s3 = FakeS3()
    with pytest.raises(ArtifactError, match="labels.json"):
        publish_artifact(artifact, "s3://models-bkt/models/toy/1/", s3)
    assert s3.writes == []


@pytest.mark.parametrize("uri", ["models/x/1", "s3://", "s3://bucket", "s3://bucket/", "http://b/x"])
def test_bad_uris(uri):
    with pytest.raises(ArtifactError):
        parse_s3_uri(uri)


# ---------------------------------------------------------------- int8 graph rewrite


def test_softened_padding_mask_keeps_attention_weights_and_leaves_other_constants():
    """The int8 export swaps the float32-minimum padding mask for a finite one (ORT's CPU Softmax
    is ~8x slower on the denormals the minimum produces): padded positions must still get no
    weight, and unrelated constants must stay as they are."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from inference.export import _soften_padding_mask

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.float32(value)))

    graph = helper.make_graph(
        [
            const("minf", np.finfo(np.float32).min),
            const("zero", 0.0),
            const("other_min", np.finfo(np.float32).min),  # not a mask: feeds Max
            helper.make_node("Where", ["pad", "minf", "zero"], ["mask"]),
            helper.make_node("Add", ["scores", "mask"], ["masked"]),
            helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
            helper.make_node("Max", ["scores", "other_min"], ["floor"]),
        ],
        "attention",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 6]),
            helper.make_tensor_value_info("pad", TensorProto.BOOL, [2, 6]),
        ],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, [2, 6]),
            helper.make_tensor_value_info("floor", TensorProto.FLOAT, [2, 6]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    scores = np.array([[3.0, -2.0, 8.0, 1.0, 0.5, 9.0], [-4.0, 2.0, 2.0, 7.0, -1.0, 0.0]], np.float32)
    pad = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]], bool)

    def run(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"scores": scores, "pad": pad})

    before = run(model)
    assert _soften_padding_mask(model) == 1
    after = run(model)
    assert np.all(after[0][pad] < 1e-15)  # padded positions (even a top score of 9) get no weight
    np.testing.assert_allclose(after[0], before[0], atol=1e-7)
    np.testing.assert_array_equal(after[1], before[1])
    assert _soften_padding_mask(model) == 0  # nothing left to replace
