"""Job records in DynamoDB (adapter): every write is conditional on the version it read.

Table layout (``TABLE_SPEC`` is what infra/ and the tests create):

- partition key ``job_id`` (S); attributes ``state``, ``job_type``, ``created_at``,
  ``instance_id`` (when one is assigned), ``version`` (N) and ``doc`` (the whole record as
  JSON, which keeps floats and nested dicts out of DynamoDB's type system);
- GSI ``by_state`` (``state``, ``created_at``) for listing and the heartbeat sweep;
- GSI ``by_instance`` (``instance_id``) to find a job from an EC2 event.

``update(job_id, decide)`` reads the record, calls the pure ``decide(job) -> Job`` and writes
the result only if ``version`` is still what it read; on a lost race it re-reads and decides
again, so a duplicated or concurrent event sees the winner's state (and is refused by the
state machine if that state is terminal) instead of overwriting it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import asdict, replace

from botocore.exceptions import ClientError

from chalicelib.aws import Clients, aws_error, error_code
from chalicelib.errors import ConcurrentUpdate, InvalidJobSpec, JobNotFound
from chalicelib.jobs import STATES, Job

TABLE_SPEC = {
    "AttributeDefinitions": [
        {"AttributeName": "job_id", "AttributeType": "S"},
        {"AttributeName": "state", "AttributeType": "S"},
        {"AttributeName": "created_at", "AttributeType": "S"},
        {"AttributeName": "instance_id", "AttributeType": "S"},
    ],
    "KeySchema": [{"AttributeName": "job_id", "KeyType": "HASH"}],
    "GlobalSecondaryIndexes": [
        {
            "IndexName": "by_state",
            "KeySchema": [
                {"AttributeName": "state", "KeyType": "HASH"},
                {"AttributeName": "created_at", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        },
        {
            "IndexName": "by_instance",
            "KeySchema": [{"AttributeName": "instance_id", "KeyType": "HASH"}],
            "Projection": {"ProjectionType": "KEYS_ONLY"},
        },
    ],
    "BillingMode": "PAY_PER_REQUEST",
}


def _to_item(job: Job) -> dict:
    item = {
        "job_id": {"S": job.job_id},
        "state": {"S": job.state},
        "job_type": {"S": job.job_type},
        "created_at": {"S": job.created_at},
        "version": {"N": str(job.version)},
        "doc": {"S": json.dumps(asdict(job), separators=(",", ":"))},
    }
    if job.instance_id:
        item["instance_id"] = {"S": job.instance_id}
    return item


def _from_item(item: dict) -> Job:
    doc = json.loads(item["doc"]["S"])
    doc["history"] = tuple(doc.get("history") or ())
    doc["attempts"] = tuple(doc.get("attempts") or ())
    doc["version"] = int(item["version"]["N"])
    return Job(**doc)


def _encode_token(key: dict | None) -> str | None:
    if not key:
        return None
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


def _decode_token(token: str) -> dict:
    try:
        key = json.loads(base64.urlsafe_b64decode(token.encode()))
        if not isinstance(key, dict):
            raise ValueError
        return key
    except ValueError:
        raise InvalidJobSpec({"next_token": "is not a token this API returned"}) from None


class JobsStore:
    def __init__(self, clients: Clients, table: str):
        self._clients = clients
        self.table = table

    @property
    def _db(self):
        return self._clients.dynamodb

    def create(self, job: Job) -> tuple[Job, bool]:
        """Insert ``job`` unless its id exists; returns (the stored job, whether it was new)."""
        job = replace(job, version=1)
        try:
            self._db.put_item(
                TableName=self.table,
                Item=_to_item(job),
                ConditionExpression="attribute_not_exists(job_id)",
            )
            return job, True
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                return self.get(job.job_id), False
            raise aws_error("DynamoDB PutItem", e) from e

    def get(self, job_id: str) -> Job:
        try:
            resp = self._db.get_item(TableName=self.table, Key={"job_id": {"S": job_id}}, ConsistentRead=True)
        except ClientError as e:
            raise aws_error("DynamoDB GetItem", e) from e
        if "Item" not in resp:
            raise JobNotFound(job_id)
        return _from_item(resp["Item"])

    def put_if_version(self, job: Job, expected: int) -> Job | None:
        """Write ``job`` as version ``expected + 1`` if the stored one is ``expected``;
        None when another writer got there first."""
        new = replace(job, version=expected + 1)
        try:
            self._db.put_item(
                TableName=self.table,
                Item=_to_item(new),
                ConditionExpression="#v = :v",
                ExpressionAttributeNames={"#v": "version"},
                ExpressionAttributeValues={":v": {"N": str(expected)}},
            )
            return new
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                return None
            raise aws_error("DynamoDB PutItem", e) from e

    def update(self, job_id: str, decide: Callable[[Job], Job], attempts: int = 8) -> Job:
        """Read, decide (pure), conditionally write; re-read and re-decide on a lost race.
        Exceptions from ``decide`` (``InvalidTransition``, ``Skip``) propagate unchanged."""
        for _ in range(attempts):
            current = self.get(job_id)
            new = decide(current)
            if new == current:
                return current
            written = self.put_if_version(new, current.version)
            if written is not None:
                return written
        raise ConcurrentUpdate(f"job {job_id!r}: {attempts} conditional writes lost to concurrent updates")

    def find_by_instance(self, instance_id: str) -> Job | None:
        try:
            resp = self._db.query(
                TableName=self.table,
                IndexName="by_instance",
                KeyConditionExpression="instance_id = :i",
                ExpressionAttributeValues={":i": {"S": instance_id}},
            )
        except ClientError as e:
            raise aws_error("DynamoDB Query", e) from e
        items = resp.get("Items", [])
        return self.get(items[0]["job_id"]["S"]) if items else None

    def list(
        self,
        *,
        state: str | None = None,
        job_type: str | None = None,
        limit: int = 25,
        next_token: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """A page of jobs, newest first when filtered by state (the ``by_state`` index)."""
        kwargs: dict = {"TableName": self.table, "Limit": limit}
        if next_token:
            kwargs["ExclusiveStartKey"] = _decode_token(next_token)
        if job_type:
            kwargs["FilterExpression"] = "job_type = :t"
            kwargs["ExpressionAttributeValues"] = {":t": {"S": job_type}}
        try:
            if state:
                kwargs["IndexName"] = "by_state"
                kwargs["KeyConditionExpression"] = "#s = :s"
                kwargs["ExpressionAttributeNames"] = {"#s": "state"}
                kwargs.setdefault("ExpressionAttributeValues", {})[":s"] = {"S": state}
                kwargs["ScanIndexForward"] = False
                resp = self._db.query(**kwargs)
            else:
                resp = self._db.scan(**kwargs)
        except ClientError as e:
            if error_code(e) == "ValidationException" and next_token:
                raise InvalidJobSpec({"next_token": "does not belong to this listing"}) from e
            raise aws_error("DynamoDB list", e) from e
        jobs = [_from_item(i) for i in resp.get("Items", [])]
        return jobs, _encode_token(resp.get("LastEvaluatedKey"))

    def active(self, states: tuple[str, ...]) -> list[Job]:
        """Every job in ``states`` (the sweep's input)."""
        out: list[Job] = []
        for s in states:
            assert s in STATES
            token = None
            while True:
                page, token = self.list(state=s, limit=100, next_token=token)
                out.extend(page)
                if not token:
                    break
        return out
