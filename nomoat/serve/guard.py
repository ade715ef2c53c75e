"""What stands in front of the app: the API key, the body size limit and request counting, as ASGI middleware,
and the JSON error response it and the routes send.

Not here: the routes and their checks of a request's fields (app.py), OpenAI's body formats (protocol.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse

from nomoat.serve.metrics import Metrics
from nomoat.serve.protocol import error_body

MAX_BODY_BYTES = 1 << 20
OPEN_PATHS = ("/", "/health")  # the page holds no data and asks for the key itself; probes need no key


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


class Guard:
    """ASGI middleware in front of everything: the API key, the body size limit and request counting.

    The body is read here, up to the limit, and replayed to the app; later reads go to the client again, so that
    a disconnect still reaches the handlers."""

    def __init__(self, app: Any, api_key: str | None, max_body: int, metrics: Metrics, paths: set[str]) -> None:
        self.app, self.api_key, self.max_body, self.metrics, self.paths = app, api_key, max_body, metrics, paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.paths else "other"

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_request(endpoint, message["status"])
            await send(message)

        async def reply(status: int, message: str, code: str | None = None) -> None:
            await error_response(status, message, code=code)(scope, receive, counted_send)

        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return await reply(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key")
        too_big = f"the request body is over {self.max_body} bytes"
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body:
            return await reply(413, too_big)
        body, more = bytearray(), True
        while more:  # the declared length may be absent (chunked) or a lie, so count what arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await reply(413, too_big)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, counted_send)
