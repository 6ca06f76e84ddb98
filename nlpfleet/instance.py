"""The on-instance entry point (console script ``nlpfleet-instance``): one AMI, role chosen at boot.

Reads the launch contract (docs/CONTRACTS.md) from IMDSv2 ``user-data`` or ``--user-data FILE``
and runs it:

- ``role: job`` runs the job type (``preprocess`` here, ``finetune`` through
  ``training.pipeline.train_and_export``, ``batch_infer`` through
  ``inference.runtime.load_classifier``), reporting progress as heartbeats and the result to the
  job record through ``chalicelib.jobs_store`` (conditional writes checked by the state machine).
  A heartbeat refused because the job was cancelled stops the run. An interrupted fine-tune
  (SIGTERM on a spot reclaim: the worker checkpoints and returns) reports nothing final: the
  control plane relaunches and the next attempt resumes from the checkpoint.
- ``role: inference`` hands over to the instance agent (``inference.agent``), imported at call time.

Exit status: 0 success, 1 job failed, 2 bad user data, 3 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger("nlpfleet.instance")
IMDS = "http://169.254.169.254"  # NLPFLEET_IMDS_URL overrides (the local stack's IMDSv2 stand-in)
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3


class Cancelled(Exception):
    """The job record refused a heartbeat: the job is already terminal (cancelled, failed)."""


def _imds_get(path: str, timeout_s: float = 2.0, base: str | None = None) -> bytes:
    """IMDSv2: a session token first (PUT), then the GET with it."""
    base = base or os.environ.get("NLPFLEET_IMDS_URL") or IMDS
    req = urllib.request.Request(
        f"{base}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        token = r.read().decode()
    req = urllib.request.Request(f"{base}{path}", headers={"X-aws-ec2-metadata-token": token})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return r.read()


def imds_user_data(timeout_s: float = 2.0, base: str | None = None) -> bytes:
    return _imds_get("/latest/user-data", timeout_s, base)


def watch_spot_notice(
    on_notice: Callable[[dict], None], stop: threading.Event, poll_s: float = 5.0, base: str | None = None
) -> threading.Thread:
    """Poll ``spot/instance-action`` (404 until EC2 schedules a reclaim, two minutes ahead) and call
    ``on_notice`` once when it appears. ``main`` passes a function that SIGTERMs this process, so
    the training worker checkpoints with the full two minutes instead of at the final shutdown."""

    def loop() -> None:
        while not stop.is_set():
            try:
                notice = json.loads(_imds_get("/latest/meta-data/spot/instance-action", base=base))
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    log.warning("IMDS spot/instance-action: HTTP %s", e.code)
            except (OSError, ValueError) as e:
                log.debug("IMDS spot/instance-action: %s", e)
            else:
                log.warning("spot interruption notice: %s", notice)
                on_notice(notice)
                return
            stop.wait(poll_s)

    t = threading.Thread(target=loop, name="spot-notice", daemon=True)
    t.start()
    return t


def parse_user_data(raw: bytes | str) -> dict:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"user data is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("role") not in ("job", "inference"):
        raise ValueError("user data must be a JSON object with role 'job' or 'inference'")
    need = ("job_id", "job_type", "spec", "table", "region") if data["role"] == "job" else ("region",)
    missing = [k for k in need if not data.get(k)]
    if missing:
        raise ValueError(f"user data lacks {', '.join(missing)}")
    return data


class Reporter:
    """Writes worker progress to the job record: the first heartbeat moves LAUNCHED → RUNNING,
    later ones at most every ``every_s`` seconds (plus every epoch/eval/checkpoint event)."""

    def __init__(
        self,
        store,
        job_id: str,
        clock: Callable[[], datetime],
        every_s: float = 15.0,
        attempt: int | None = None,
    ):
        self.store, self.job_id, self.clock, self.every_s = store, job_id, clock, every_s
        self.attempt = attempt
        self._last = 0.0
        self.cancelled = threading.Event()

    def _current(self, j):
        """Only the job's current attempt may write: a superseded instance (the job was
        relaunched elsewhere) is refused like a cancelled one."""
        from chalicelib.errors import Skip

        if self.attempt is not None and j.attempt != self.attempt:
            raise Skip(f"attempt {self.attempt} was superseded by attempt {j.attempt}")
        return j

    def __call__(self, event: dict) -> None:
        from chalicelib import jobs as J

        kind = event.get("event", "heartbeat")
        now_m = time.monotonic()
        if kind == "heartbeat" and self._last and now_m - self._last < self.every_s:
            return
        self._last = now_m
        progress = {k: v for k, v in event.items() if isinstance(v, int | float | str | bool) or v is None}
        metrics = {k: v for k, v in event.items() if kind == "eval" and isinstance(v, int | float)}
        try:
            self.store.update(
                self.job_id, lambda j: J.record_progress(self._current(j), progress, self.clock(), metrics)
            )
        except (J.InvalidTransition, J.Skip):
            self.cancelled.set()
            raise Cancelled(self.job_id) from None

    def finish(self, ok: bool, result: dict | None = None, error: str | None = None) -> None:
        from chalicelib import jobs as J

        try:
            self.store.update(
                self.job_id,
                lambda j: J.finish(self._current(j), ok=ok, now=self.clock(), result=result, error=error),
            )
        except (J.InvalidTransition, J.Skip):
            log.warning("job %s was already finished elsewhere; result not recorded", self.job_id)


def _s3(data: dict):
    import boto3

    kw = {"region_name": data.get("region")}
    if data.get("endpoint_url"):
        kw["endpoint_url"] = data["endpoint_url"]
    return boto3.client("s3", **kw)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A job's working directory on the instance's scratch disk (``NLPFLEET_SCRATCH``), removed
    when the job ends however it ends: what it produced is in S3 by then, and the local copies
    (hundreds of MB for a fine-tune) would pile up on a long-lived machine such as the demo's."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("NLPFLEET_SCRATCH")))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_finetune(data: dict, report: Reporter, s3) -> tuple[str, dict]:
    with scratch_dir("nlpfleet-train-") as work:
        return _finetune(data, report, s3, work)


def _finetune(data: dict, report: Reporter, s3, work: Path) -> tuple[str, dict]:
    from chalicelib.jobs import parse_s3_uri
    from training.config import TrainConfig
    from training.pipeline import ExportSpec, train_and_export

    spec, launch = data["spec"], data.get("launch") or {}
    precision = {"fp32": "no", "fp16": "auto", "bf16": "bf16"}.get(spec.get("precision") or "fp16", "auto")
    micro = int(launch.get("micro_batch_per_gpu") or spec.get("batch_size") or 32)
    config = TrainConfig.from_dict(
        {
            "train": spec["input_uri"],
            "dev": spec.get("eval_uri"),
            "output_dir": str(work),
            "text_column": spec.get("text_field") or "text",
            "label_column": spec.get("label_field") or "label",
            "max_seq_len": int(spec.get("seq_len") or 128),
            "batch_size": micro,
            "grad_accum_steps": int(launch.get("gradient_accumulation") or 1),
            "epochs": int(spec.get("epochs") or 3),
            "lr": float(spec.get("learning_rate") or 5e-5),
            "mixed_precision": precision,
            "checkpoint_s3_uri": spec.get("checkpoint_uri"),
            "resume": True,
            "progress_bar": False,
            **({"model_dir": spec["model_dir"]} if spec.get("model_dir") else {}),
            **({"max_steps": spec["max_steps"]} if spec.get("max_steps") else {}),
            "checkpoint_every_steps": int(spec.get("checkpoint_every_steps") or 0),
        }
    )
    _, prefix = parse_s3_uri(spec["output_uri"])
    version = prefix.rstrip("/").split("/")[-1]
    if int(launch.get("processes") or 1) > 1:
        return _torchrun(data, config, spec, version, report)
    out = train_and_export(
        config,
        ExportSpec(name=spec["model_name"], version=version, publish_uri=spec["output_uri"]),
        report,
        s3_client=s3,
    )
    train = out["train"]
    if train.get("status") != "completed":
        return "interrupted", train
    manifest = out.get("manifest") or {}
    return "completed", {
        "model_uri": out.get("uri"),
        "version": version,
        "metrics": manifest.get("metrics", {}),
        "published_variants": sorted(
            k for k, v in (manifest.get("variants") or {}).items() if v.get("published")
        ),
    }


def _torchrun(data: dict, config, spec: dict, version: str, report: Reporter) -> tuple[str, dict]:
    """DDP across the instance's GPUs: ``torchrun`` runs the training CLI, this process keeps
    the heartbeat going while it runs."""
    n = int(data["launch"]["processes"])
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={n}",
        "-m",
        "training.worker",
        "--export-name",
        spec["model_name"],
        "--export-version",
        version,
        "--publish-uri",
        spec["output_uri"],
    ]
    for k, v in config.to_dict().items():
        if v is not None and not isinstance(v, bool):
            args += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.Popen(args)
    while proc.poll() is None:
        report({"event": "heartbeat", "processes": n})
        time.sleep(15)
    if proc.returncode == 3:
        return "interrupted", {}
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}")
    return "completed", {"model_uri": spec["output_uri"], "version": version}


def run_batch_infer(data: dict, report: Reporter, s3) -> tuple[str, dict]:
    with scratch_dir("nlpfleet-infer-") as work:
        return _batch_infer(data, report, s3, work)


def _batch_infer(data: dict, report: Reporter, s3, work: Path) -> tuple[str, dict]:
    from chalicelib.jobs import parse_s3_uri
    from inference.artifact import fetch_artifact
    from inference.runtime import load_classifier
    from nlpfleet.jobs_preprocess import _rows, normalise

    spec = data["spec"]
    model_dir = fetch_artifact(spec["model_uri"], work / "model", s3)
    clf = load_classifier(model_dir)
    bucket, key = parse_s3_uri(spec["input_uri"])
    src = work / Path(key).name
    s3.download_file(bucket, key, str(src))
    out_path = work / "predictions.jsonl"
    batch_size = int(spec.get("batch_size") or 64)
    n = 0
    texts: list[tuple[int, str]] = []

    def flush(f) -> None:
        nonlocal n
        preds = clf.classify([t for _, t in texts])
        for (line, text), p in zip(texts, preds, strict=True):
            f.write(json.dumps({"line": line, "text": text, "label": p["label"], "score": p["score"]}) + "\n")
        n += len(texts)
        texts.clear()
        report({"event": "heartbeat", "classified": n})

    with out_path.open("w", encoding="utf-8") as f:
        for line, text, _ in _rows(src, spec.get("text_field") or "text", spec.get("label_field") or "label"):
            if isinstance(text, str) and normalise(text):
                texts.append((line, normalise(text)))
            if len(texts) >= batch_size:
                flush(f)
        if texts:
            flush(f)
    ob, ok = parse_s3_uri(spec["output_uri"])
    s3.upload_file(str(out_path), ob, ok)
    return "completed", {"output_uri": spec["output_uri"], "classified": n}


def run_preprocess(data: dict, report: Reporter, s3) -> tuple[str, dict]:
    from nlpfleet.jobs_preprocess import run

    return "completed", run(data["spec"], report, s3)


RUNNERS = {"preprocess": run_preprocess, "finetune": run_finetune, "batch_infer": run_batch_infer}


def run_job(data: dict, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> int:
    from chalicelib.aws import Clients
    from chalicelib.jobs_store import JobsStore

    store = JobsStore(Clients(data["region"], data.get("endpoint_url")), data["table"])
    report = Reporter(store, data["job_id"], clock, attempt=data.get("attempt"))
    s3 = _s3(data)
    try:
        report({"event": "started", "attempt": data.get("attempt", 1)})
        status, result = RUNNERS[data["job_type"]](data, report, s3)
    except Cancelled:
        log.warning("job %s is no longer active; stopping", data["job_id"])
        return EXIT_FAILED
    except Exception as e:  # the job's failure is recorded, then the process reports it
        log.exception("job %s failed", data["job_id"])
        report.finish(False, error=f"{type(e).__name__}: {e}")
        return EXIT_FAILED
    if report.cancelled.is_set():  # the training worker swallows callback errors: check here
        log.warning("job %s was cancelled or superseded while running; no result recorded", data["job_id"])
        return EXIT_FAILED
    if status == "interrupted":
        log.warning("job %s interrupted; the next attempt resumes from the last checkpoint", data["job_id"])
        return EXIT_INTERRUPTED
    report.finish(True, result=result)
    return EXIT_OK


def run_inference(data: dict) -> int:
    import importlib

    agent = importlib.import_module("inference.agent")
    try:
        return int(agent.run_agent(data) or 0)
    except ValueError as e:  # bad inference user data: say what is wrong, no crash loop
        log.error("inference user data refused: %s", e)
        print(f"error: inference user data refused: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("NLPFLEET_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(
        prog="nlpfleet-instance", description="Run this instance's role from its user data."
    )
    p.add_argument("--user-data", help="a file holding the user data JSON (default: IMDSv2)")
    p.add_argument(
        "--shutdown", action="store_true", help="power off when a job ends (the instance terminates)"
    )
    args = p.parse_args(argv)
    try:
        raw = Path(args.user_data).read_bytes() if args.user_data else imds_user_data()
        data = parse_user_data(raw)
    except (OSError, ValueError) as e:
        print(f"nlpfleet-instance: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if data["role"] == "inference":
        return run_inference(data)
    stop = threading.Event()
    if not args.user_data or os.environ.get(
        "NLPFLEET_IMDS_URL"
    ):  # checkpoint as soon as a reclaim is announced
        watch_spot_notice(lambda _n: os.kill(os.getpid(), signal.SIGTERM), stop)
    try:
        code = run_job(data)
    finally:
        stop.set()
    if args.shutdown and code != EXIT_INTERRUPTED:
        subprocess.run(["shutdown", "-h", "now"], check=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
