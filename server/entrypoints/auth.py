"""`--api_key`: every route requires `Authorization: Bearer <key>`, except an explicit list.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which wraps `receive` and gets
in the way of disconnect detection and streaming). The open list matches whole paths
exactly, so `/health` is open but `/healthz`, `/health/../generate` or `/health_generate`
are not. The key is compared with `hmac.compare_digest`, in constant time.
"""
from __future__ import annotations

import hmac
import json


class ApiKeyMiddleware:
    def __init__(self, app, api_key: str, open_paths: set[str]):
        self.app, self.key, self.open_paths = app, api_key.encode(), set(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._authorized(scope):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": "invalid or missing API key (Authorization: Bearer <key>)",
                                     "type": "AuthenticationError", "param": None, "code": 401}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False
