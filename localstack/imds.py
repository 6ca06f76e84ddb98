"""Instance metadata (IMDSv2) for the local instances, on loopback.

One server answers for every local instance; each instance gets its own base URL
``http://127.0.0.1:<port>/<instance-id>`` (in ``NLPFLEET_IMDS_URL``), under which the paths are
EC2's:

- ``PUT /latest/api/token`` (header ``X-aws-ec2-metadata-token-ttl-seconds``, 1-21600) → a token;
  every GET must carry it in ``X-aws-ec2-metadata-token`` or gets 401, as with
  ``HttpTokens: required`` (what the launch templates set);
- ``/latest/meta-data/instance-id``, ``instance-type``, ``placement/region``,
  ``placement/availability-zone``, ``ami-id``;
- ``/latest/user-data`` (the instance's user data as the local stack hands it over);
- ``/latest/meta-data/autoscaling/target-lifecycle-state``: what Auto Scaling intends for the
  instance (``InService`` / ``Terminated``), from the lifecycle stand-in; 404 outside a group;
- ``/latest/meta-data/spot/instance-action``: 404 until a spot interruption is announced
  (``announce_spot_interruption``), then ``{"action": "terminate", "time": ...}``.

Anything else is 404, as on EC2.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Imds:
    def __init__(
        self,
        describe: Callable[[str], dict | None],
        target_state: Callable[[str], str | None],
        host: str = "127.0.0.1",
    ):
        """``describe(instance_id)`` returns ``{"instance_type", "region", "az", "ami_id",
        "user_data"}`` or None for an unknown instance; ``target_state(instance_id)`` the
        Auto Scaling target lifecycle state."""
        self._describe = describe
        self._target_state = target_state
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (instance id, expiry)
        self._spot: dict[str, dict] = {}
        self._lock = threading.Lock()
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _split(self) -> tuple[str, str]:
                parts = self.path.split("?")[0].strip("/").split("/", 1)
                return parts[0], (parts[1] if len(parts) > 1 else "")

            def do_PUT(self):
                iid, path = self._split()
                if path != "latest/api/token" or imds._describe(iid) is None:
                    return self._reply(404)
                try:
                    ttl = int(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
                except ValueError:
                    return self._reply(400)
                if not 1 <= ttl <= 21600:
                    return self._reply(400)
                token = secrets.token_urlsafe(32)
                with imds._lock:
                    imds._tokens[token] = (iid, time.monotonic() + ttl)
                self._reply(200, token)

            def do_GET(self):
                iid, path = self._split()
                info = imds._describe(iid)
                if info is None:
                    return self._reply(404)
                with imds._lock:
                    owner, expiry = imds._tokens.get(
                        self.headers.get("X-aws-ec2-metadata-token", ""), ("", 0)
                    )
                if owner != iid or time.monotonic() > expiry:
                    return self._reply(401)
                value = imds.value(iid, info, path)
                self._reply(200, value) if value is not None else self._reply(404)

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def value(self, iid: str, info: dict, path: str) -> str | None:
        md = {
            "latest/meta-data/instance-id": iid,
            "latest/meta-data/instance-type": info.get("instance_type"),
            "latest/meta-data/ami-id": info.get("ami_id"),
            "latest/meta-data/placement/region": info.get("region"),
            "latest/meta-data/placement/availability-zone": info.get("az"),
            "latest/user-data": info.get("user_data"),
        }
        if path in md:
            return md[path]
        if path == "latest/meta-data/autoscaling/target-lifecycle-state":
            return self._target_state(iid)
        if path == "latest/meta-data/spot/instance-action":
            action = self._spot.get(iid)
            return json.dumps(action) if action else None
        return None

    def base_url(self, instance_id: str) -> str:
        return f"{self.url}/{instance_id}"

    def announce_spot_interruption(self, instance_id: str, in_s: float = 120.0) -> None:
        when = datetime.fromtimestamp(time.time() + in_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._spot[instance_id] = {"action": "terminate", "time": when}

    def start(self) -> Imds:
        self._thread = threading.Thread(target=self._server.serve_forever, name="imds", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
