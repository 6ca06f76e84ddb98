"""Running EC2 instances become local processes booted from their user data; EC2 state
changes stop them and are published as EventBridge events."""

import json
import sys
import textwrap
import time

import httpx

from localstack.instances import InstanceManager

# A stand-in for the AMI's entry point: a job writes its user data back and powers off;
# an inference box serves /readyz on the port its user data names until it is stopped.
ENTRY = textwrap.dedent(
    """
    import http.server, json, os, sys
    ud = json.load(open(sys.argv[2]))
    open("seen.json", "w").write(json.dumps({"ud": ud, "iid": os.environ["NLPFLEET_INSTANCE_ID"],
                                             "endpoint": os.environ.get("AWS_ENDPOINT_URL")}))
    if ud["role"] == "inference":
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers()
        http.server.HTTPServer(("127.0.0.1", ud["port"]), H).serve_forever()
    """
)


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def _launch(ec2, user_data, **kw):
    return ec2.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        InstanceType="c6i.large",
        UserData=json.dumps(user_data),
        **kw,  # boto3 base64-encodes it, as RunInstances needs
    )["Instances"][0]["InstanceId"]


def test_instances_follow_ec2_state(aws, tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    ec2, sqs, events = aws.client("ec2"), aws.client("sqs"), aws.client("events")
    q = sqs.create_queue(QueueName="ec2-events")["QueueUrl"]
    qarn = sqs.get_queue_attributes(QueueUrl=q, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name="ec2", EventPattern=json.dumps({"source": ["aws.ec2"]}))
    events.put_targets(Rule="ec2", Targets=[{"Id": "q", "Arn": qarn}])

    impaired = []
    mgr = InstanceManager(
        aws.client,
        tmp_path / "state",
        endpoint_url=aws.endpoint_url,
        base_env=aws.env,
        command=lambda ud: [sys.executable, str(entry), "--user-data", str(ud)],
        grace_s=3,
        on_impaired=impaired.append,
    )
    try:
        job = _launch(
            ec2,
            {"role": "job", "job_id": "j1", "endpoint_url": None},
            InstanceInitiatedShutdownBehavior="terminate",
        )
        web = _launch(ec2, {"role": "inference", "port": 8080, "endpoint_url": None})
        mgr.sync()
        inst = mgr.instances[web]
        assert inst.port and inst.port != 8080
        assert wait_for(lambda: _ok(inst.url))

        # the job's entry point ran with its own user data and powered off: EC2 terminated it
        assert wait_for(lambda: (mgr.sync() or True) and _state(ec2, job) == "terminated")
        seen = json.loads((mgr.instances[job].directory / "seen.json").read_text())
        assert seen["ud"]["job_id"] == "j1" and seen["iid"] == job
        assert seen["ud"]["endpoint_url"] == seen["endpoint"] == aws.endpoint_url

        # terminating the web box in EC2 stops its process
        ec2.terminate_instances(InstanceIds=[web])
        mgr.sync()
        assert wait_for(lambda: (mgr.sync() or True) and not inst.alive)
        assert not _ok(inst.url)

        # a crash: the process dies, EC2 still says running, the stack is told
        web2 = _launch(ec2, {"role": "inference", "endpoint_url": None})
        mgr.sync()
        assert wait_for(lambda: _ok(mgr.instances[web2].url))
        mgr.kill(web2)
        assert impaired and impaired[0].instance_id == web2
        assert _state(ec2, web2) == "running" and not mgr.instances[web2].alive
        mgr.sync()
        assert not mgr.instances[web2].alive  # a crashed box is not rebooted
    finally:
        mgr.stop()
    assert not mgr.running()

    bodies = []
    while True:
        msgs = sqs.receive_message(QueueUrl=q, MaxNumberOfMessages=10).get("Messages", [])
        if not msgs:
            break
        for m in msgs:
            bodies.append(json.loads(m["Body"]))
            sqs.delete_message(QueueUrl=q, ReceiptHandle=m["ReceiptHandle"])
    states = {(b["detail"]["instance-id"], b["detail"]["state"]) for b in bodies}
    assert {(job, "running"), (job, "terminated"), (web, "running"), (web, "terminated")} <= states
    assert all(b["detail-type"] == "EC2 Instance State-change Notification" for b in bodies)


def _ok(url):
    try:
        return httpx.get(url + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _state(ec2, iid):
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"]
