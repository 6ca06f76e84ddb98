"""Autoscaling blueprint: the per-minute scaling Lambda, the capacity-floor schedule and the Auto
Scaling lifecycle-action handlers for the inference fleet.

Registered by ``app.py`` with ``app.register_blueprint(autoscaling)``. Each handler reads the
same way: parse -> read state -> decide (pure, ``chalicelib.scaling`` / ``chalicelib.lifecycle``)
-> execute -> log once. The ``handle_*`` functions take the adapters and ``now`` so that tests
drive them with moto and a fixed clock; the Chalice handlers only wire the environment in.

Functions (Chalice names them after the handlers):

* ``scale_inference_fleet``      EventBridge schedule, every minute
* ``apply_capacity_floor``       EventBridge cron, every 30 minutes (floors per stage, time zone)
* ``on_instance_launch_action``  ``aws.autoscaling`` / ``EC2 Instance-launch Lifecycle Action``
* ``on_instance_terminate_action`` ``aws.autoscaling`` / ``EC2 Instance-terminate Lifecycle Action``

Time: every handler decides at ``event_time(event)``, the later of the event's ``time`` and the
wall clock (see there). The fleet is held at zero while no model is active (and none serves): an instance can only
warm up by loading the active model, so one launched before a model exists would be abandoned and
replaced in a loop.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from chalice import Blueprint, Cron, Rate

from chalicelib.errors import ConcurrentUpdate, Skip
from chalicelib.lifecycle import (
    LAUNCH_DETAIL_TYPE,
    TERMINATE_DETAIL_TYPE,
    Complete,
    Forget,
    MalformedLifecycleEvent,
    Put,
    decide_launch,
    decide_terminate,
    parse_lifecycle_event,
    sweep,
)
from chalicelib.scaling import Decision, FleetCounts, PolicyInput, PolicyState, decide, scheduled_floor
from chalicelib.scaling_settings import ScalingSettings

autoscaling = Blueprint(__name__)
log = logging.getLogger("nlpfleet.autoscaling")
log.setLevel(logging.INFO)


@dataclass
class ScalingAdapters:
    asg: Any
    metrics: Any
    store: Any
    model: Any  # the active-model parameter (``get()`` -> dict or None)

    @classmethod
    def from_settings(cls, s: ScalingSettings) -> ScalingAdapters:
        from chalicelib.aws import Clients
        from chalicelib.fleet import AutoScalingGroup, FleetMetrics, ScalingStore
        from chalicelib.storage import ActiveModel

        clients = Clients(os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        return cls(
            AutoScalingGroup(clients),
            FleetMetrics(clients),
            ScalingStore(clients, s.state_table),
            ActiveModel(clients, s.active_model_param),
        )


def event_time(raw: dict[str, Any], wall: float | None = None) -> float:
    """When a handler decides: the later of the event's ``time`` and the wall clock.

    EventBridge stamps a scheduled event with the time its schedule fired, and Lambda runs the
    handler at or after it: on AWS that is the wall clock within seconds, and a retried (late)
    delivery still decides on the present. An AWS stand-in whose clock runs faster than this
    machine's (the local stack's clock) stamps times ahead of the wall clock: the handler then
    follows that clock, as do the lifecycle actions and metric timestamps of the same stand-in.

    >>> event_time({"time": "2026-11-26T10:00:00Z"}, wall=1795687000.0)
    1795687200.0
    >>> event_time({"time": "2026-11-26T10:00:00Z"}, wall=1795687230.0)
    1795687230.0
    >>> event_time({}, wall=5.0)
    5.0
    """
    wall = time.time() if wall is None else wall
    try:
        stamped = datetime.fromisoformat(str(raw.get("time", "")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return wall
    return max(stamped, wall)


def _has_active_model(ad: ScalingAdapters) -> bool:
    active = ad.model.get()
    return bool(active and active.get("uri"))


def _log(event_name: str, **fields: Any) -> dict[str, Any]:
    doc = {"event": event_name, **fields}
    log.info(json.dumps(doc, default=str, sort_keys=True))
    return doc


def _execute_lifecycle(actions: list, s: ScalingSettings, ad: ScalingAdapters) -> list[str]:
    done = []
    for a in actions:
        if s.dry_run:
            done.append(f"would have {type(a).__name__} {a}")
            continue
        if isinstance(a, Put):
            ad.store.put_instance(a.record, a.expected_state)
            done.append(f"{a.record.instance_id}->{a.record.state}")
        elif isinstance(a, Forget):
            ad.store.forget_instance(a.instance_id)
            done.append(f"forget {a.instance_id}")
        elif isinstance(a, Complete):
            ok = ad.asg.complete(a.asg_name, a.hook_name, a.instance_id, a.token, a.result)
            done.append(f"{a.result} {a.instance_id}" + ("" if ok else " (no longer waiting)"))
    return done


# ------------------------------------------------------------------------------- scaling


def handle_scale(s: ScalingSettings, ad: ScalingAdapters, now: float) -> dict[str, Any]:
    """One scaling decision: sweep lifecycle records, read metrics and state, decide, store the
    state, set the desired capacity, log the decision with its inputs once."""
    group = ad.asg.describe(s.asg_name)
    lifecycle = _execute_lifecycle(sweep(ad.store.instances(), group.instances, s, now), s, ad)
    minute = int(now) // 60 * 60
    end = minute - s.metric_delay_s
    metrics = ad.metrics.window(s.metrics_namespace, s.asg_name, end - s.metrics_window_s, end)
    doc, version = ad.store.load_policy_state(s.asg_name)
    state = PolicyState.from_dict(doc)
    floor = scheduled_floor(now, s.floor_schedule, s.time_zone)
    fleet = group.counts(max_size=s.max_size)
    # The group's MinSize is the floor the capacity-floor schedule last applied. When the floor
    # has since gone down (the night's schedule, or SCALING_MIN_SIZE lowered), follow it within a
    # minute instead of waiting for the next floor tick: MinSize would otherwise pin the fleet.
    floor_now = _group_floor(s, floor, group.max_size)
    lower_min = group.min_size > floor_now
    fleet = replace(fleet, min_size=max(floor_now if lower_min else fleet.min_size, s.min_size))
    if fleet.in_service > 0 or _has_active_model(ad):
        decision = decide(s.policy, PolicyInput(metrics, fleet, floor), state, s, now)
    else:
        decision = no_model_decision(fleet, state, s)
        lower_min = False
    fields = {
        "asg": s.asg_name,
        "desired": decision.desired,
        "reason": decision.reason,
        "fleet": fleet.__dict__,
        "metrics_minutes": len(metrics),
        "latest_metric": metrics[-1].__dict__ if metrics else None,
        "lifecycle": lifecycle,
        **decision.fields,
    }
    try:
        ad.store.save_policy_state(s.asg_name, decision.state.to_dict(), version, fields)
    except ConcurrentUpdate:
        return _log("scaling_skipped", reason="another invocation decided this minute", **fields)
    if lower_min:
        fields["min_size"] = {"from": group.min_size, "to": fleet.min_size}
    if decision.desired != group.desired or decision.desired < group.min_size or lower_min:
        if s.dry_run:
            fields["dry_run"] = f"would have set desired capacity {group.desired} -> {decision.desired}"
        elif lower_min:  # the floor went down: MinSize follows it
            ad.asg.set_min_size(s.asg_name, fleet.min_size, decision.desired)
        elif decision.desired < group.min_size:  # only without a model: the floor goes too
            ad.asg.set_min_size(s.asg_name, decision.desired, decision.desired)
        else:
            ad.asg.set_desired(s.asg_name, decision.desired)
    return _log("scaling_decision", **fields)


def _group_floor(s: ScalingSettings, scheduled: int, max_size: int) -> int:
    """The group's MinSize as the floors define it now: the configured minimum or the schedule's
    floor, whichever is higher, never above the group's maximum."""
    return min(max(s.min_size, scheduled), max_size)


def no_model_decision(fleet: FleetCounts, state: PolicyState, s: ScalingSettings) -> Decision:
    """Zero instances while the active-model parameter is unset and none serves, whatever the
    floors say: an instance warms up by loading the active model, so without one it would be
    abandoned at warm-up and replaced, again and again. The rollout of the first model lifts the
    hold. (A fleet already serving keeps its policy: losing the parameter must not stop it.)"""
    reason = f"hold at 0: no active model ({s.active_model_param} unset)"
    fields = {"policy": s.policy, "previous_desired": fleet.desired, "need": 0}
    return Decision(0, reason, state, fields)


def handle_capacity_floor(s: ScalingSettings, ad: ScalingAdapters, now: float) -> dict[str, Any]:
    """Apply the scheduled floor to the ASG itself (MinSize), so the floor holds even if the
    per-minute policy stops running; raise desired capacity at once when below it."""
    group = ad.asg.describe(s.asg_name)
    floor = _group_floor(s, scheduled_floor(now, s.floor_schedule, s.time_zone), group.max_size)
    desired = max(group.desired, floor)
    fields = {"asg": s.asg_name, "min_size": floor, "previous_min_size": group.min_size, "desired": desired}
    serving = any(st == "InService" for st in group.instances.values())
    if not serving and not _has_active_model(ad):  # see no_model_decision: no model to serve
        floor = desired = 0
        fields.update(min_size=0, desired=0, reason=f"no active model ({s.active_model_param} unset)")
    if floor == group.min_size and desired == group.desired:
        return _log("capacity_floor", action="unchanged", **fields)
    if s.dry_run:
        return _log("capacity_floor", action="would have updated", **fields)
    ad.asg.set_min_size(s.asg_name, floor, desired)
    return _log("capacity_floor", action="updated", **fields)


# ------------------------------------------------------------------------------ lifecycle


def handle_lifecycle(
    raw: dict[str, Any], s: ScalingSettings, ad: ScalingAdapters, now: float
) -> dict[str, Any]:
    """Launch or terminate lifecycle action: record the transition (conditional writes make a
    duplicated delivery a no-op), abandon a warm-up already past its limit."""
    try:
        action = parse_lifecycle_event(raw)
        if action.asg_name != s.asg_name:
            raise Skip(f"lifecycle action for another group {action.asg_name}")
        record = ad.store.get_instance(action.instance_id)
        decide_fn = decide_launch if action.kind == "launch" else decide_terminate
        actions = decide_fn(action, record, s, now)
        try:
            done = _execute_lifecycle(actions, s, ad)
        except ConcurrentUpdate:
            raise Skip(f"duplicate {action.kind} action for {action.instance_id} (concurrent)") from None
    except Skip as e:
        return _log("lifecycle_skipped", reason=e.reason, event_id=raw.get("id"))
    except MalformedLifecycleEvent as e:
        return _log("lifecycle_malformed", reason=str(e), event_id=raw.get("id"))
    return _log(
        "lifecycle_action",
        kind=action.kind,
        instance_id=action.instance_id,
        asg=action.asg_name,
        hook=action.hook_name,
        done=done,
    )


# ------------------------------------------------------------------------ Chalice wiring


def _settings() -> ScalingSettings:
    env = dict(os.environ)
    env.setdefault("INFERENCE_ASG_NAME", env.get("INFERENCE_ASG", ""))
    return ScalingSettings.from_env(env)


@autoscaling.schedule(Rate(1, unit=Rate.MINUTES), name="scale_inference_fleet")
def scale_inference_fleet(event):
    s = _settings()
    return handle_scale(s, ScalingAdapters.from_settings(s), event_time(event.to_dict()))


@autoscaling.schedule(Cron("0,30", "*", "*", "*", "?", "*"), name="apply_capacity_floor")
def apply_capacity_floor(event):
    s = _settings()
    return handle_capacity_floor(s, ScalingAdapters.from_settings(s), event_time(event.to_dict()))


@autoscaling.on_cw_event(
    {"source": ["aws.autoscaling"], "detail-type": [LAUNCH_DETAIL_TYPE]}, name="on_instance_launch_action"
)
def on_instance_launch_action(event):
    s = _settings()
    raw = event.to_dict()
    return handle_lifecycle(raw, s, ScalingAdapters.from_settings(s), event_time(raw))


@autoscaling.on_cw_event(
    {"source": ["aws.autoscaling"], "detail-type": [TERMINATE_DETAIL_TYPE]},
    name="on_instance_terminate_action",
)
def on_instance_terminate_action(event):
    s = _settings()
    raw = event.to_dict()
    return handle_lifecycle(raw, s, ScalingAdapters.from_settings(s), event_time(raw))
