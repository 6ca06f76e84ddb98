"""Against a real deployment the CLI signs its API calls with SigV4 for execute-api (the prod
stage's IAM authorizer); here the "deployment" is a loopback server that records the headers."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nlpfleet.cli import Api, CliError, progress_fraction


def test_requests_are_signed_for_execute_api(monkeypatch):
    seen = []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            seen.append(dict(self.headers))
            body = json.dumps({"jobs": []}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        api = Api(f"http://127.0.0.1:{srv.server_address[1]}/api", sigv4=True, region="eu-west-1")
        assert api.get("/jobs") == {"jobs": []}
    finally:
        srv.shutdown()
        srv.server_close()
    auth = seen[0]["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/execute-api/aws4_request" in auth
    assert "X-Amz-Date" in seen[0]


def test_api_errors_carry_the_status_and_reason():
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.dumps(
                {"Code": "BadRequestError", "Message": "invalid request: type: required"}
            ).encode()
            self.send_response(400)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        Api(f"http://127.0.0.1:{srv.server_address[1]}").post("/jobs", {})
        raise AssertionError("expected CliError")
    except CliError as e:
        assert "400" in str(e) and "type: required" in str(e)
    finally:
        srv.shutdown()
        srv.server_close()
    assert progress_fraction({"step": 5, "total_steps": 20}) == 0.25
    assert progress_fraction({}) is None
