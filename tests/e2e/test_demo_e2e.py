"""The whole product end to end on this machine (a shorter configuration of ``make demo``),
with the fault cases injected through the same harness, on one stack:

- a job instance terminated mid-training (as by a spot reclaim) is relaunched by the control
  plane and resumes from its checkpoint; the job succeeds with accuracy above a floor, and its
  model is published and served (the autoscaler holds the fleet at zero until then);
- the dataset's S3 event delivered twice creates one job;
- a corrupt model upload is refused while the published model keeps serving;
- while the trace is replayed: a new model version rolls out to the serving fleet, an inference
  instance killed without drain is replaced and the load balancer stops sending it traffic, and
  the fleet scales in through the drain hook, with zero failed admitted requests throughout
  (it scaled out to three through the launch hook at the first rollout);
- nothing keeps running afterwards.
"""

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from nlpfleet.local_demo import Hooks, Session, run, short_config

ACCURACY_FLOOR = 0.5  # ten intents (chance 10 %), one epoch of 25 optimizer steps, 40 examples per intent


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
    def __init__(self, rollout_artifact: Path):
        self.rollout_artifact = rollout_artifact
        self.rollout_version = json.loads((rollout_artifact / "manifest.json").read_text())["version"]
        self.job_instance_killed = None
        self.dataset_event = None
        self.pids: set[int] = set()
        self.t: dict[str, float] = {}  # when each step of the replay happened (seconds into it)
        self.victim = None
        self.replacement = None

    # -- training: terminate the job's instance once it has trained a few steps
    def job_progress(self, s: Session, job: dict) -> None:
        if self.dataset_event is None:  # the upload's event, as the dispatcher delivered it
            route = s.local()["dispatcher"]["OnObjectCreated"]
            self.dataset_event = next(
                (e for e in route["recent"] if e["detail"]["object"]["key"].endswith("train.csv")), None
            )
        self._pids(s)
        prog = job.get("progress") or {}
        inst = job.get("instance") or {}
        if self.job_instance_killed is None and job["state"] == "RUNNING" and (prog.get("step") or 0) >= 3:
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
            if s.local()["dispatcher"]["OnObjectCreated"]["invocations"] >= route["invocations"] + 2:
                break
            time.sleep(0.2)
        out["jobs"] = [j["job_id"] for j in s.jobs()]
        out["models"] = s.api.get("/models").json()
        return out

    # -- the fleet, under the trace's traffic: rollout, crash, scale-in
    def during_replay(self, s: Session, t: float) -> str | None:
        self._pids(s)
        g = s.group()
        states = {i["InstanceId"]: i["LifecycleState"] for i in g.get("Instances", [])}
        healthy = [x["target_id"] for x in s.local()["lb"]["targets"] if x["state"] == "healthy"]
        if "rollout" not in self.t and len(healthy) >= 3:
            from inference.artifact import publish_artifact

            uri = f"s3://{s.bucket}/models/banking77/{self.rollout_version}/"
            publish_artifact(self.rollout_artifact, uri, s.s3)
            self.t["rollout"] = t
        elif "rollout" in self.t and "rolled_out" not in self.t:
            if healthy and all(self._serves(s, i) == self.rollout_version for i in healthy):
                self.t["rolled_out"] = t
        elif "rolled_out" in self.t and self.victim is None:
            self.victim = healthy[0]  # crash it: no drain, no lifecycle hook from its agent
            self.before_kill = set(states)
            s.kill(self.victim)
            self.t["kill"] = t
        elif self.victim is not None and self.replacement is None:
            new = [i for i in healthy if i not in self.before_kill and states.get(i) == "InService"]
            if new and states.get(self.victim) != "InService":
                self.replacement = new[0]
                self.t["replaced"] = t
                s.update_functions({"SCALING_MIN_SIZE": "1"})  # the night: floor back to one
        elif self.replacement is not None:
            settled = not any(st.endswith(":Wait") for st in states.values())
            if g.get("DesiredCapacity") == 1 and len(states) == 1 and settled:
                self.t["scaled_in"] = t
                return "scaled back in to one instance"
        return None

    @staticmethod
    def _serves(s: Session, instance_id: str) -> str | None:
        inst = next((i for i in s.local()["instances"] if i["instance_id"] == instance_id), None)
        try:
            r = httpx.get(f"http://127.0.0.1:{inst['port']}/readyz", timeout=2)
            return r.json()["model"]["version"]
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            return None

    def _pids(self, s: Session) -> None:
        for i in s.local()["instances"]:
            if i["pid"]:
                self.pids.add(i["pid"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_product_end_to_end_with_faults(tmp_path, data_dir, trained_artifact):
    faults = Faults(Path(trained_artifact))
    cfg = short_config(
        state_dir=tmp_path / "stack",
        data_dir=data_dir,
        out_dir=tmp_path / "out",
        env={"SCALING_SCALE_IN_STABILIZATION_S": "30", "SCALING_SCALE_IN_MAX_STEP_FRACTION": "1"},
    )
    summary = run(cfg, faults)
    brief = {k: summary.get(k) for k in ("job", "traffic", "decisions", "phases", "elapsed_s")}
    print(json.dumps({**brief, "replay_steps": faults.t}, default=str)[:4000])

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
    job_version = summary["model"]["version"]
    assert [m["version"] for m in models["models"]] == [job_version]
    assert any("corrupt-1" in bad["key"] for bad in models["invalid"])
    assert models["active"]["version"] == job_version

    # under traffic: the job's model served, then the new version rolled out, with no failure
    traffic = summary["traffic"]
    # A crash cuts the requests the victim had already admitted (an ALB answers those 502 too):
    # those, and only those, may fail; nothing during the rollout or the scale-in, and nothing
    # sent to the victim once the load balancer saw it gone.
    cut = [
        f
        for f in traffic["failures"]
        if f["target"] == faults.victim and f["status"] == 502 and f["sent_at"] <= faults.t["kill"] + 1.0
    ]
    assert len(cut) <= 2 and traffic["failed"] == len(cut), traffic["failures"]
    assert {"rollout", "rolled_out", "kill", "replaced", "scaled_in"} <= set(faults.t), faults.t
    served = [(t, target, model) for t, status, target, model in summary["results"] if status == 200]
    first, last = [m for _, _, m in served[:20]], [m for _, _, m in served[-20:]]
    assert first and all(m == f"banking77/{job_version}" for m in first)
    assert last and all(m == f"banking77/{faults.rollout_version}" for m in last)

    # a killed instance is replaced; the load balancer stops sending it traffic
    late = [(t, status, target) for t, status, target, _ in summary["results"] if t > faults.t["kill"] + 5]
    assert late and all(target != faults.victim for _, _, target in late)
    assert all(status == 200 for _, status, _ in late)

    # scale-out (at the first rollout) and scale-in through the lifecycle hooks
    desired = [x["desired"] for x in summary["samples"]]
    peak = desired.index(max(desired))
    assert max(desired) >= 3 and min(desired[peak:]) <= 1
    hooks = summary["lifecycle"]
    assert sum(a["kind"] == "launch" for a in hooks) >= 4  # three, then the replacement
    assert sum(a["kind"] == "terminate" for a in hooks) >= 3  # the crashed one, then two drained
    assert len(traffic["by_target"]) >= 3  # more than one instance served

    # everything stopped
    assert summary["stopped"]
    assert not any(alive(p) for p in faults.pids)
    assert not (tmp_path / "stack" / "stack.json").exists()
    assert Path(summary["timeline_png"]).stat().st_size > 10_000
