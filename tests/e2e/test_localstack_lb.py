"""The local load balancer routes only to registered, healthy targets, like an ALB target group."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from localstack.lb import LoadBalancer


class Backend:
    """A stand-in instance: /readyz answers 200 once ``ready`` is set; POSTs echo the name."""

    def __init__(self, name):
        self.name, self.ready, self.hits = name, False, 0
        backend = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                code = 200 if backend.ready else 503
                self.send_response(code)
                self.end_headers()

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                backend.hits += 1
                body = json.dumps({"served_by": backend.name}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kill(self):
        self.server.shutdown()
        self.server.server_close()


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def backends():
    bs = [Backend("a"), Backend("b")]
    yield bs
    for b in bs:
        try:
            b.kill()
        except Exception:
            pass


def test_traffic_follows_registration_and_health(backends):
    a, b = backends
    registered = {}
    lb = LoadBalancer(lambda: dict(registered), health_interval_s=0.05, refresh_s=0.05).start()
    try:
        post = lambda: httpx.post(lb.url + "/v1/classify", json={"texts": ["x"]}, timeout=5)  # noqa: E731
        assert post().status_code == 503  # nothing registered: what an ALB answers

        registered.update({"i-a": a.url, "i-b": b.url})
        time.sleep(0.3)
        assert post().status_code == 503  # registered but not ready: no traffic
        assert a.hits == b.hits == 0

        a.ready = True
        assert wait_for(lambda: lb.healthy_targets())
        served = {post().json()["served_by"] for _ in range(6)}
        assert served == {"a"}

        b.ready = True
        assert wait_for(lambda: len(lb.healthy_targets()) == 2)
        served = {post().json()["served_by"] for _ in range(10)}
        assert served == {"a", "b"}

        del registered["i-b"]  # deregistered (e.g. terminating): no new requests
        assert wait_for(lambda: len(lb.healthy_targets()) == 1)
        hits_b = b.hits
        assert all(post().json()["served_by"] == "a" for _ in range(5))
        assert b.hits == hits_b

        # a target that dies without deregistering: refused connections are retried elsewhere
        registered["i-b"] = b.url
        assert wait_for(lambda: len(lb.healthy_targets()) == 2)
        a.kill()
        codes = [post().status_code for _ in range(10)]
        assert codes == [200] * 10
        assert wait_for(lambda: [t.target_id for t in lb.healthy_targets()] == ["i-b"])
        status = httpx.get(lb.url + "/lb/status").json()
        assert {t["target_id"]: t["state"] for t in status["targets"]}["i-a"] == "unhealthy"
    finally:
        lb.stop()
