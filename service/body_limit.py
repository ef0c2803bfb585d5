"""``BodyLimit``: an ASGI middleware that refuses (413) a request body over a limit by the bytes actually received.

``Content-Length`` alone is not a limit: a chunked body declares no length (issue 22: a chunked 40 MiB body was
accepted by the ledger, and the API gateway trusted the header the same way). The body is read here up to the limit,
then handed on, so no more than the limit of one request is ever held.
"""

from __future__ import annotations

import json
from collections.abc import Callable


def _json_refusal(limit: int, declared: int | None):
    detail = json.dumps({"detail": f"body over {limit} bytes; send smaller batches"}).encode()

    async def respond(scope, receive, send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(detail)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": detail})

    return respond


class BodyLimit:
    """:param limit: the most bytes a body may have, or a function of the ASGI scope giving it (per path)
    :param refusal: ``(limit, declared length or None) -> ASGI app`` answering an oversized body (default: 413 JSON)"""

    def __init__(self, app, *, limit: int | Callable[[dict], int], refusal=_json_refusal):
        self.app, self.limit, self.refusal = app, limit, refusal

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope) if callable(self.limit) else self.limit
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await self.refusal(limit, int(length))(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self.refusal(limit, None)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # the app waits for a disconnect after the body
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


__all__ = ["BodyLimit"]
