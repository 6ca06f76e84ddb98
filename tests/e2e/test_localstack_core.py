"""The local stand-in's machinery, with a throwaway Chalice app: the template a deployment uses
becomes moto resources, S3 uploads and schedules reach the handlers with AWS's event shapes."""

import json
import textwrap
from datetime import UTC, datetime

import pytest

from localstack.clock import Clock, Scheduler, next_fire
from localstack.deploy import chalice_package, deploy
from localstack.dispatcher import Dispatcher, Route, is_scheduled_event, load_handler

APP = textwrap.dedent(
    """
    import os
    import boto3
    from chalice import Chalice

    app = Chalice(app_name="throwaway")
    calls = []

    @app.route("/ping")
    def ping():
        return {"ok": True}

    @app.on_cw_event({"source": ["aws.s3"], "detail-type": ["Object Created"],
                      "detail": {"object": {"key": [{"prefix": "datasets/"}]}}})
    def on_dataset(event):
        calls.append(("dataset", event.to_dict()))
        boto3.client("dynamodb").put_item(
            TableName=os.environ["TABLE"], Item={"pk": {"S": event.detail["object"]["key"]}})

    @app.schedule("rate(1 minute)")
    def tick(event):
        calls.append(("tick", event.to_dict()))

    @app.on_cw_event({"source": ["test.fail"]})
    def always_fails(event):
        calls.append(("fail", event.to_dict()))
        raise RuntimeError("boom")
    """
)

INFRA = {
    "Resources": {
        "Bucket": {
            "Type": "AWS::S3::Bucket",
            "Properties": {
                "NotificationConfiguration": {"EventBridgeConfiguration": {"EventBridgeEnabled": True}}
            },
        },
        "Table": {
            "Type": "AWS::DynamoDB::Table",
            "Properties": {
                "BillingMode": "PAY_PER_REQUEST",
                "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}],
                "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
            },
        },
    },
    "Outputs": {"BucketName": {"Value": {"Ref": "Bucket"}}},
}


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    root = tmp_path_factory.mktemp("throwaway")
    (root / "app.py").write_text(APP)
    (root / ".chalice").mkdir()
    (root / ".chalice" / "config.json").write_text(
        json.dumps(
            {
                "version": "2.0",
                "app_name": "throwaway",
                "stages": {"dev": {"environment_variables": {"TABLE": "placeholder"}}},
            }
        )
    )
    infra = root / "infra.json"
    infra.write_text(json.dumps(INFRA))
    template = chalice_package(root, root / "out", merge_template=infra)
    doc = json.loads(template.read_text())
    # the stage's variable is wired to the table the way infra templates do it
    for res in doc["Resources"].values():
        if res["Type"] == "AWS::Serverless::Function":
            res["Properties"]["Environment"]["Variables"]["TABLE"] = {"Ref": "Table"}
    return root, doc


def test_cron_and_rate_follow_eventbridge_semantics():
    fri = datetime(2026, 11, 27, 21, 0, tzinfo=UTC)
    assert next_fire("cron(0 8 ? * MON-FRI *)", fri) == datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    assert next_fire("cron(0/15 * * * ? *)", fri) == datetime(2026, 11, 27, 21, 15, tzinfo=UTC)
    assert next_fire("cron(30 22 ? * 1 *)", fri) == datetime(2026, 11, 29, 22, 30, tzinfo=UTC)  # 1 = Sunday
    anchor = datetime(2026, 11, 27, 9, 0, 10, tzinfo=UTC)
    assert next_fire("rate(1 minute)", anchor.replace(minute=3), anchor) == anchor.replace(minute=4)
    with pytest.raises(ValueError):
        next_fire("cron(0 8 * * MON *)", fri)  # one day field must be '?'
    with pytest.raises(ValueError):
        next_fire("rate(1 minutes)", fri)


def test_clock_runs_faster_than_real_time():
    t = [0.0]
    clock = Clock(speed=60, start=1_000_000.0, monotonic=lambda: t[0])
    t[0] = 2.0
    assert clock.now() == 1_000_120.0
    assert clock.real_seconds(60) == 1.0


def test_instances_read_the_same_clock_from_their_environment():
    """The agents stamp their datapoints on the stand-in's clock, not this machine's."""
    from inference.agent import WallClock

    clock = Clock(speed=6, start=2_000_000_000.0)
    theirs = WallClock.from_env({"NLPFLEET_LOCAL_CLOCK": clock.env_value()})
    assert theirs.speed == 6 and abs(theirs() - clock.now()) < 0.5
    assert abs(theirs() - 2_000_000_000.0) < 60


def test_template_becomes_moto_resources_and_events_reach_handlers(aws, packaged, monkeypatch):
    root, doc = packaged
    dep = deploy(doc, aws.client, stack_name="throwaway")
    assert {f.logical_id for f in dep.functions} == {"APIHandler", "OnDataset", "Tick", "AlwaysFails"}
    table = aws.client("dynamodb").list_tables()["TableNames"][0]
    assert dep.environment()["TABLE"] == table

    routes = [
        Route(
            f.logical_id,
            dep.queues[f.logical_id],
            load_handler(f.handler, root),
            accept=is_scheduled_event if f.logical_id == "Tick" else None,
        )
        for f in dep.functions
        if f.logical_id in dep.queues
    ]
    calls = load_handler("app.calls", root)
    calls.clear()
    dispatcher = Dispatcher(routes, aws.client, retry_backoff_s=0)

    for k, v in (aws.env | dep.environment()).items():  # what Lambda's environment holds
        monkeypatch.setenv(k, v)
    s3 = aws.client("s3")
    bucket = dep.outputs["BucketName"]
    s3.put_object(Bucket=bucket, Key="datasets/a.csv", Body=b"text,label\n")
    s3.put_object(Bucket=bucket, Key="models/x/manifest.json", Body=b"{}")  # matches no rule
    dispatcher.drain(timeout_s=20)
    kinds = [k for k, _ in calls]
    assert kinds == ["dataset"]
    event = calls[0][1]
    assert event["source"] == "aws.s3" and event["detail-type"] == "Object Created"
    assert event["detail"]["bucket"]["name"] == bucket
    items = aws.client("dynamodb").scan(TableName=table)["Items"]
    assert items == [{"pk": {"S": "datasets/a.csv"}}]

    # a schedule fires on the local clock, with the Scheduled Event envelope
    clock = Clock(speed=600)
    sched = Scheduler(clock, aws.client)
    sched.refresh()
    clock._virt0 += 61  # a minute passes on the local clock
    assert sched.due() == 1
    dispatcher.drain(timeout_s=20)
    tick = [e for k, e in calls if k == "tick"]
    assert len(tick) == 1 and tick[0]["detail-type"] == "Scheduled Event"
    assert tick[0]["resources"][0].startswith("arn:aws:events:us-east-1:123456789012:rule/")

    # a handler that keeps failing is retried, then its event is dropped and reported
    aws.client("events").put_events(Entries=[{"Source": "test.fail", "DetailType": "x", "Detail": "{}"}])
    dispatcher.drain(timeout_s=20, quiet_s=1.5)
    assert [k for k, _ in calls].count("fail") == 3
    assert len(dispatcher.failures) == 1 and "boom" in dispatcher.failures[0]["error"]
