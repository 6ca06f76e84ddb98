"""The inference server over real HTTP, serving a real exported model.

Three in-process servers (uvicorn in a thread, the production app and settings path): the main
one, a strict one (reject over-long texts, two requests in flight at most) and one pointed at a
corrupt artifact. Shutdown under load needs a real process and a real SIGTERM: see
``test_server_drain.py``.
"""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from inference.runtime import load_classifier
from inference.serve_settings import Settings
from inference.server import create_app, prune_model_cache


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(env: dict, *, host: str = "127.0.0.1", wait_ready: bool = True, s3_client=None):
    port = free_port()
    settings = Settings.from_env(
        {"NLPFLEET_HOST": host, "NLPFLEET_PORT": str(port), "NLPFLEET_WARMUP_ROUNDS": "1", **env}
    )
    app = create_app(settings, s3_client=s3_client)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            r = httpx.get(base + ("/readyz" if wait_ready else "/healthz"), timeout=5)
            if r.status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"server did not become ready: {r.text if 'r' in dir() else 'no answer'}")
        time.sleep(0.2)
    try:
        yield base, app, port
    finally:
        server.should_exit = True
        thread.join(30)


def link_copy(src: Path, dst: Path, *, version: str | None = None, copy: tuple[str, ...] = ()) -> Path:
    """A copy of an artifact: big files symlinked, ``copy`` files and the manifest copied."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "manifest.json" or f.name in copy or f.suffix != ".onnx":
            shutil.copy(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f.resolve())
    if version:
        m = json.loads((dst / "manifest.json").read_text())
        m["version"] = version
        (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.fixture(scope="module")
def artifact(trained_artifact) -> Path:
    return Path(trained_artifact)


@pytest.fixture(scope="module")
def dev_texts(data_dir) -> list[tuple[str, str]]:
    with open(data_dir / "banking77" / "dev.csv", newline="") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def server(artifact):
    env = {"NLPFLEET_MODEL": str(artifact), "NLPFLEET_MAX_TOKENS_PER_TEXT": "48", "NLPFLEET_MAX_WAIT_MS": "2"}
    with running_server(env) as s:
        yield s


@pytest.fixture(scope="module")
def strict(artifact):
    env = {
        "NLPFLEET_MODEL": str(artifact),
        "NLPFLEET_MAX_TOKENS_PER_TEXT": "16",
        "NLPFLEET_TOKEN_OVERFLOW": "reject",
        "NLPFLEET_MAX_INFLIGHT_REQUESTS": "2",
        "NLPFLEET_MAX_TEXTS_PER_REQUEST": "64",
        "NLPFLEET_BATCH_RUN_OVERHEAD_TOKENS": "20",
    }
    with running_server(env) as s:
        yield s


async def load(base: str, texts: list[str], *, workers: int, until, per_request: int = 1, record=None):
    """Closed-loop load: ``workers`` clients sending until ``until()`` is true. Returns
    ``[(start, end, status or exception name, body)]``."""
    out = []

    async def worker(i: int, client: httpx.AsyncClient):
        n = i
        while not until():
            batch = [texts[(n + j) % len(texts)] for j in range(per_request)]
            n += workers
            t0 = time.monotonic()
            try:
                r = await client.post(base + "/v1/classify", json={"inputs": batch})
                out.append((t0, time.monotonic(), r.status_code, r.json()))
            except httpx.TransportError as e:
                out.append((t0, time.monotonic(), type(e).__name__, None))

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=workers)) as client:
        await asyncio.gather(*(worker(i, client) for i in range(workers)))
    return out


# ---- endpoints --------------------------------------------------------------------------------


def test_classify_matches_the_library_and_predicts_banking77(server, artifact, dev_texts):
    base, _, _ = server
    sample = dev_texts[::40][:48]
    texts = [t for t, _ in sample]
    r = httpx.post(base + "/v1/classify", json={"inputs": texts, "top_k": 3}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert body["model"] == {"name": manifest["name"], "version": manifest["version"]}
    results = body["results"]
    assert len(results) == len(texts)
    for res in results:
        assert res["label"] in manifest["labels"] and 0 < res["score"] <= 1
        assert [p["label"] for p in res["top_k"]][0] == res["label"] and len(res["top_k"]) == 3
        assert res["top_k"][0]["score"] >= res["top_k"][1]["score"] >= res["top_k"][2]["score"]
    # Same answers as the library the batch jobs use (batching and padding change nothing).
    ref = load_classifier(artifact, max_tokens_per_text=48).classify(texts, top_k=3)
    assert [x["label"] for x in results] == [x["label"] for x in ref]
    assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(results, ref, strict=True))
    # A fine-tuned model, far above chance (1/77) on dev questions it never saw.
    accuracy = sum(res["label"] == y for res, (_, y) in zip(results, sample, strict=True)) / len(sample)
    assert accuracy >= 0.15, accuracy


def test_health_readiness_model_and_openapi(server):
    base, _, _ = server
    assert httpx.get(base + "/healthz").json() == {"status": "alive"}
    assert httpx.get(base + "/readyz").status_code == 200
    info = httpx.get(base + "/v1/model").json()
    assert info["provider"] == "CPUExecutionProvider" and info["variant"] in ("int8", "fp32")
    assert info["providers"][0] == info["provider"]
    assert info["manifest"]["variants"][info["variant"]]["published"] is True
    # The server's limit never exceeds what the model was exported for.
    assert info["limits"]["max_tokens_per_text"] == min(48, info["manifest"]["max_seq_len"])
    assert info["limits"]["token_overflow"] == "truncate"
    # The batcher weighs a run's fixed cost against padding with what it measured on this model.
    b = info["batching"]
    assert b["run_overhead_tokens"] > 0 and b["run_overhead_source"].startswith("measured: "), b
    spec = httpx.get(base + "/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/v1/classify" in spec["paths"]
    assert {"400", "413", "422", "429", "500", "503"} <= set(
        spec["paths"]["/v1/classify"]["post"]["responses"]
    )


def test_metrics_in_prometheus_format_with_the_names_the_fleet_reads(server):
    base, _, _ = server
    httpx.post(base + "/v1/classify", json={"inputs": ["card not working", "exchange rate"]})
    httpx.post(base + "/v1/classify", json={"inputs": []})
    text = httpx.get(base + "/metrics").text
    for name in (
        "nlpfleet_inflight_requests",
        "nlpfleet_queue_depth",
        'nlpfleet_requests_total{code="200"}',
        'nlpfleet_requests_total{code="400"}',
        'nlpfleet_errors_total{kind="empty"}',
        "nlpfleet_request_latency_seconds_bucket",
        "nlpfleet_batch_size_bucket",
        "nlpfleet_batch_padded_tokens_bucket",
        "nlpfleet_ready 1.0",
        "nlpfleet_model_info{",
    ):
        assert name in text, name
    texts = [line for line in text.splitlines() if line.startswith("nlpfleet_texts_total")]
    assert float(texts[0].split()[-1]) >= 2

    def value(series: str) -> float:
        return next(float(x.split()[-1]) for x in text.splitlines() if x.startswith(series + " "))

    # What the model runs cost against what the whole process cost: both counted, the part
    # no larger than the whole.
    model_cpu, process_cpu = value("nlpfleet_model_cpu_seconds_total"), value("process_cpu_seconds_total")
    assert 0 < model_cpu <= process_cpu


@pytest.mark.parametrize(
    "body, status, kind",
    [
        (b"", 400, "empty"),
        (b"{oops", 400, "malformed"),
        (b'{"inputs": []}', 400, "empty"),
        (b'{"inputs": [""]}', 400, "empty"),
        (json.dumps({"inputs": ["hi"] * 65}).encode(), 413, "too_large"),
        (json.dumps({"inputs": ["x" * 2001]}).encode(), 413, "too_large"),
        (b'{"inputs": [1]}', 422, "invalid"),
        (b'{"input": ["hi"]}', 422, "invalid"),
        (b'{"inputs": ["hi"], "top_k": 1000}', 422, "invalid"),
    ],
)
def test_error_statuses_name_the_problem(server, body, status, kind):
    base, _, _ = server
    r = httpx.post(base + "/v1/classify", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert r.json()["error"]["kind"] == kind and r.json()["error"]["message"]


def test_unknown_paths_and_methods_get_json_errors_too(server):
    base, _, _ = server
    r = httpx.get(base + "/v2/classify")
    assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found"
    r = httpx.get(base + "/v1/classify")
    assert r.status_code == 405 and r.json()["error"]["kind"] == "method_not_allowed"


def test_oversized_body_is_refused_before_it_is_read(server):
    base, _, _ = server
    r = httpx.post(base + "/v1/classify", content=b"x" * 1_000_000)
    assert r.status_code == 413 and r.json()["error"]["kind"] == "too_large"

    def chunked():  # no Content-Length: the cap applies while streaming
        for _ in range(100):
            yield b"x" * 10_000

    r = httpx.post(base + "/v1/classify", content=chunked())
    assert r.status_code == 413 and r.json()["error"]["kind"] == "too_large"


def test_long_texts_are_truncated_and_say_so(server):
    base, _, _ = server
    long = "my card payment was declined at the shop " * 30
    r = httpx.post(base + "/v1/classify", json={"inputs": ["hello", long]}).json()["results"]
    assert [x["truncated"] for x in r] == [False, True]


def test_long_texts_are_rejected_when_configured(strict):
    base, _, _ = strict
    r = httpx.post(base + "/v1/classify", json={"inputs": ["ok", "why was my card declined " * 10]})
    assert r.status_code == 413 and r.json()["error"]["kind"] == "too_large"
    assert "[1]" in r.json()["error"]["message"]
    assert httpx.post(base + "/v1/classify", json={"inputs": ["ok"]}).status_code == 200
    b = httpx.get(base + "/v1/model").json()["batching"]
    assert (b["run_overhead_tokens"], b["run_overhead_source"]) == (20, "configured")


def test_overload_is_refused_at_once_with_429(strict, dev_texts):
    base, _, _ = strict
    texts = [t for t, _ in dev_texts if len(t.split()) <= 8][:64]  # within the 16-token limit

    async def burst():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=40)) as c:

            async def one():
                t0 = time.monotonic()
                r = await c.post(base + "/v1/classify", json={"inputs": texts})
                return r.status_code, r.json(), time.monotonic() - t0

            return await asyncio.gather(*(one() for _ in range(24)))

    res = asyncio.run(burst())
    codes = [c for c, _, _ in res]
    assert set(codes) <= {200, 429} and codes.count(429) >= 10 and codes.count(200) >= 2, codes
    assert all(b["error"]["kind"] == "overloaded" for c, b, _ in res if c == 429)
    refused = sorted(t for c, _, t in res if c == 429)
    served = sorted(t for c, _, t in res if c == 200)
    assert refused[len(refused) // 2] < served[len(served) // 2], "429 must not wait for capacity"
    metrics = httpx.get(base + "/metrics").text
    assert 'nlpfleet_requests_total{code="429"}' in metrics


def test_backend_failure_is_a_500_for_the_batch_and_the_server_recovers(server, monkeypatch):
    base, app, _ = server
    model = app.state.server_state.model

    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(model, "predict_padded", broken)
    r = httpx.post(base + "/v1/classify", json={"inputs": ["top up failed"]})
    assert r.status_code == 500
    assert r.json()["error"]["kind"] == "backend" and "illegal memory access" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert httpx.post(base + "/v1/classify", json={"inputs": ["top up failed"]}).status_code == 200


def test_corrupt_artifact_never_becomes_ready(artifact, tmp_path):
    bad = link_copy(artifact, tmp_path / "bad", copy=("labels.json",))
    labels = json.loads((bad / "labels.json").read_text())
    (bad / "labels.json").write_text(json.dumps(labels[::-1]))  # same schema, wrong meaning
    with running_server({"NLPFLEET_MODEL": str(bad)}, wait_ready=False) as (base, _, _):
        deadline = time.monotonic() + 30
        while "sha256" not in (r := httpx.get(base + "/readyz")).text and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 503 and r.json()["error"]["kind"] == "not_ready"
        assert "labels.json" in r.json()["error"]["message"] and "sha256" in r.json()["error"]["message"]
        c = httpx.post(base + "/v1/classify", json={"inputs": ["hi"]})
        assert c.status_code == 503 and c.json()["error"]["kind"] == "not_ready"
        assert httpx.get(base + "/healthz").status_code == 200


# ---- hot swap -------------------------------------------------------------------------------


def test_swap_is_loopback_only(server):
    """The client address is what the ASGI server reports; it is set in the request scope here, so
    no traffic leaves loopback (this machine's other addresses are not ours to send to)."""
    app = server[1]

    async def swap_from(host: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=(host, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://instance") as c:
            return await c.post("/admin/swap", json={"uri": "/nonexistent/artifact"})

    r = asyncio.run(swap_from("203.0.113.7"))
    assert r.status_code == 403 and r.json()["error"]["kind"] == "forbidden"
    # From loopback the same request is heard, and refused for what it asks (no such artifact).
    r = asyncio.run(swap_from("127.0.0.1"))
    assert r.status_code == 422 and r.json()["error"]["kind"] == "invalid"


def test_swap_refuses_a_corrupt_artifact_and_keeps_serving(server, artifact, tmp_path):
    base, _, _ = server
    before = httpx.get(base + "/v1/model").json()
    bad = link_copy(
        artifact,
        tmp_path / "bad",
        version="corrupt",
        copy=(before["manifest"]["variants"][before["variant"]]["file"],),
    )
    f = bad / before["manifest"]["variants"][before["variant"]]["file"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    r = httpx.post(base + "/admin/swap", json={"uri": str(bad)}, timeout=120)
    assert r.status_code == 422 and r.json()["error"]["kind"] == "invalid"
    assert f.name in r.json()["error"]["message"] and "sha256" in r.json()["error"]["message"]
    assert httpx.get(base + "/v1/model").json()["version"] == before["version"]
    assert httpx.post(base + "/v1/classify", json={"inputs": ["hi"]}).status_code == 200
    # Two swaps at once: the second is refused while the first loads.
    same = link_copy(artifact, tmp_path / "same", version=before["version"])

    async def two_swaps():
        async with httpx.AsyncClient(timeout=120) as c:
            first = asyncio.create_task(c.post(base + "/admin/swap", json={"uri": str(same)}))
            await asyncio.sleep(0.2)
            second = await c.post(base + "/admin/swap", json={"uri": str(same)})
            return (await first).status_code, second

    first, second = asyncio.run(two_swaps())
    assert first == 200 and second.status_code == 409 and second.json()["error"]["kind"] == "conflict"
    # A mismatching manifest hash (the rollout named another manifest) is refused too.
    good = link_copy(artifact, tmp_path / "good", version="other")
    r = httpx.post(base + "/admin/swap", json={"uri": str(good), "manifest_sha256": "0" * 64}, timeout=120)
    assert r.status_code == 422 and "manifest sha256" in r.json()["error"]["message"]
    assert httpx.get(base + "/v1/model").json()["version"] == before["version"]


def test_hot_swap_under_load_fails_no_request(server, artifact, dev_texts, tmp_path):
    base, _, _ = server
    old = httpx.get(base + "/v1/model").json()["version"]
    new_dir = link_copy(artifact, tmp_path / "v2", version="swapped-v2")
    texts = [t for t, _ in dev_texts[:200]]
    swap: dict = {}

    async def scenario():
        start = time.monotonic()

        async def do_swap():
            await asyncio.sleep(1.0)
            async with httpx.AsyncClient(timeout=120) as c:
                swap["t0"] = time.monotonic()
                swap["r"] = await c.post(base + "/admin/swap", json={"uri": str(new_dir)})
                swap["t1"] = time.monotonic()

        results, _ = await asyncio.gather(
            load(base, texts, workers=4, until=lambda: "t1" in swap and time.monotonic() > swap["t1"] + 1.0
                 or time.monotonic() - start > 90),
            do_swap(),
        )  # fmt: skip
        return results

    results = asyncio.run(scenario())
    assert swap["r"].status_code == 200, swap["r"].text
    statuses = [s for _, _, s, _ in results]
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    versions = [b["model"]["version"] for _, _, _, b in results]
    assert old in versions and "swapped-v2" in versions
    # Every request sent after the swap answered is served by the new model.
    assert all(b["model"]["version"] == "swapped-v2" for t0, _, _, b in results if t0 > swap["t1"])
    assert httpx.get(base + "/v1/model").json()["version"] == "swapped-v2"


# ---- s3:// artifacts ------------------------------------------------------------------------


def test_serves_an_s3_artifact_and_refuses_a_tampered_one(artifact, tmp_path):
    """The path an instance takes: the model named by an s3:// URI, fetched and verified."""
    import boto3
    from moto import mock_aws

    from inference.artifact import publish_artifact

    # Only the fp32 variant travels (the others marked unpublished): the test moves less data.
    small = link_copy(artifact, tmp_path / "v1")
    m = json.loads((small / "manifest.json").read_text())
    for name, v in m["variants"].items():
        v["published"] = name == "fp32"
    (small / "manifest.json").write_text(json.dumps(m))
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="models")
        publish_artifact(small, "s3://models/models/banking77/v1/", s3)
        # v2: the same files copied inside S3, then a manifest naming version v2.
        for obj in s3.list_objects_v2(Bucket="models", Prefix="models/banking77/v1/")["Contents"]:
            key = obj["Key"].replace("/v1/", "/v2/")
            s3.copy_object(Bucket="models", Key=key, CopySource={"Bucket": "models", "Key": obj["Key"]})
        s3.put_object(
            Bucket="models", Key="models/banking77/v2/manifest.json", Body=json.dumps({**m, "version": "v2"})
        )
        env = {
            "NLPFLEET_MODEL": "s3://models/models/banking77/v1/",
            "NLPFLEET_MODEL_CACHE_DIR": str(tmp_path / "cache"),
        }
        with running_server(env, s3_client=s3) as (base, _, _):
            r = httpx.post(base + "/v1/classify", json={"inputs": ["my card was stolen"]})
            assert r.status_code == 200
            # Tampered after publication: the fetch verifies and the swap is refused.
            s3.put_object(Bucket="models", Key="models/banking77/v2/labels.json", Body=b'["a", "b"]')
            r = httpx.post(
                base + "/admin/swap", json={"uri": "s3://models/models/banking77/v2/"}, timeout=120
            )
            assert r.status_code == 422 and "labels.json" in r.json()["error"]["message"]
            assert httpx.get(base + "/v1/model").json()["manifest"]["version"] != "v2"
            assert httpx.post(base + "/v1/classify", json={"inputs": ["hi"]}).status_code == 200


def test_model_cache_keeps_the_model_in_use_and_the_previous_one(tmp_path):
    cache = tmp_path / "cache"
    dirs = {v: cache / f"models_m_{v}" for v in ("v1", "v2", "v3", "v4", "other")}
    for d in dirs.values():
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(b"x")
    fetched = {dirs[v] for v in ("v1", "v2", "v3", "v4")}  # "other": not downloaded by this process
    removed = prune_model_cache(fetched, [dirs["v4"], dirs["v3"]])
    assert sorted(p.name for p in removed) == ["models_m_v1", "models_m_v2"]
    assert sorted(p.name for p in cache.iterdir()) == ["models_m_other", "models_m_v3", "models_m_v4"]
    assert fetched == {dirs["v3"], dirs["v4"]}
