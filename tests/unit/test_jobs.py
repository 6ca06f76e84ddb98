"""Job requests and the job state machine (pure, no AWS)."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chalicelib import jobs as J
from chalicelib.errors import InvalidJobSpec, InvalidTransition, Skip

NOW = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
URI = "s3://nlpfleet-dev-data/datasets/banking77/train.csv"


def spec(**kw):
    return J.parse_job_spec({"type": "finetune", "input_uri": URI, "model_name": "banking77", **kw})


def launched_job(**kw):
    job = J.new_job("j-1", spec(**kw), NOW)
    return J.launched(
        job, instance_id="i-1", instance_type="g4dn.xlarge", market="spot", hourly_usd=0.526, now=NOW
    )


def test_defaults_are_filled_and_types_checked():
    s = spec()
    assert (s["epochs"], s["batch_size"], s["precision"], s["allow_spot"], s["base_model"]) == (
        3,
        32,
        "fp16",
        True,
        "all-MiniLM-L6-v2",
    )
    with pytest.raises(InvalidJobSpec) as e:
        J.parse_job_spec(
            {
                "type": "finetune",
                "input_uri": URI,
                "model_name": "Bad Name",
                "epochs": 2.5,
                "allow_spot": "yes",
                "deadline_h": -1,
                "instance_type": "z9.mega",
            }
        )
    assert set(e.value.fields) == {"model_name", "epochs", "allow_spot", "deadline_h", "instance_type"}


def test_unknown_base_model_needs_a_parameter_count():
    with pytest.raises(InvalidJobSpec) as e:
        spec(base_model="my-org/custom-bert")
    assert "model_params" in e.value.fields
    w = J.workload_for(spec(base_model="my-org/custom-bert", model_params=200_000_000), 6_000_000)
    assert w.params == 200_000_000 and w.examples == 100_000 and w.kind == "train"


def test_batch_infer_fields():
    with pytest.raises(InvalidJobSpec) as e:
        J.parse_job_spec({"type": "batch_infer", "input_uri": URI, "model_version": "v1", "epochs": 1})
    assert e.value.fields == {
        "model_version": "needs model_name",
        "epochs": "unknown field for a batch_infer job",
    }


def test_lifecycle_with_history_attempts_and_cost():
    job = launched_job()
    job = J.record_progress(job, {"step": 5, "epoch": 0}, NOW + timedelta(minutes=1))
    assert job.state == J.RUNNING and job.heartbeat_at
    job = J.record_progress(job, {"step": 9}, NOW + timedelta(minutes=2), metrics={"loss": 0.4})
    assert job.progress == {"step": 9} and job.metrics == {"loss": 0.4}
    job = J.finish(job, ok=True, now=NOW + timedelta(hours=2), result={"model_uri": "s3://x/m/v/"})
    assert [h["to"] for h in job.history] == ["QUEUED", "LAUNCHED", "RUNNING", "SUCCEEDED"]
    assert J.cost_so_far(job, NOW + timedelta(hours=10)) == pytest.approx(2 * 0.526)
    with pytest.raises(InvalidTransition):
        J.record_progress(job, {"step": 10}, NOW)


def test_instance_events_decide_relaunch_then_fail():
    job = launched_job(max_attempts=2)
    d = J.decide_instance_state(job, "i-1", "terminated", 3)
    assert d.action == "relaunch" and "attempt 2 of 2" in d.reason
    job = J.launched(
        job, instance_id="i-2", instance_type="g4dn.xlarge", market="spot", hourly_usd=0.5, now=NOW
    )
    with pytest.raises(Skip):
        J.decide_instance_state(job, "i-1", "terminated", 3)  # the previous attempt's instance
    d = J.decide_instance_state(job, "i-2", "terminated", 3)
    assert d.action == "fail" and "2 attempt(s)" in d.reason
    with pytest.raises(Skip):
        J.decide_instance_state(job, "i-2", "pending", 3)


def test_spot_warning_then_gone_relaunches():
    job = launched_job()
    job = J.transition(job, J.INTERRUPTED, reason=J.decide_spot_warning(job, "i-1").reason, now=NOW)
    with pytest.raises(Skip):
        J.decide_spot_warning(job, "i-1")
    assert J.decide_instance_state(job, "i-1", "shutting-down", 3).action == "relaunch"


def test_stale_decisions():
    job = J.record_progress(launched_job(), {"step": 1}, NOW)
    kw = dict(heartbeat_timeout_s=600, boot_grace_s=900, interrupted_grace_s=300, max_attempts=3)
    assert J.decide_stale(job, NOW + timedelta(seconds=599), **kw) is None
    d = J.decide_stale(job, NOW + timedelta(seconds=601), **kw)
    assert d.action == "fail" and d.terminate == "i-1"
    booting = launched_job()
    assert J.decide_stale(booting, NOW + timedelta(seconds=1400), **kw) is None  # boot grace
    assert J.decide_stale(booting, NOW + timedelta(seconds=1600), **kw).action == "fail"
    interrupted = J.transition(job, J.INTERRUPTED, reason="spot", now=NOW)
    assert J.decide_stale(interrupted, NOW + timedelta(seconds=400), **kw).action == "relaunch"


OPS = st.lists(
    st.sampled_from(["launch", "running", "progress", "interrupt", "succeed", "fail", "cancel"]), max_size=25
)


def apply(job, op, t):
    if op == "launch":
        return J.launched(
            job,
            instance_id=f"i-{t}",
            instance_type="c5.xlarge",
            market="spot",
            hourly_usd=0.17,
            now=NOW + timedelta(seconds=t),
        )
    if op == "progress":
        return J.record_progress(job, {"step": t}, NOW + timedelta(seconds=t))
    to = {
        "running": J.RUNNING,
        "interrupt": J.INTERRUPTED,
        "succeed": J.SUCCEEDED,
        "fail": J.FAILED,
        "cancel": J.CANCELLED,
    }[op]
    return J.transition(job, to, reason=op, now=NOW + timedelta(seconds=t))


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_the_state_machine_never_leaves_a_terminal_state(ops):
    job = J.new_job("j-h", spec(), NOW)
    terminal_at = None
    for t, op in enumerate(ops):
        before = job
        try:
            job = apply(job, op, t)
        except InvalidTransition:
            assert job == before
            continue
        assert job.state in J.ALLOWED[before.state] or job.state == before.state
        if terminal_at is not None:
            raise AssertionError(f"left terminal state via {op}")
        if job.terminal:
            terminal_at = t
        assert len(job.history) >= len(before.history)
    # history is the sequence of states the job went through
    assert job.history[-1]["to"] == job.state or job.state == J.RUNNING
    assert all(a["ended_at"] for a in job.attempts[:-1])


def test_replace_keeps_record_frozen():
    job = launched_job()
    with pytest.raises(AttributeError):
        job.state = J.FAILED  # type: ignore[misc]
    assert replace(job, version=3).version == 3


def test_a_job_never_launched_is_failed_by_the_sweep_after_boot_grace():
    job = J.new_job("j-q", spec(), NOW)
    kw = dict(heartbeat_timeout_s=600, boot_grace_s=900, interrupted_grace_s=300, max_attempts=3)
    assert J.decide_stale(job, NOW + timedelta(seconds=800), **kw) is None
    d = J.decide_stale(job, NOW + timedelta(seconds=1000), **kw)
    assert d.action == "fail" and "never launched" in d.reason and d.terminate is None
