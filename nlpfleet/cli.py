"""``nlpfleet``: the command line a user drives the product with.

It talks to the control plane's REST API over HTTP, like any client: against the local stack
(``nlpfleet up`` starts one; its URL is found in the local state directory) or against a real
deployment (``--api-url https://….execute-api….amazonaws.com/api``), where requests are signed
with SigV4 (IAM authorization of the prod stage) from the usual AWS credential chain.

Commands: ``up``, ``down``, ``upload``, ``submit``, ``status`` (``--watch`` shows a progress bar
for running jobs), ``cancel``, ``plan``, ``fleet``, ``models``, ``logs``, ``demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


class CliError(RuntimeError):
    pass


# -- local stack state ------------------------------------------------------------------------


def state_dir(args) -> Path:
    from localstack.state import default_state_dir

    return Path(args.state_dir) if getattr(args, "state_dir", None) else default_state_dir()


def local_state(args) -> dict | None:
    from localstack.state import STATE_FILE

    f = state_dir(args) / STATE_FILE
    if not f.exists():
        return None
    st = json.loads(f.read_text())
    try:
        os.kill(st["pid"], 0)
    except ProcessLookupError:
        return None
    return st


# -- the API client ---------------------------------------------------------------------------


class Api:
    """HTTP client for the control plane; signs with SigV4 when ``sigv4`` is set."""

    def __init__(self, url: str, *, sigv4: bool = False, region: str | None = None, timeout_s: float = 60.0):
        self.url = url.rstrip("/")
        self.sigv4 = sigv4
        self.region = (
            region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
        self._http = httpx.Client(timeout=timeout_s)

    def _signed_headers(self, method: str, url: str, body: bytes | None, headers: dict) -> dict:
        import botocore.session
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        creds = botocore.session.get_session().get_credentials()
        if creds is None:
            raise CliError("no AWS credentials found for SigV4 signing (aws configure, or AWS_PROFILE)")
        req = AWSRequest(method=method, url=url, data=body or b"", headers=headers)
        SigV4Auth(creds.get_frozen_credentials(), "execute-api", self.region).add_auth(req)
        return dict(req.headers.items())

    def request(
        self, method: str, path: str, body: object | None = None, headers: dict | None = None
    ) -> dict:
        url = self.url + path
        data = json.dumps(body).encode() if body is not None else None
        hdrs = (
            {"content-type": "application/json", **(headers or {})}
            if data is not None
            else dict(headers or {})
        )
        if self.sigv4:
            hdrs = self._signed_headers(method, url, data, hdrs)
        try:
            r = self._http.request(method, url, content=data, headers=hdrs)
        except httpx.HTTPError as exc:
            raise CliError(f"{method} {url}: {exc}") from None
        try:
            doc = r.json()
        except ValueError:
            doc = {"raw": r.text}
        if r.status_code >= 400:
            msg = doc.get("Message") or doc.get("message") or doc.get("error") or r.text
            raise CliError(
                f"{method} {path} -> {r.status_code}: {json.dumps(msg) if not isinstance(msg, str) else msg}"
            )
        return doc

    def get(self, path: str) -> dict:
        return self.request("GET", path)

    def post(self, path: str, body: object, headers: dict | None = None) -> dict:
        return self.request("POST", path, body, headers)


def api_from_args(args) -> Api:
    url = args.api_url or os.environ.get("NLPFLEET_API_URL")
    sigv4 = args.sigv4
    if not url:
        st = local_state(args)
        if st is None:
            raise CliError("no API URL: run `nlpfleet up` for a local stack, or pass --api-url")
        url = st["api_url"]
    elif sigv4 is None:
        sigv4 = ".amazonaws.com" in url  # a real deployment: IAM authorization (prod stage)
    return Api(url, sigv4=bool(sigv4), region=args.region)


def s3_client(args):
    """S3 of the local stack (moto) or of the real account."""
    import boto3

    if args.api_url or os.environ.get("NLPFLEET_API_URL"):
        return boto3.client("s3", region_name=args.region)
    st = local_state(args)
    if st is None:
        raise CliError("no local stack is running: `nlpfleet up` first")
    from localstack.moto import aws_env, client

    return client("s3", aws_env(st["endpoint_url"], st["region"]))


# -- output helpers ---------------------------------------------------------------------------


def emit(args, doc) -> None:
    print(json.dumps(doc, indent=2, default=str))


def job_line(job: dict) -> str:
    inst = job.get("instance") or {}
    prog = job.get("progress") or {}
    metrics = job.get("metrics") or {}
    parts = [f"{job['job_id']:<30}", f"{job.get('type', ''):<10}", f"{job['state']:<10}"]
    if inst:
        parts.append(f"{inst.get('instance_type', '')}/{inst.get('market', '')}")
    frac = progress_fraction(prog)
    if frac is not None:
        parts.append(f"{100 * frac:5.1f}%")
    acc = metrics.get("accuracy") or metrics.get("dev_accuracy") or (job.get("result") or {}).get("accuracy")
    if acc is not None:
        parts.append(f"acc={acc:.3f}")
    if job.get("error"):
        parts.append(f"error={job['error']}")
    return "  ".join(parts)


def progress_fraction(prog: dict) -> float | None:
    if not prog:
        return None
    if isinstance(prog.get("fraction"), int | float):
        return float(prog["fraction"])
    for done, total in (
        ("step", "total_steps"),
        ("steps", "total_steps"),
        ("done", "total"),
        ("examples", "total"),
    ):
        if (
            isinstance(prog.get(done), int | float)
            and isinstance(prog.get(total), int | float)
            and prog[total]
        ):
            return min(1.0, prog[done] / prog[total])
    if isinstance(prog.get("percent"), int | float):
        return prog["percent"] / 100.0
    return None


# -- commands ---------------------------------------------------------------------------------


def cmd_up(args) -> int:
    st = local_state(args)
    if st:
        print(f"local stack already running (pid {st['pid']}): api {st['api_url']}")
        return 0
    from localstack.stack import StackConfig, spawn

    sd = state_dir(args)
    cfg = StackConfig(state_dir=sd, speed=args.speed)
    if args.max_size:
        cfg.parameters["InferenceMaxSize"] = str(args.max_size)
    for kv in args.env or []:
        k, _, v = kv.partition("=")
        cfg.env_overrides[k] = v
    try:
        st = spawn(cfg, timeout_s=args.timeout)
    except (RuntimeError, TimeoutError) as exc:
        raise CliError(str(exc)) from None
    print(f"local stack up (pid {st['pid']})")
    print(f"  api:           {st['api_url']}")
    print(f"  load balancer: {st['lb_url']}")
    print(f"  aws endpoint:  {st['endpoint_url']}")
    print(f"  logs:          {sd}/stack.log")
    return 0


def cmd_down(args) -> int:
    from localstack.stack import stop

    if stop(state_dir(args), timeout_s=args.timeout):
        print("local stack stopped")
    else:
        print("no local stack running")
    return 0


def _spec(args) -> dict:
    spec = json.loads(Path(args.spec).read_text()) if getattr(args, "spec", None) else {}
    for kv in args.set or []:
        k, _, v = kv.partition("=")
        try:
            spec[k] = json.loads(v)
        except ValueError:
            spec[k] = v
    return spec


def cmd_submit(args) -> int:
    api = api_from_args(args)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    job = api.post("/jobs", _spec(args), headers)
    if args.json:
        emit(args, job)
    else:
        print(job_line(job))
        plan = job.get("plan") or {}
        if plan:
            print(f"  plan: {plan.get('instance_type')} ({plan.get('reason', plan.get('why', ''))})")
    return 0


def cmd_upload(args) -> int:
    """Upload a dataset (file or folder) under ``datasets/``; a job spec goes first as the
    sidecar ``<key>.job.json`` of the training file, so the upload event finds it."""
    s3 = s3_client(args)
    bucket = args.bucket or _bucket(args)
    src = Path(args.path)
    files = sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else [src]
    if src.is_dir():  # the training file and its eval split: a README or label list is no dataset
        left = [p.name for p in files if p.name not in (args.train_file, args.eval_file)]
        files = [p for p in files if p.name in (args.train_file, args.eval_file)]
        if not any(p.name == args.train_file for p in files):
            raise CliError(f"{src} has no training file {args.train_file!r} (set --train-file)")
        if left:
            print(f"not uploaded (not the training or eval file): {', '.join(left)}")
    prefix = args.prefix.strip("/")
    train = next((p for p in files if p.name == args.train_file), files[0])
    spec = _spec(args)
    others = [p for p in files if p != train]
    keys = {}
    for p in others:  # eval files first: the job must find them when it starts
        key = f"{prefix}/{p.name}"
        s3.upload_file(str(p), bucket, key)
        keys[p.name] = key
    if spec or args.spec:
        if args.eval_file and args.eval_file in keys and "eval_uri" not in spec:
            spec["eval_uri"] = f"s3://{bucket}/{keys[args.eval_file]}"
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{train.name}.job.json", Body=json.dumps(spec).encode())
    s3.upload_file(str(train), bucket, f"{prefix}/{train.name}")
    print(f"uploaded {len(files)} file(s) to s3://{bucket}/{prefix}/ (training file {train.name} last)")
    return 0


def _bucket(args) -> str:
    st = local_state(args)
    if st:
        return st["outputs"].get("BucketName") or st["environment"]["BUCKET"]
    raise CliError("--bucket is required against a real deployment")


def cmd_status(args) -> int:
    api = api_from_args(args)
    if args.job_id:
        if args.watch:
            return watch_job(api, args.job_id, args.interval)
        job = api.get(f"/jobs/{args.job_id}")
        emit(args, job) if args.json else print(job_line(job))
        return 0
    while True:
        jobs = api.get("/jobs").get("jobs", [])
        if args.json:
            emit(args, jobs)
        else:
            for j in jobs:
                print(job_line(j))
        running = [j for j in jobs if j["state"] not in TERMINAL]
        if not args.watch or not running:
            return 0
        if len(running) == 1:
            return watch_job(api, running[0]["job_id"], args.interval)
        time.sleep(args.interval)
        print()


def watch_job(api: Api, job_id: str, interval: float, out=None) -> int:
    """Follow one job to a terminal state, with a progress bar while it trains."""
    from tqdm import tqdm

    bar = None
    state = None
    try:
        while True:
            job = api.get(f"/jobs/{job_id}")
            if job["state"] != state:
                state = job["state"]
                msg = f"{job_id}: {state}"
                inst = job.get("instance") or {}
                if inst.get("instance_type"):
                    msg += f" on {inst['instance_type']} ({inst.get('market')}, {inst.get('instance_id')})"
                (bar.write if bar else print)(msg)
            frac = progress_fraction(job.get("progress") or {})
            if frac is not None:
                if bar is None:
                    bar = tqdm(total=1000, desc="training", unit="‰", file=out or sys.stderr, leave=True)
                bar.n = int(frac * 1000)
                prog = job.get("progress") or {}
                post = {k: prog[k] for k in ("epoch", "loss", "accuracy", "stage") if k in prog}
                bar.set_postfix(post, refresh=False)
                bar.refresh()
            if state in TERMINAL:
                if bar:
                    bar.close()
                print(job_line(job))
                return 0 if state == "SUCCEEDED" else 1
            time.sleep(interval)
    finally:
        if bar is not None:
            bar.close()


def cmd_cancel(args) -> int:
    emit(args, api_from_args(args).request("DELETE", f"/jobs/{args.job_id}"))
    return 0


def cmd_plan(args) -> int:
    emit(args, api_from_args(args).post("/plan", _spec(args)))
    return 0


def cmd_fleet(args) -> int:
    doc = api_from_args(args).get("/fleet")
    if args.json:
        emit(args, doc)
        return 0
    group = doc.get("group") or {}
    print(
        f"group {doc.get('asg_name')}: desired {group.get('desired_capacity')} "
        f"(min {group.get('min_size')}, max {group.get('max_size')})"
    )
    for state, n in sorted((doc.get("lifecycle_counts") or {}).items()):
        print(f"  {state:<22} {n}")
    for inst in group.get("instances", []):
        print(f"  {inst.get('instance_id')}  {inst.get('lifecycle_state')}  {inst.get('health_status', '')}")
    active = doc.get("active_model") or {}
    print(f"active model: {active.get('name', '-')}/{active.get('version', '-')}  {active.get('uri', '')}")
    return 0


def cmd_models(args) -> int:
    doc = api_from_args(args).get("/models")
    if args.json:
        emit(args, doc)
        return 0
    for m in doc.get("models", []):
        acc = (m.get("metrics") or {}).get("accuracy")
        print(
            f"{'*' if m.get('active') else ' '} {m['name']}/{m['version']}  variants={','.join(m['variants'])}"
            + (f"  accuracy={acc:.3f}" if isinstance(acc, int | float) else "")
        )
    for bad in doc.get("invalid", []):
        print(f"  invalid: {bad['key']}: {bad['problem']}")
    return 0


def cmd_logs(args) -> int:
    """Local stack: the stack's log, or an instance's console (by instance or job id)."""
    sd = state_dir(args)
    if args.api_url:
        raise CliError("on AWS, instance logs are in CloudWatch Logs group /nlpfleet/<stage>/instances")
    if not args.target:
        path = sd / "stack.log"
    else:
        path = sd / "instances" / args.target / "console.log"
        if not path.exists():  # a job id: its instances' consoles
            matches = sorted(
                (
                    d / "console.log"
                    for d in (sd / "instances").glob("i-*")
                    if (d / "user-data.json").exists() and args.target in (d / "user-data.json").read_text()
                ),
                key=lambda p: p.stat().st_mtime,
            )  # the job's latest attempt last
            if not matches:
                raise CliError(f"no log for {args.target} under {sd}")
            path = matches[-1]
    lines = path.read_text(errors="replace").splitlines()
    print("\n".join(lines[-args.tail :]))
    if args.follow:
        with open(path, errors="replace") as f:
            f.seek(0, os.SEEK_END)
            while True:
                line = f.readline()
                if line:
                    print(line, end="")
                else:
                    time.sleep(0.3)
    return 0


def cmd_demo(args) -> int:
    from nlpfleet import local_demo

    return local_demo.main(args.demo_args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nlpfleet", description=__doc__.splitlines()[0])
    ap.add_argument("--api-url", help="control plane API (default: the local stack's)")
    ap.add_argument("--region", default=None)
    ap.add_argument(
        "--sigv4", action=argparse.BooleanOptionalAction, default=None, help="sign requests (IAM auth)"
    )
    ap.add_argument(
        "--state-dir", help="local stack state (default ~/.nlpfleet/local or $NLPFLEET_LOCAL_DIR)"
    )
    ap.add_argument("--json", action="store_true", help="print raw JSON")
    sub = ap.add_subparsers(dest="command", required=True)
    # --json is accepted before or after the command
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print raw JSON")
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[common], **k)  # type: ignore[method-assign]

    p = sub.add_parser("up", help="start the local stack in the background")
    p.add_argument("--speed", type=float, default=1.0, help="local clock speed (schedules), x real time")
    p.add_argument("--max-size", type=int, default=0, help="inference group ceiling (InferenceMaxSize)")
    p.add_argument("--env", action="append", help="KEY=VALUE override of the handlers' environment")
    p.add_argument("--timeout", type=float, default=120)
    p.set_defaults(fn=cmd_up)

    p = sub.add_parser("down", help="stop the local stack and every local instance")
    p.add_argument("--timeout", type=float, default=90)
    p.set_defaults(fn=cmd_down)

    for name, fn, helptext in (("submit", cmd_submit, "submit a job"), ("plan", cmd_plan, "plan a job")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("spec", nargs="?", help="job spec JSON file")
        p.add_argument("--set", action="append", help="KEY=VALUE spec field (JSON value or string)")
        if name == "submit":
            p.add_argument("--idempotency-key")
        p.set_defaults(fn=fn)

    p = sub.add_parser("upload", help="upload a dataset under datasets/ (creates a job)")
    p.add_argument("path")
    p.add_argument("--prefix", required=True, help="e.g. datasets/banking77")
    p.add_argument("--spec", help="job spec JSON (uploaded as the training file's .job.json sidecar)")
    p.add_argument("--set", action="append", help="KEY=VALUE spec field")
    p.add_argument("--train-file", default="train.csv")
    p.add_argument("--eval-file", default="dev.csv")
    p.add_argument("--bucket")
    p.set_defaults(fn=cmd_upload)

    p = sub.add_parser("status", help="jobs, or one job")
    p.add_argument("job_id", nargs="?")
    p.add_argument("--watch", action="store_true", help="follow until the job ends (progress bar)")
    p.add_argument("--interval", type=float, default=2.0)
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")
    p.set_defaults(fn=cmd_cancel)

    sub.add_parser("fleet", help="the inference fleet").set_defaults(fn=cmd_fleet)
    sub.add_parser("models", help="published models").set_defaults(fn=cmd_models)

    p = sub.add_parser("logs", help="stack log, or an instance's console (instance or job id)")
    p.add_argument("target", nargs="?")
    p.add_argument("-n", "--tail", type=int, default=50)
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(fn=cmd_logs)

    p = sub.add_parser("demo", help="the whole product end to end on this machine")
    p.add_argument("demo_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except CliError as exc:
        print(f"nlpfleet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
