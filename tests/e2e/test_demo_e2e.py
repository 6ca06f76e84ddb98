"""The whole product end to end on this machine (a shorter configuration of ``make demo``),
with the fault cases injected through the same harness:

- a job instance terminated mid-training (as by a spot reclaim) is relaunched by the control
  plane and resumes from its checkpoint; the job succeeds with accuracy above a floor;
- the dataset's S3 event delivered twice creates one job;
- a corrupt model upload is refused while the published model keeps serving;
- the fleet scales out and back in through the lifecycle hooks (warm-up, drain) while the trace
  is replayed, with zero failed admitted requests;
- an inference instance killed without drain is replaced and the load balancer stops sending it
  traffic;
- nothing keeps running afterwards.
"""

import json
import os
import re
import time
from pathlib import Path

import pytest

from nlpfleet.local_demo import Hooks, Session, run, short_config

ACCURACY_FLOOR = 0.5  # ten intents (chance 10 %), 25 optimizer steps on 40 examples per intent


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Faults(Hooks):
    def __init__(self):
        self.job_instance_killed = None
        self.dataset_event = None
        self.seen = {}
        self.floor_down_at = None
        self.pids = set()

    # -- training: terminate the job's instance once it has trained a few steps
    def job_progress(self, s: Session, job: dict) -> None:
        if self.dataset_event is None:  # the upload's event, as the dispatcher delivered it
            route = s.local()["dispatcher"]["OnObjectCreated"]
            self.dataset_event = next(
                (e for e in route["recent"] if e["detail"]["object"]["key"].endswith("train.csv")), None
            )
        prog = job.get("progress") or {}
        inst = job.get("instance") or {}
        if self.job_instance_killed is None and job["state"] == "RUNNING" and (prog.get("step") or 0) >= 8:
            self.job_instance_killed = inst["instance_id"]
            s.ec2.terminate_instances(InstanceIds=[inst["instance_id"]])

    def after_rollout(self, s: Session) -> dict:
        out = {}
        # the dataset's S3 event again, exactly as delivered: no second job
        route = s.local()["dispatcher"]["OnObjectCreated"]
        assert self.dataset_event is not None
        s.sqs.send_message(QueueUrl=route["queue_url"], MessageBody=json.dumps(self.dataset_event))
        # a corrupt model upload: a manifest that is not JSON, under a new version
        s.s3.put_object(
            Bucket=s.bucket, Key="models/banking77/corrupt-1/manifest.json", Body=b'{"name": "banki'
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            n = s.local()["dispatcher"]["OnObjectCreated"]["invocations"]
            if n >= route["invocations"] + 2:
                break
            time.sleep(0.5)
        out["jobs"] = [j["job_id"] for j in s.jobs()]
        out["models"] = s.api.get("/models").json()
        # raise the floor to three instances: the fleet scales out through the launch hook
        s.update_functions({"SCALING_MIN_SIZE": "3"})
        return out

    def during_replay(self, s: Session, t: float) -> None:
        for i in s.local()["instances"]:
            if i["pid"]:
                self.pids.add(i["pid"])
        if self.floor_down_at is None:
            g = s.group()
            in_service = sum(i["LifecycleState"] == "InService" for i in g.get("Instances", []))
            if in_service >= 3:  # scaled out: let the night come (floor back to one)
                self.floor_down_at = t
                s.update_functions({"SCALING_MIN_SIZE": "1"})

    def after_replay(self, s: Session) -> dict:
        # kill a serving instance without drain, under light load
        import asyncio

        from localstack.replay import replay

        # two instances serving (the floor at two), then one of them dies
        s.update_functions({"SCALING_MIN_SIZE": "2"})
        deadline = time.monotonic() + 90
        serving = []
        while time.monotonic() < deadline and len(serving) < 2:
            serving = [t["target_id"] for t in s.local()["lb"]["targets"] if t["state"] == "healthy"]
            time.sleep(1)
        assert len(serving) >= 2, serving
        victim = serving[0]
        s.kill(victim)
        t_kill = time.monotonic()
        plan = [(0.1 * k, 0) for k in range(150)]  # 10 req/s for 15 s
        results = asyncio.run(replay(s.lb_url + "/v1/classify", plan, ["I lost my card"]))
        # replaced: a new instance completes its launch hook and serves
        deadline = time.monotonic() + 60
        replaced = False
        while time.monotonic() < deadline and not replaced:
            g = s.group()
            ids = {i["InstanceId"]: i["LifecycleState"] for i in g.get("Instances", [])}
            healthy = {t["target_id"] for t in s.local()["lb"]["targets"] if t["state"] == "healthy"}
            replaced = ids.get(victim) != "InService" and any(
                iid not in serving and st == "InService" and iid in healthy for iid, st in ids.items()
            )
            time.sleep(1)
        lb = s.local()["lb"]
        for i in s.local()["instances"]:
            if i["pid"]:
                self.pids.add(i["pid"])
        return {
            "victim": victim,
            "replaced": replaced,
            "kill_to_end_s": time.monotonic() - t_kill,
            "results": [(r.sent_at, r.status, r.target) for r in results],
            "victim_target": next((t for t in lb["targets"] if t["target_id"] == victim), None),
        }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_product_end_to_end_with_faults(tmp_path, data_dir):
    faults = Faults()
    cfg = short_config(
        state_dir=tmp_path / "stack",
        data_dir=data_dir,
        out_dir=tmp_path / "out",
        env={"SCALING_SCALE_IN_STABILIZATION_S": "15", "SCALING_SCALE_IN_MAX_STEP_FRACTION": "1"},
    )
    summary = run(cfg, faults)
    print(
        json.dumps({k: summary.get(k) for k in ("job", "traffic", "decisions", "elapsed_s")}, default=str)[
            :4000
        ]
    )

    # the job: relaunched after its instance was terminated, resumed from its checkpoint
    job = summary["job"]
    assert job["state"] == "SUCCEEDED"
    assert faults.job_instance_killed is not None
    assert job["attempt"] >= 2
    accuracy = (job.get("metrics") or {}).get("accuracy") or job["result"]["metrics"]["accuracy"]
    assert accuracy > ACCURACY_FLOOR
    consoles = [
        Path(i["log"]).read_text(errors="replace")
        for i in summary["local"]["instances"]
        if i["job_id"] == job["job_id"] and i["instance_id"] != faults.job_instance_killed
    ]
    resumed = [int(m) for c in consoles for m in re.findall(r"resumed from .* \(step (\d+)", c)]
    assert resumed and resumed[0] > 0

    # one job for the duplicated event; the corrupt manifest refused, the published model active
    after = summary["after_rollout"]
    assert after["jobs"] == [job["job_id"]]
    models = after["models"]
    assert [m["version"] for m in models["models"]] == [summary["model"]["version"]]
    assert any("corrupt-1" in bad["key"] for bad in models["invalid"])
    assert models["active"]["version"] == summary["model"]["version"]

    # scale-out and scale-in through the lifecycle hooks, no failed admitted request
    traffic = summary["traffic"]
    assert traffic["served"] > 0
    assert traffic["failed"] == 0, traffic["failures"]
    desired = [x["desired"] for x in summary["samples"]]
    peak = desired.index(max(desired))
    assert max(desired) >= 3 and min(desired[peak:]) <= 1  # out, then back in
    hooks = summary["lifecycle"]
    assert sum(a["kind"] == "launch" for a in hooks) >= 3
    assert any(a["kind"] == "terminate" for a in hooks)
    assert len({t for t in traffic["by_target"]}) >= 2  # more than one instance served

    # a killed instance is replaced; the load balancer stops sending it traffic
    kill = summary["after_replay"]
    assert kill["replaced"]
    late = [r for r in kill["results"] if r[0] > 5.0]  # after health checks noticed it
    assert late and all(target != kill["victim"] for _, _, target in late)
    assert all(status == 200 for _, status, _ in late)

    # everything stopped
    assert summary["stopped"]
    assert not any(alive(p) for p in faults.pids)
    assert not (tmp_path / "stack" / "stack.json").exists()
    assert Path(summary["timeline_png"]).stat().st_size > 10_000
