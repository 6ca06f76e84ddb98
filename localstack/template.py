"""From the deployment template to what the local stack builds: one source of truth.

A real deployment is one CloudFormation template: ``chalice package --merge-template`` output
(SAM ``AWS::Serverless::*`` resources for the handlers) merged with ``infra/`` (bucket, tables,
launch templates, Auto Scaling group, hooks, ...). moto's CloudFormation builds the plain AWS
resources but cannot run the SAM transform or a Lambda, so this module splits the template:

- every resource moto can build goes to moto unchanged;
- SAM functions (and what only they use: the REST API, Lambda permissions) are taken out and
  run by the local stack itself: the API handler behind a local HTTP server, each event handler
  behind an SQS queue that the dispatcher drains;
- each SAM event source becomes what the SAM transform would create, with an SQS target in
  place of the Lambda: a ``CloudWatchEvent`` event becomes an ``AWS::Events::Rule`` with that
  pattern, a ``Schedule`` event a rule with that schedule expression (the local clock fires
  it). ``SQS`` events keep their own queue;
- lifecycle hooks, which moto's CloudFormation skips (``AWS::AutoScaling::LifecycleHook``
  resources and an Auto Scaling group's ``LifecycleHookSpecificationList``), are returned so
  that the stack can apply them with ``PutLifecycleHook`` once their properties are resolved;
- SAM ``Globals.Function`` are applied to every function as the SAM transform does (a function's
  own environment variables override the global ones), then left out of moto's template.

Values only the deployed stack knows (a table's name, a queue's URL) are resolved by moto
itself: each one is added to the template as an ``Output`` and read back after ``CreateStack``.

Example::

    >>> plan = split_template({"Resources": {
    ...     "Tick": {"Type": "AWS::Serverless::Function", "Properties": {
    ...         "Handler": "app.tick", "Events": {"T": {"Type": "Schedule",
    ...         "Properties": {"Schedule": "rate(1 minute)"}}}}}}})
    >>> plan.functions[0].handler, sorted(plan.moto_template["Resources"])
    ('app.tick', ['TickLocalQueue', 'TickTRule'])
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# What the local stack runs itself instead of asking moto to build it.
LOCAL_TYPE_PREFIXES = ("AWS::Serverless::", "AWS::Lambda::", "AWS::ApiGateway::", "AWS::ApiGatewayV2::")
HOOK_TYPE = "AWS::AutoScaling::LifecycleHook"
OUTPUT_PREFIX = "LocalStack"


@dataclass(frozen=True)
class FunctionEvent:
    name: str
    kind: str  # CloudWatchEvent | Schedule | SQS
    properties: dict


@dataclass(frozen=True)
class LocalFunction:
    """A SAM function the local stack runs in-process."""

    logical_id: str
    handler: str  # "app.on_upload": module "app", attribute "on_upload"
    environment: dict[str, str]  # resolved after CreateStack
    events: tuple[FunctionEvent, ...] = ()
    queue_output: str | None = None  # Output holding the URL of the queue its events land in
    timeout_s: int = 60
    memory_mb: int = 128

    @property
    def is_api(self) -> bool:
        return not self.events and self.handler.endswith(".app")


@dataclass(frozen=True)
class LocalPlan:
    moto_template: dict
    functions: tuple[LocalFunction, ...]
    hooks: tuple[dict, ...]  # LifecycleHook properties, values resolved after CreateStack
    skipped: tuple[str, ...]  # logical ids taken out of the template and not run (with reason)
    unresolved: dict[str, object] = field(default_factory=dict)  # output key -> template value


def load_template(path: str | Path) -> dict:
    text = Path(path).read_text()
    if text.lstrip().startswith("{"):
        return json.loads(text)
    import yaml  # chalice depends on PyYAML; only YAML templates need it

    return yaml.safe_load(text)


def _refs(value) -> set[str]:
    """Logical ids a template value refers to (Ref, Fn::GetAtt, ${X} in Fn::Sub)."""
    found: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "Ref" and isinstance(v, str):
                found.add(v)
            elif k == "Fn::GetAtt":
                target = v[0] if isinstance(v, list) else str(v).split(".")[0]
                found.add(target)
            elif k == "Fn::Sub":
                text = v[0] if isinstance(v, list) else v
                found.update(m.split(".")[0] for m in re.findall(r"\$\{([^!}][^}]*)\}", text))
                if isinstance(v, list):
                    found.update(_refs(v[1]))
            else:
                found.update(_refs(v))
    elif isinstance(value, list):
        for v in value:
            found.update(_refs(v))
    return found


def _is_plain(value) -> bool:
    return isinstance(value, str | int | float | bool)


def split_template(doc: dict) -> LocalPlan:
    doc = copy.deepcopy(doc)
    resources: dict = doc.get("Resources", {})
    outputs: dict = dict(doc.get("Outputs", {}))
    moto_resources: dict = {}
    local_ids: set[str] = set()
    skipped: list[str] = []
    hooks_raw: list[tuple[str, dict]] = []

    for lid, res in resources.items():
        rtype = res.get("Type", "")
        if rtype.startswith(LOCAL_TYPE_PREFIXES):
            local_ids.add(lid)
        elif rtype == HOOK_TYPE:
            hooks_raw.append((lid, res.get("Properties", {})))
        else:
            moto_resources[lid] = res

    # Whatever refers to a resource the local stack runs itself cannot be built by moto either
    # (a Lambda permission, an alarm on a function): drop it, transitively, and say so.
    changed = True
    while changed:
        changed = False
        for lid in list(moto_resources):
            if _refs(moto_resources[lid]) & local_ids:
                local_ids.add(lid)
                skipped.append(f"{lid} ({moto_resources.pop(lid)['Type']}: refers to a Lambda resource)")
                changed = True

    unresolved: dict[str, object] = {}

    def export(value, key: str):
        """Plain values stay; anything else becomes an Output that moto resolves."""
        if _is_plain(value):
            return str(value) if not isinstance(value, bool) else str(value).lower()
        if _refs(value) & local_ids:
            raise ValueError(f"{key}: refers to a Lambda resource, which the local stack cannot resolve")
        out_key = f"{OUTPUT_PREFIX}{re.sub(r'[^A-Za-z0-9]', '', key)}"
        outputs[out_key] = {"Value": value}
        unresolved[out_key] = value
        return {"Output": out_key}

    functions: list[LocalFunction] = []
    globals_fn = (doc.get("Globals") or {}).get("Function") or {}
    for lid, res in resources.items():
        if res.get("Type") != "AWS::Serverless::Function":
            continue
        props = {k: v for k, v in globals_fn.items() if k != "Environment"} | res.get("Properties", {})
        variables = dict((globals_fn.get("Environment") or {}).get("Variables") or {})
        variables.update(((props.get("Environment") or {}).get("Variables")) or {})
        props["Environment"] = {"Variables": variables}
        env = {
            name: export(value, f"{lid}Env{name}")
            for name, value in props.get("Environment", {}).get("Variables", {}).items()
        }
        events: list[FunctionEvent] = []
        queue_output = None
        for ev_name, ev in (props.get("Events") or {}).items():
            kind = ev.get("Type")
            ev_props = ev.get("Properties", {})
            if kind in ("CloudWatchEvent", "EventBridgeRule", "Schedule"):
                queue_id = f"{lid}LocalQueue"
                if queue_id not in moto_resources:
                    # visibility 6x the function timeout, as AWS advises for Lambda event sources
                    vis = int(props.get("Timeout", 60)) * 6
                    moto_resources[queue_id] = {
                        "Type": "AWS::SQS::Queue",
                        "Properties": {"VisibilityTimeout": min(vis, 43200)},
                    }
                    queue_output = export({"Ref": queue_id}, f"{lid}QueueUrl")["Output"]
                rule: dict = {"State": "ENABLED"}
                if kind == "Schedule":
                    rule["ScheduleExpression"] = ev_props["Schedule"]
                else:
                    rule["EventPattern"] = ev_props["Pattern"]
                    if "EventBusName" in ev_props:
                        rule["EventBusName"] = ev_props["EventBusName"]
                rule["Targets"] = [{"Id": f"{lid}LocalDispatcher", "Arn": {"Fn::GetAtt": [queue_id, "Arn"]}}]
                moto_resources[f"{lid}{ev_name}Rule"] = {"Type": "AWS::Events::Rule", "Properties": rule}
            elif kind == "SQS":
                queue_output = export(ev_props["Queue"], f"{lid}QueueArn")["Output"]
            else:
                skipped.append(f"{lid}.{ev_name} (event type {kind} is not run locally)")
            events.append(FunctionEvent(ev_name, kind, ev_props))
        functions.append(
            LocalFunction(
                logical_id=lid,
                handler=props["Handler"],
                environment=env,
                events=tuple(events),
                queue_output=queue_output,
                timeout_s=int(props.get("Timeout", 60)),
                memory_mb=int(props.get("MemorySize", 128)),
            )
        )

    for lid, res in moto_resources.items():
        if res.get("Type") == "AWS::AutoScaling::AutoScalingGroup":
            for i, spec in enumerate(res.get("Properties", {}).get("LifecycleHookSpecificationList") or []):
                hooks_raw.append((f"{lid}Hook{i}", {**spec, "AutoScalingGroupName": {"Ref": lid}}))
    hooks = []
    for lid, props in hooks_raw:
        hook = {k: export(v, f"{lid}{k}") for k, v in props.items()}
        hook.setdefault("LifecycleHookName", lid)
        hooks.append(hook)

    moto_outputs = {k: v for k, v in outputs.items() if not (_refs(v) & local_ids)}
    skipped.extend(f"Outputs.{k} (refers to a Lambda resource)" for k in outputs if k not in moto_outputs)
    moto_template = {
        k: v for k, v in doc.items() if k not in ("Transform", "Globals", "Resources", "Outputs")
    }
    moto_template["Resources"] = moto_resources
    if moto_outputs:
        moto_template["Outputs"] = moto_outputs
    return LocalPlan(
        moto_template=moto_template,
        functions=tuple(functions),
        hooks=tuple(hooks),
        skipped=tuple(skipped),
        unresolved=unresolved,
    )


def resolve(value, outputs: dict[str, str]):
    """Replace ``{"Output": key}`` placeholders by the stack's output values."""
    if isinstance(value, dict) and set(value) == {"Output"}:
        return outputs[value["Output"]]
    if isinstance(value, dict):
        return {k: resolve(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, outputs) for v in value]
    return value
