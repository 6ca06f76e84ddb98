"""Error kinds of the inference server and the one table that maps them to HTTP statuses.

Every failure the server reports is a ``ServeError`` with a ``kind``; the HTTP layer turns it
into ``{"error": {"kind", "message"}}`` with the status from ``STATUS_BY_KIND``. Bad input is
always a 4xx: a 500 means the backend (the model) failed, never that a client sent junk.

Example::

    >>> e = ServeError("too_large", "64 texts per request at most, got 65")
    >>> e.status, e.body()["error"]["kind"]
    (413, 'too_large')
"""

from __future__ import annotations

STATUS_BY_KIND: dict[str, int] = {
    "empty": 400,  # no body, no inputs, an empty text
    "malformed": 400,  # not JSON, not a JSON object
    "forbidden": 403,  # admin endpoint called from outside loopback
    "not_found": 404,  # no such path
    "method_not_allowed": 405,
    "conflict": 409,  # a hot swap is already in progress
    "too_large": 413,  # too many texts, too many characters or tokens (when rejecting)
    "invalid": 422,  # well-formed JSON with wrong types or values
    "overloaded": 429,  # admission limit reached: refused at once
    "backend": 500,  # the model failed on a batch
    "not_ready": 503,  # model not loaded or not warmed up yet
    "draining": 503,  # SIGTERM received: finishing in-flight work, taking no new work
}


class ServeError(Exception):
    """A failure with a kind from ``STATUS_BY_KIND`` and a message naming the problem."""

    def __init__(self, kind: str, message: str):
        if kind not in STATUS_BY_KIND:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def status(self) -> int:
        return STATUS_BY_KIND[self.kind]

    def body(self) -> dict:
        return {"error": {"kind": self.kind, "message": self.message}}
