"""EC2 instances as local processes, plus the EC2 events moto never emits.

moto reports instances as ``running`` the moment ``RunInstances`` (or an Auto Scaling group)
creates them, and nothing runs. ``InstanceManager`` watches the stand-in's EC2 state and, for
each running instance, boots what the AMI would boot for its role (``default_command``:
the command the role's systemd unit runs; configurable) with the instance's own user data, in its own process group, with its console output in ``<state_dir>/instances/<id>/``.

The user data is the instance's, with the two fields the launch contract leaves to the local
stack (docs/CONTRACTS.md): ``endpoint_url`` (the moto server) and, for inference instances,
``port`` (every local instance needs its own; on EC2 each has its own address and uses 8080).
The instance learns its id from ``NLPFLEET_INSTANCE_ID`` (on EC2: IMDS ``instance-id``).

An instance boots ``boot_delay_s`` after EC2 reports it running (EC2 takes tens of seconds
from ``running`` to the first user-space process; locally a few seconds).

State changes follow EC2:
- terminated / stopped in EC2 → the process group gets SIGTERM, then SIGKILL after ``grace_s``
  (EC2's shutdown sends ACPI power-off, then forces the stop);
- a job instance's entry point that exits is the OS powering off: the instance stops, or
  terminates when its ``InstanceInitiatedShutdownBehavior`` is ``terminate`` (what job
  instances use); an inference instance whose entry point exits is impaired (``on_impaired``);
- ``kill(instance_id)`` simulates a crash (SIGKILL, no shutdown): the instance stays ``running``
  in EC2 but is impaired; ``on_impaired`` is called so the stack can fail its status check.

moto 5.2.5 gap: it emits no ``EC2 Instance State-change Notification``; every state change seen
here is put on the default bus with ``PutEvents`` (source ``aws.ec2``, detail
``{"instance-id", "state"}``, the instance ARN in ``resources``), as EC2 does.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

WATCHED_STATES = ["pending", "running", "shutting-down", "terminated", "stopping", "stopped"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_command(user_data_file: Path) -> list[str]:
    """What the AMI's systemd unit for the instance's role starts (ami/files/systemd/):
    ``nlpfleet-job.service`` runs ``nlpfleet-instance --user-data …``; on an inference instance
    ``nlpfleet-agent.service`` runs ``python -m inference.agent --user-data …``, which starts and
    supervises the server."""
    role = json.loads(Path(user_data_file).read_text()).get("role")
    if role == "inference":
        return [sys.executable, "-m", "inference.agent", "--user-data", str(user_data_file)]
    return [str(Path(sys.executable).with_name("nlpfleet-instance")), "--user-data", str(user_data_file)]


@dataclass
class LocalInstance:
    instance_id: str
    role: str
    user_data: dict
    directory: Path
    port: int | None = None
    proc: subprocess.Popen | None = None
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    returncode: int | None = None
    ec2_state: str = "running"
    crashed: bool = False
    kill_at: float | None = None
    tags: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # what IMDS tells the instance about itself

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def as_dict(self) -> dict:
        return {
            "instance_id": self.instance_id,
            "role": self.role,
            "ec2_state": self.ec2_state,
            "pid": self.proc.pid if self.proc else None,
            "alive": self.alive,
            "port": self.port,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "returncode": self.returncode,
            "crashed": self.crashed,
            "job_id": self.user_data.get("job_id"),
            "log": str(self.directory / "console.log"),
        }


def state_change_event(instance_id: str, state: str, region: str, account: str) -> dict:
    """A PutEvents entry for ``EC2 Instance State-change Notification`` (AWS docs)."""
    return {
        "Source": "aws.ec2",
        "DetailType": "EC2 Instance State-change Notification",
        "Resources": [f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"],
        "Detail": json.dumps({"instance-id": instance_id, "state": state}),
    }


class InstanceManager:
    def __init__(
        self,
        make_client: Callable[[str], object],
        state_dir: Path,
        *,
        endpoint_url: str,
        base_env: dict[str, str],
        command: Callable[[Path], list[str]] = default_command,
        region: str = "us-east-1",
        account: str = "123456789012",
        poll_s: float = 1.0,
        grace_s: float = 10.0,
        emit_events: bool = True,
        on_impaired: Callable[[LocalInstance], None] | None = None,
        instance_env: Callable[[str], dict[str, str]] | None = None,
        boot_delay_s: float = 0.0,
    ):
        self._make_client = make_client
        self.state_dir = Path(state_dir)
        self.endpoint_url = endpoint_url
        self.base_env = dict(base_env)
        self.command = command
        self.region, self.account = region, account
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.emit_events = emit_events
        self.on_impaired = on_impaired
        self.instance_env = instance_env
        self.boot_delay_s = boot_delay_s
        self._running_since: dict[str, float] = {}
        self.instances: dict[str, LocalInstance] = {}
        self._seen_state: dict[str, str] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.events_emitted: list[tuple[str, str]] = []

    # -- one reconciliation pass (the thread repeats it; tests call it directly)
    def sync(self) -> None:
        ec2 = self._make_client("ec2")
        seen: dict[str, dict] = {}
        for page in ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-state-name", "Values": WATCHED_STATES}]
        ):
            for r in page["Reservations"]:
                for i in r["Instances"]:
                    seen[i["InstanceId"]] = i
        changes = []
        with self._lock:
            for iid, desc in seen.items():
                state = desc["State"]["Name"]
                if self._seen_state.get(iid) != state:
                    self._seen_state[iid] = state
                    changes.append((iid, state))
                inst = self.instances.get(iid)
                if state == "running" and (inst is None or (inst.proc is None and not inst.crashed)):
                    first = self._running_since.setdefault(iid, time.monotonic())
                    if time.monotonic() - first >= self.boot_delay_s:
                        self._boot(ec2, desc)
                elif inst is not None:
                    inst.ec2_state = state
                    if state in ("shutting-down", "terminated", "stopping", "stopped") and inst.alive:
                        self._shutdown(inst)
            self._reap(ec2)
        if changes and self.emit_events:
            self._emit(changes)

    def _boot(self, ec2, desc: dict) -> None:
        iid = desc["InstanceId"]
        raw = ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData").get("UserData", {})
        text = base64.b64decode(raw["Value"]).decode() if raw.get("Value") else ""
        try:
            user_data = json.loads(text)
        except ValueError:
            log.warning("instance %s: user data is not the nlpfleet launch contract; nothing to run", iid)
            self.instances[iid] = LocalInstance(iid, "unknown", {}, self.state_dir / "instances" / iid)
            return
        role = user_data.get("role", "unknown")
        directory = self.state_dir / "instances" / iid
        directory.mkdir(parents=True, exist_ok=True)
        user_data["endpoint_url"] = self.endpoint_url
        port = None
        if role == "inference":
            port = free_port()
            user_data["port"] = port
        ud_file = directory / "user-data.json"
        ud_file.write_text(json.dumps(user_data, indent=2))
        env = dict(self.base_env)
        env.update({"NLPFLEET_INSTANCE_ID": iid, "NLPFLEET_INSTANCE_DIR": str(directory)})
        env["NLPFLEET_INSTANCE_TYPE"] = desc.get("InstanceType", "")
        if self.instance_env:
            env.update(self.instance_env(iid))
        tags = {t["Key"]: t["Value"] for t in desc.get("Tags", [])}
        info = {
            "instance_type": desc.get("InstanceType"),
            "ami_id": desc.get("ImageId"),
            "az": (desc.get("Placement") or {}).get("AvailabilityZone"),
            "region": self.region,
            "user_data": json.dumps(user_data),
        }
        inst = LocalInstance(iid, role, user_data, directory, port, tags=tags, info=info)
        self.instances[iid] = inst  # before it boots: it asks IMDS who it is at once
        try:
            with open(directory / "console.log", "ab") as log_file:
                proc = subprocess.Popen(
                    self.command(ud_file),
                    cwd=directory,
                    env=env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group: the "machine" stops as one
                )
        except OSError as exc:  # the image lacks its entry point: the box boots to nothing
            log.error("instance %s: cannot start its entry point: %s", iid, exc)
            (directory / "console.log").write_text(f"boot failed: {exc}\n")
            inst.crashed = True
            return
        inst.proc = proc
        log.info(
            "instance %s (%s) booted as pid %d%s", iid, role, proc.pid, f" on port {port}" if port else ""
        )

    def _signal(self, inst: LocalInstance, sig: int) -> None:
        try:
            os.killpg(inst.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _shutdown(self, inst: LocalInstance) -> None:
        """SIGTERM now; ``_reap`` sends SIGKILL if it is still alive after ``grace_s``."""
        log.info("instance %s: %s in EC2, shutting its processes down", inst.instance_id, inst.ec2_state)
        self._signal(inst, signal.SIGTERM)
        inst.kill_at = time.monotonic() + self.grace_s

    def _finish(self, inst: LocalInstance) -> None:
        try:
            inst.returncode = inst.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._signal(inst, signal.SIGKILL)
            inst.returncode = inst.proc.wait()
        # children that outlived the leader (a server started by the entry point)
        self._signal(inst, signal.SIGKILL)
        inst.ended_at = time.time()

    def _reap(self, ec2) -> None:
        impaired = []
        for inst in self.instances.values():
            if inst.proc is None or inst.ended_at is not None:
                continue
            if inst.alive:
                if inst.kill_at is not None and time.monotonic() >= inst.kill_at:
                    log.warning(
                        "instance %s did not stop within %.0fs: killed", inst.instance_id, self.grace_s
                    )
                    self._signal(inst, signal.SIGKILL)
                continue
            self._finish(inst)
            if inst.crashed or inst.ec2_state != "running":
                continue
            if inst.role != "job":
                # a service box whose entry point died keeps running in EC2, impaired
                log.warning("instance %s: entry point exited with %s", inst.instance_id, inst.returncode)
                inst.crashed = True
                impaired.append(inst)
                continue
            # a job instance powers off when its job ends; EC2 stops or terminates it
            attr = ec2.describe_instance_attribute(
                InstanceId=inst.instance_id, Attribute="instanceInitiatedShutdownBehavior"
            )
            behaviour = attr.get("InstanceInitiatedShutdownBehavior", {}).get("Value") or "stop"
            log.info(
                "instance %s: job entry point exited with %s, the instance %s",
                inst.instance_id,
                inst.returncode,
                "terminates" if behaviour == "terminate" else "stops",
            )
            if behaviour == "terminate":
                ec2.terminate_instances(InstanceIds=[inst.instance_id])
            else:
                ec2.stop_instances(InstanceIds=[inst.instance_id])
        for inst in impaired:
            if self.on_impaired:
                self.on_impaired(inst)

    def _emit(self, changes: list[tuple[str, str]]) -> None:
        events = self._make_client("events")
        entries = [state_change_event(iid, st, self.region, self.account) for iid, st in changes]
        for i in range(0, len(entries), 10):
            events.put_events(Entries=entries[i : i + 10])
        self.events_emitted.extend(changes)

    # -- faults
    def kill(self, instance_id: str) -> LocalInstance:
        """Crash an instance: SIGKILL its processes, no drain, no lifecycle action. EC2 still
        says ``running``; ``on_impaired`` reports it (its status check would now fail)."""
        with self._lock:
            inst = self.instances[instance_id]
            inst.crashed = True
            self._signal(inst, signal.SIGKILL)
            self._finish(inst)
        log.info("instance %s crashed (killed)", instance_id)
        if self.on_impaired:
            self.on_impaired(inst)
        return inst

    def running(self, role: str | None = None) -> list[LocalInstance]:
        with self._lock:
            return [i for i in self.instances.values() if i.alive and (role is None or i.role == role)]

    # -- thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("instance sync failed")
            self._stop.wait(self.poll_s)

    def start(self) -> InstanceManager:
        self._thread = threading.Thread(target=self._run, name="instances", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching and stop every local instance (SIGTERM, then SIGKILL)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        with self._lock:
            live = [i for i in self.instances.values() if i.alive]
            for inst in live:
                self._signal(inst, signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            while any(i.alive for i in live) and time.monotonic() < deadline:
                time.sleep(0.05)
            for inst in self.instances.values():
                if inst.proc is not None and inst.ended_at is None:
                    self._signal(inst, signal.SIGKILL)
                    self._finish(inst)
