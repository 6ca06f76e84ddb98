"""The local Lambda trigger: drain the SQS queues EventBridge rules target, call the handler.

In AWS, an EventBridge rule invokes its Lambda asynchronously with the event as the payload;
an SQS event source mapping polls a queue and invokes the Lambda with a batch of records. In the
local stack each rule targets an SQS queue instead (see ``localstack/template.py``), and this
module plays the Lambda service for those queues:

- ``eventbridge`` routes: each message body is one event envelope, the handler is called as
  ``handler(event, context)``, the same call Lambda makes for a Chalice ``on_cw_event`` or
  ``schedule`` handler;
- ``sqs`` routes: messages are batched into ``{"Records": [...]}`` as an SQS event source
  mapping does for a Chalice ``on_sqs_message`` handler.

moto 5.2.5 gap: a rule that has only a ``ScheduleExpression`` also receives every event put on
its bus (moto matches an absent pattern as "match all"); AWS never does that. A route built for
a schedule-only function therefore sets ``accept=is_scheduled_event`` and acknowledges anything
else without calling the handler (counted in ``filtered``).

moto 5.2.5 gap: events that arrive through ``PutEvents`` reach an SQS target without the
envelope's ``account`` field (moto's default input template leaves it out; AWS always sets it,
and Chalice's event class requires it). The dispatcher fills it with the queue's account,
which is the bus's account for a same-account target.

moto 5.2.5 gap: every event moto itself emits (S3 → EventBridge included) carries the same
constant ``id`` (``17793124-05d4-…``); AWS gives each event its own id and keeps it across
redeliveries. The dispatcher replaces that constant by a UUID derived from what identifies the
S3 event (bucket, key, version id or sequencer), so a redelivery keeps its id.

Each function runs with its own environment, as each Lambda function has its own: the process
environment is swapped in for the invocation under one lock (``function_env``), so handlers of
functions whose variables differ never see each other's values (invocations are serialized).

Delivery is at least once, as in AWS. A message is deleted only after the handler returns; a
handler that raises is retried after a short back-off, and after ``max_attempts`` (Lambda's
asynchronous invocation makes 1 + 2 retries) the event is dropped and recorded in
``failures``. Each route has its own thread, like concurrent Lambda functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MOTO_CONSTANT_EVENT_ID = "17793124-05d4-b198-2fde-7ededc63b103"


@dataclass
class Route:
    name: str  # the function's name, for logs and stats
    queue_url: str
    handler: Callable[[dict, object], object]
    kind: str = "eventbridge"  # eventbridge | sqs
    timeout_s: int = 60
    memory_mb: int = 128
    batch_size: int = 10
    accept: Callable[[dict], bool] | None = None  # see the moto gap in the module docstring
    environment: dict[str, str] = field(default_factory=dict)  # the function's own variables
    invocations: int = 0
    filtered: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=50))  # last events handled
    errors: int = 0
    durations_s: list[float] = field(default_factory=list)


_MODULES: dict[tuple[str, str], object] = {}
_ENV_LOCK = threading.RLock()


@contextlib.contextmanager
def function_env(env: dict[str, str]):
    """Run the body with ``env`` layered over the process environment (one function at a time)."""
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def load_handler(handler: str, app_dir: str | Path):
    """``"app.on_upload"`` → the ``on_upload`` attribute of ``app.py`` in ``app_dir``, imported
    once per process and directory like a Lambda runtime's module cache (``app_dir`` goes on
    ``sys.path`` first, as the deployment package's root is in Lambda, so ``chalicelib`` is found)."""
    module_name, _, attr = handler.rpartition(".")
    app_dir = str(Path(app_dir).resolve())
    key = (app_dir, module_name)
    if key not in _MODULES:
        if app_dir in sys.path:
            sys.path.remove(app_dir)
        sys.path.insert(0, app_dir)
        path = Path(app_dir, *module_name.split(".")).with_suffix(".py")
        # A private module name: a second app directory in the same process (tests) must not
        # replace, or be replaced by, the ``app`` module other code imported.
        private = f"_nlpfleet_lambda_{hashlib.sha1(app_dir.encode()).hexdigest()[:10]}_{module_name}"
        spec = importlib.util.spec_from_file_location(private, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[private] = module
        spec.loader.exec_module(module)
        _MODULES[key] = module
    return getattr(_MODULES[key], attr)


def is_scheduled_event(event: dict) -> bool:
    return event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event"


def lambda_context(route: Route):
    from chalice.local import LambdaContext

    return LambdaContext(route.name, route.memory_mb, max_runtime_ms=route.timeout_s * 1000)


class Dispatcher:
    def __init__(
        self,
        routes: list[Route],
        make_client: Callable[[str], object],
        *,
        wait_s: int = 3,
        retry_backoff_s: int = 1,
        max_attempts: int = 3,
    ):
        self.routes = routes
        self._make_client = make_client
        self._wait_s = wait_s
        self._retry_backoff_s = retry_backoff_s
        self._max_attempts = max_attempts
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.failures: list[dict] = []  # events dropped after max_attempts: {route, body, error}
        self._busy = 0
        self._lock = threading.Lock()

    # -- one poll of one queue: the unit the threads repeat and the tests call directly
    def poll(self, route: Route, sqs=None, wait_s: int | None = None) -> int:
        """Receive one batch from the route's queue and invoke the handler; returns the number
        of messages handled successfully."""
        sqs = sqs or self._make_client("sqs")
        resp = sqs.receive_message(
            QueueUrl=route.queue_url,
            MaxNumberOfMessages=route.batch_size if route.kind == "sqs" else 10,
            WaitTimeSeconds=self._wait_s if wait_s is None else wait_s,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        messages = resp.get("Messages", [])
        if not messages:
            return 0
        with self._lock:
            self._busy += 1
        try:
            if route.kind == "sqs":
                return self._invoke(route, sqs, messages, _sqs_event(route.queue_url, messages))
            done = 0
            for msg in messages:
                try:
                    event = json.loads(msg["Body"])
                except json.JSONDecodeError:
                    log.error("%s: dropping a message that is not JSON: %.200s", route.name, msg["Body"])
                    sqs.delete_message(QueueUrl=route.queue_url, ReceiptHandle=msg["ReceiptHandle"])
                    continue
                if event.get("id") == MOTO_CONSTANT_EVENT_ID:
                    event["id"] = _event_id(event)
                if "detail-type" in event and "account" not in event:
                    event["account"] = _queue_account(route.queue_url)
                if route.accept is not None and not route.accept(event):
                    route.filtered += 1
                    sqs.delete_message(QueueUrl=route.queue_url, ReceiptHandle=msg["ReceiptHandle"])
                    continue
                done += self._invoke(route, sqs, [msg], event)
            return done
        finally:
            with self._lock:
                self._busy -= 1

    def _invoke(self, route: Route, sqs, messages: list[dict], event: dict) -> int:
        t0 = time.monotonic()
        route.invocations += 1
        route.recent.append(event)
        try:
            with function_env(route.environment):
                route.handler(event, lambda_context(route))
        except Exception as exc:
            route.errors += 1
            tb = traceback.format_exc()
            log.error("%s failed on %s: %s\n%s", route.name, _describe(event), exc, tb)
            for msg in messages:
                attempts = int(msg.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
                if attempts >= self._max_attempts:
                    self.failures.append({"route": route.name, "body": msg["Body"], "error": repr(exc)})
                    sqs.delete_message(QueueUrl=route.queue_url, ReceiptHandle=msg["ReceiptHandle"])
                else:
                    sqs.change_message_visibility(
                        QueueUrl=route.queue_url,
                        ReceiptHandle=msg["ReceiptHandle"],
                        VisibilityTimeout=self._retry_backoff_s * attempts,
                    )
            return 0
        finally:
            route.durations_s.append(time.monotonic() - t0)
        for msg in messages:
            sqs.delete_message(QueueUrl=route.queue_url, ReceiptHandle=msg["ReceiptHandle"])
        log.info("%s handled %s in %.3fs", route.name, _describe(event), time.monotonic() - t0)
        return len(messages)

    def drain(self, timeout_s: float = 30.0, quiet_s: float = 0.3) -> int:
        """Handle messages on every route until all queues stay empty for ``quiet_s`` (tests)."""
        sqs = self._make_client("sqs")
        deadline = time.monotonic() + timeout_s
        total, quiet_since = 0, None
        while time.monotonic() < deadline:
            n = sum(self.poll(r, sqs, wait_s=0) for r in self.routes)
            total += n
            if n:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return total
            else:
                time.sleep(0.05)
        raise TimeoutError(f"queues did not go quiet within {timeout_s}s")

    def _run(self, route: Route) -> None:
        sqs = self._make_client("sqs")
        while not self._stop.is_set():
            try:
                self.poll(route, sqs)
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("%s: polling failed", route.name)
                self._stop.wait(1.0)

    def start(self) -> Dispatcher:
        for route in self.routes:
            t = threading.Thread(target=self._run, args=(route,), name=f"dispatch-{route.name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Let the handlers running now finish (as Lambda would), then stop polling."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self._wait_s + 60)

    def stats(self) -> dict:
        return {
            r.name: {
                "invocations": r.invocations,
                "errors": r.errors,
                "filtered": r.filtered,
                "max_s": round(max(r.durations_s, default=0.0), 3),
                "queue_url": r.queue_url,
                "recent": list(r.recent)[-10:],
            }
            for r in self.routes
        }


def _sqs_event(queue_url: str, messages: list[dict]) -> dict:
    """The event an SQS event source mapping hands a Lambda (AWS docs, "Using Lambda with SQS")."""
    parts = queue_url.rstrip("/").split("/")
    account, name = parts[-2], parts[-1]
    region = "us-east-1"
    host = parts[2] if len(parts) > 2 else ""
    if host.startswith("sqs.") and host.count(".") >= 2:
        region = host.split(".")[1]
    arn = f"arn:aws:sqs:{region}:{account}:{name}"
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": m.get("MessageAttributes", {}),
                "md5OfBody": m.get("MD5OfBody"),
                "eventSource": "aws:sqs",
                "eventSourceARN": arn,
                "awsRegion": region,
            }
            for m in messages
        ]
    }


def _event_id(event: dict) -> str:
    detail = event.get("detail") or {}
    obj = detail.get("object") or {}
    ident = obj.get("version-id") if obj.get("version-id") not in (None, "null") else obj.get("sequencer")
    key = json.dumps(
        [
            event.get("source"),
            event.get("detail-type"),
            (detail.get("bucket") or {}).get("name"),
            obj.get("key"),
            ident,
            event.get("time"),
        ]
        if obj
        else [event.get("source"), event.get("detail-type"), event.get("time"), detail],
        sort_keys=True,
    )
    return str(uuid.uuid5(uuid.NAMESPACE_URL, key))


def _queue_account(queue_url: str) -> str:
    return queue_url.rstrip("/").split("/")[-2]


def _describe(event: dict) -> str:
    if "Records" in event:
        return f"{len(event['Records'])} SQS record(s)"
    return f"{event.get('source')}/{event.get('detail-type')} {event.get('id', '')}"
