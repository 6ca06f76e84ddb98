"""Auto Scaling lifecycle hooks for moto: the one module that fills moto 5.2.5's gaps.

moto stores lifecycle hooks but never puts an instance in ``Pending:Wait`` or
``Terminating:Wait``, never emits the EventBridge events, and answers ``NotImplemented`` to
``CompleteLifecycleAction`` and ``RecordLifecycleActionHeartbeat`` (see DESIGN.md, "Known gaps in
moto"). ``AsgLifecycle.install()`` patches moto's Auto Scaling backend in this process so that it
follows what the EC2 Auto Scaling user guide documents for lifecycle hooks:

* **Launch** (``autoscaling:EC2_INSTANCE_LAUNCHING`` hook on the group): a new instance enters
  ``Pending:Wait``; Auto Scaling emits ``EC2 Instance-launch Lifecycle Action`` (source
  ``aws.autoscaling``, detail with ``LifecycleActionToken``, ``AutoScalingGroupName``,
  ``LifecycleHookName``, ``EC2InstanceId``, ``LifecycleTransition``, ``NotificationMetadata``,
  ``Origin``/``Destination``). ``CONTINUE`` puts it ``InService``; ``ABANDON`` terminates it and
  the group launches a replacement to keep its desired capacity.
* **Terminate** (``autoscaling:EC2_INSTANCE_TERMINATING``): an instance chosen for scale-in
  (``SetDesiredCapacity``, ``TerminateInstanceInAutoScalingGroup``) enters ``Terminating:Wait``
  and stays until the action completes (either result terminates it). It no longer counts
  toward the desired capacity.
* **Timeouts**: an action not completed within the hook's ``HeartbeatTimeout`` gets the hook's
  ``DefaultResult``. ``RecordLifecycleActionHeartbeat`` restarts the heartbeat timeout, but no
  instance waits longer than the global timeout: 100 x ``HeartbeatTimeout`` or 48 hours, whichever
  is smaller. Completing an action that is not waiting is a ``ValidationError`` ("No active
  Lifecycle Action found with instance ID ..."), as on AWS.
* ``target_lifecycle_state(instance_id)`` answers what IMDS ``autoscaling/target-lifecycle-state``
  would (``InService`` while warming or in service, ``Terminated`` once terminating) so an IMDS
  stand-in can serve it.

Time comes from ``clock`` (wall clock by default) and timeouts are applied lazily before every
Auto Scaling API call and on ``tick()`` (``start_ticker()`` runs it in a thread).

Simplifications (documented, not product logic): one hook per transition per group is honoured
(the first by name); instances chosen for scale-in are those still warming first, then the
oldest; no cooldowns, no warm pools, no instance refresh.

Works in-process (``mock_aws()``) and in a moto server running in this process
(``ThreadedMotoServer``, as ``localstack.moto.MotoServer`` does). For a moto server of its own::

    python -m localstack.asg_lifecycle --port 5000     # moto server with lifecycle hooks
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
DETAIL_TYPES = {
    LAUNCHING: "EC2 Instance-launch Lifecycle Action",
    TERMINATING: "EC2 Instance-terminate Lifecycle Action",
}
GLOBAL_TIMEOUT_CAP_S = 172800  # 48 hours


@dataclass
class WaitingAction:
    """One instance waiting on a lifecycle hook."""

    token: str
    account: str
    region: str
    group_name: str
    hook_name: str
    transition: str
    instance_id: str
    default_result: str
    heartbeat_timeout_s: float
    started_s: float
    deadline_s: float
    global_deadline_s: float


class AsgLifecycle:
    """Lifecycle-hook behaviour for moto's Auto Scaling backend (see the module docstring)."""

    _active: AsgLifecycle | None = None

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        emit_events: bool = True,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.clock = clock
        self.emit_events = emit_events
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []  # every event emitted, oldest first
        self.waiting: dict[str, WaitingAction] = {}  # instance id -> action
        self.target_states: dict[str, str] = {}
        self._lock = threading.RLock()
        self._saved: list[tuple[object, str, Any]] = []
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    # ---------------------------------------------------------------- install / uninstall
    def install(self) -> AsgLifecycle:
        from moto.autoscaling import models, responses

        if AsgLifecycle._active is not None:
            raise RuntimeError("another AsgLifecycle is installed: stop() it first")
        me = self

        def set_desired_capacity(group, new_capacity):
            me._set_desired_capacity(group, new_capacity)

        def terminate_instance(backend, instance_id, should_decrement):
            return me._terminate_instance(backend, instance_id, should_decrement)

        def complete_lifecycle_action(resp):
            me._complete(
                resp.current_account,
                resp.region,
                resp._get_param("AutoScalingGroupName"),
                resp._get_param("LifecycleHookName"),
                resp._get_param("InstanceId"),
                resp._get_param("LifecycleActionToken"),
                resp._get_param("LifecycleActionResult"),
            )
            return responses.EmptyResult()

        def record_lifecycle_action_heartbeat(resp):
            me._heartbeat(
                resp._get_param("AutoScalingGroupName"),
                resp._get_param("LifecycleHookName"),
                resp._get_param("InstanceId"),
                resp._get_param("LifecycleActionToken"),
            )
            return responses.EmptyResult()

        original_call = responses.AutoScalingResponse.call_action

        def call_action(resp):
            me.tick()
            return original_call(resp)

        patches = [
            (models.FakeAutoScalingGroup, "set_desired_capacity", set_desired_capacity),
            (models.AutoScalingBackend, "terminate_instance", terminate_instance),
            (responses.AutoScalingResponse, "complete_lifecycle_action", complete_lifecycle_action),
            (
                responses.AutoScalingResponse,
                "record_lifecycle_action_heartbeat",
                record_lifecycle_action_heartbeat,
            ),
            (responses.AutoScalingResponse, "call_action", call_action),
        ]
        for owner, name, fn in patches:
            self._saved.append((owner, name, owner.__dict__.get(name)))
            setattr(owner, name, fn)
        AsgLifecycle._active = self
        return self

    def stop(self) -> None:
        """Stop the ticker and restore moto's own behaviour."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        for owner, name, original in reversed(self._saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved.clear()
        if AsgLifecycle._active is self:
            AsgLifecycle._active = None

    def __enter__(self) -> AsgLifecycle:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_ticker(self, interval_s: float = 1.0) -> AsgLifecycle:
        """Apply timeouts every ``interval_s`` even when nobody calls the Auto Scaling API."""

        def run() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.tick()
                except Exception:  # keep ticking: one bad group must not stop the others
                    log.exception("lifecycle tick failed")

        self._ticker = threading.Thread(target=run, name="asg-lifecycle", daemon=True)
        self._ticker.start()
        return self

    # ---------------------------------------------------------------------------- queries
    def target_lifecycle_state(self, instance_id: str) -> str | None:
        """What IMDS ``autoscaling/target-lifecycle-state`` says for this instance."""
        with self._lock:
            return self.target_states.get(instance_id)

    def waiting_for(self, instance_id: str) -> WaitingAction | None:
        with self._lock:
            return self.waiting.get(instance_id)

    # ------------------------------------------------------------------------- behaviour
    @staticmethod
    def _hook(group, transition: str):
        hooks = sorted(
            (
                h
                for h in group.autoscaling_backend.lifecycle_hooks.values()
                if h.auto_scaling_group_name == group.name and h.lifecycle_transition == transition
            ),
            key=lambda h: h.name,
        )
        return hooks[0] if hooks else None

    def _set_desired_capacity(self, group, new_capacity) -> None:
        with self._lock:
            group.desired_capacity = group.min_size if new_capacity is None else new_capacity
            live = [s for s in group.instance_states if not s.lifecycle_state.startswith("Terminat")]
            delta = (group.desired_capacity or 0) - len(live)
            if delta > 0:
                before = {s.instance.id for s in group.instance_states}
                group.replace_autoscaling_group_instances(delta, group.get_propagated_tags())
                hook = self._hook(group, LAUNCHING)
                for st in group.instance_states:
                    if st.instance.id in before:
                        continue
                    self.target_states[st.instance.id] = "InService"
                    if hook is not None:
                        st.lifecycle_state = "Pending:Wait"
                        self._wait(group, hook, st.instance.id)
            elif delta < 0:
                candidates = [s for s in live if not s.protected_from_scale_in]
                # still warming first (they serve nothing yet), then the oldest
                candidates.sort(key=lambda s: 0 if s.lifecycle_state.startswith("Pending") else 1)
                for st in candidates[:-delta]:
                    self._begin_termination(group, st)
            backend = group.autoscaling_backend
            if group.name in backend.autoscaling_groups:
                backend.update_attached_elbs(group.name)
                backend.update_attached_target_groups(group.name)

    def _begin_termination(self, group, st) -> None:
        hook = self._hook(group, TERMINATING)
        instance_id = st.instance.id
        self.target_states[instance_id] = "Terminated"
        waiting = self.waiting.pop(instance_id, None)
        if waiting is not None:  # scale-in of an instance still in its launch wait
            log.info("launch action of %s ends: the instance is being terminated", instance_id)
        if hook is None:
            self._terminate_now(group, instance_id)
            return
        st.lifecycle_state = "Terminating:Wait"
        self._wait(group, hook, instance_id)

    def _terminate_instance(self, backend, instance_id: str, should_decrement: bool):
        from moto.autoscaling.models import TerminateInstanceActivity

        with self._lock:
            st = next(
                s
                for g in backend.autoscaling_groups.values()
                for s in g.instance_states
                if s.instance.id == instance_id
            )
            group = st.instance.autoscaling_group
            original = group.desired_capacity
            if should_decrement:
                group.desired_capacity = max((group.desired_capacity or 0) - 1, 0)
            self._begin_termination(group, st)
            # keep the desired capacity: launch the replacement now if one is needed
            self._set_desired_capacity(group, group.desired_capacity)
            return TerminateInstanceActivity(st.instance, original)

    def _terminate_now(self, group, instance_id: str) -> None:
        group.instance_states = [s for s in group.instance_states if s.instance.id != instance_id]
        group.autoscaling_backend.ec2_backend.terminate_instances([instance_id])
        self.target_states[instance_id] = "Terminated"
        self.waiting.pop(instance_id, None)

    def _wait(self, group, hook, instance_id: str) -> None:
        now = self.clock()
        backend = group.autoscaling_backend
        timeout = float(hook.heartbeat_timeout)
        action = WaitingAction(
            token=str(uuid.uuid4()),
            account=backend.account_id,
            region=backend.region_name,
            group_name=group.name,
            hook_name=hook.name,
            transition=hook.lifecycle_transition,
            instance_id=instance_id,
            default_result=hook.default_result,
            heartbeat_timeout_s=timeout,
            started_s=now,
            deadline_s=now + timeout,
            global_deadline_s=now + min(100 * timeout, GLOBAL_TIMEOUT_CAP_S),
        )
        self.waiting[instance_id] = action
        launching = action.transition == LAUNCHING
        detail = {
            "LifecycleActionToken": action.token,
            "AutoScalingGroupName": group.name,
            "LifecycleHookName": hook.name,
            "EC2InstanceId": instance_id,
            "LifecycleTransition": action.transition,
            "NotificationMetadata": getattr(hook, "notification_metadata", None) or "",
            "Origin": "EC2" if launching else "AutoScalingGroup",
            "Destination": "AutoScalingGroup" if launching else "EC2",
        }
        event = {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": DETAIL_TYPES[action.transition],
            "source": "aws.autoscaling",
            "account": action.account,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "region": action.region,
            "resources": [group.arn],
            "detail": detail,
        }
        self.events.append(event)
        if self.emit_events:
            from moto.events.models import events_backends

            events_backends[action.account][action.region].put_events(
                [
                    {
                        "Source": event["source"],
                        "DetailType": event["detail-type"],
                        "Detail": json.dumps(detail),
                        "Resources": event["resources"],
                        "Time": now,
                    }
                ]
            )
        if self.on_event is not None:
            self.on_event(event)

    def _find(self, group_name, hook_name, instance_id, token) -> WaitingAction:
        from moto.autoscaling.exceptions import ValidationError

        action = None
        if instance_id:
            action = self.waiting.get(instance_id)
        elif token:
            action = next((a for a in self.waiting.values() if a.token == token), None)
        if (
            action is None
            or action.group_name != group_name
            or action.hook_name != hook_name
            or (token and action.token != token)
        ):
            raise ValidationError(f"No active Lifecycle Action found with instance ID {instance_id or token}")
        return action

    def _complete(self, account, region, group_name, hook_name, instance_id, token, result) -> None:
        from moto.autoscaling.exceptions import ValidationError

        if result not in ("CONTINUE", "ABANDON"):
            raise ValidationError("LifecycleActionResult must be CONTINUE or ABANDON")
        with self._lock:
            action = self._find(group_name, hook_name, instance_id, token)
            self._resolve(action, result, why="completed")

    def _heartbeat(self, group_name, hook_name, instance_id, token) -> None:
        with self._lock:
            action = self._find(group_name, hook_name, instance_id, token)
            action.deadline_s = min(self.clock() + action.heartbeat_timeout_s, action.global_deadline_s)

    def _resolve(self, action: WaitingAction, result: str, why: str) -> None:
        from moto.autoscaling.models import autoscaling_backends

        self.waiting.pop(action.instance_id, None)
        backend = autoscaling_backends[action.account][action.region]
        group = backend.autoscaling_groups.get(action.group_name)
        log.info("lifecycle %s of %s %s with %s", action.transition, action.instance_id, why, result)
        if group is None:
            return
        st = next((s for s in group.instance_states if s.instance.id == action.instance_id), None)
        if st is None:
            return
        if action.transition == LAUNCHING and result == "CONTINUE":
            st.lifecycle_state = "InService"
            backend.update_attached_elbs(group.name)
            backend.update_attached_target_groups(group.name)
            return
        self._terminate_now(group, action.instance_id)
        if action.transition == LAUNCHING:  # abandoned launch: the group replaces it
            self._set_desired_capacity(group, group.desired_capacity)

    def tick(self, now: float | None = None) -> list[WaitingAction]:
        """Apply the default result to every action past its heartbeat or global timeout."""
        now = self.clock() if now is None else now
        with self._lock:
            expired = [a for a in self.waiting.values() if now >= min(a.deadline_s, a.global_deadline_s)]
            for a in expired:
                self._resolve(a, a.default_result, why="timed out")
        return expired


def main(argv: list[str] | None = None) -> int:
    """Run a moto server with lifecycle hooks on ``--host``/``--port`` until interrupted."""
    from moto.server import ThreadedMotoServer

    p = argparse.ArgumentParser(description="moto server with Auto Scaling lifecycle hooks")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    lifecycle = AsgLifecycle().install().start_ticker()
    server = ThreadedMotoServer(ip_address=args.host, port=args.port, verbose=False)
    server.start()
    print(f"moto with lifecycle hooks on http://{args.host}:{args.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        lifecycle.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
