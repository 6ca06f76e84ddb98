"""Event envelopes and typed details, from the sample payloads in tests/fixtures/events/."""

import json
from pathlib import Path

import pytest

from chalicelib.errors import Skip
from chalicelib.events import (
    InstanceStateChange,
    MalformedEvent,
    ObjectCreated,
    SpotInterruption,
    parse_event,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "events"


def load(name):
    return json.loads((FIXTURES / name).read_text())


def test_ec2_state_change_and_spot_warning():
    ev = parse_event(load("ec2_state_change.json"))
    assert ev == InstanceStateChange("i-abcd1111", "running", "2026-11-26T10:00:00Z")
    spot = parse_event(load("ec2_spot_interruption.json"))
    assert isinstance(spot, SpotInterruption) and spot.instance_id == "i-0b662ef9931388ba0"


def test_s3_dataset_and_manifest():
    ds = parse_event(load("s3_object_created_dataset.json"))
    assert isinstance(ds, ObjectCreated) and ds.kind == "dataset"
    assert ds.uri == "s3://nlpfleet-dev-data/datasets/banking77/train.csv"
    assert ds.identity == "uhggCJ2_B6gU2JaXWXebnXFDstO0ID6G"
    m = parse_event(load("s3_object_created_manifest.json"))
    assert (m.kind, m.model_name, m.model_version) == ("manifest", "banking77", "20261126-104500")
    assert m.identity == "seq:0064D39A2E00012345"  # unversioned bucket: the PUT's sequencer


@pytest.mark.parametrize(
    "key",
    [
        "datasets/a.csv.job.json",
        "datasets/dir/",
        "models/m/v/model.onnx",
        "logs/x",
        "datasets/banking77/dev.csv",
        "datasets/banking77/Test.jsonl",
        "datasets/banking77/README.md",
        "datasets/imdb/validation.jsonl",
    ],
)
def test_known_no_ops_are_skips(key):
    ev = load("s3_object_created_dataset.json")
    ev["detail"]["object"]["key"] = key
    with pytest.raises(Skip):
        parse_event(ev)


@pytest.mark.parametrize(
    "key", ["datasets/banking77/train.csv", "datasets/devices.csv", "datasets/contest.csv"]
)
def test_training_files_are_datasets(key):
    ev = load("s3_object_created_dataset.json")
    ev["detail"]["object"]["key"] = key
    assert parse_event(ev).kind == "dataset"


def test_held_out_split_skip_names_the_fix():
    ev = load("s3_object_created_dataset.json")
    ev["detail"]["object"]["key"] = "datasets/banking77/dev.csv"
    with pytest.raises(Skip, match="held-out split .*eval_uri"):
        parse_event(ev)


def test_malformed_and_foreign_events():
    with pytest.raises(MalformedEvent):
        parse_event({"source": "aws.ec2"})
    bad = load("ec2_state_change.json")
    bad["detail"]["instance-id"] = 42
    with pytest.raises(MalformedEvent):
        parse_event(bad)
    other = load("ec2_state_change.json")
    other["source"] = "aws.health"
    with pytest.raises(Skip):
        parse_event(other)
