"""What may reach the app at all: checks on every HTTP request before any route runs.

    GuardMiddleware (ASGI)   Host allow-list (DNS rebinding), cross-site browser requests,
                             JSON-only POST bodies (415), declared body size (413)
    HeaderTimeoutH11Protocol uvicorn's h11 protocol, plus a deadline for a request's headers

Why each check exists:
- A web page cannot read our answers (we send no CORS headers), but it can *send* "simple"
  requests: a `text/plain` or form POST, or a GET from an <img>. So POST bodies must be JSON
  (a browser needs a CORS preflight for that, which we never grant), and a request a browser
  marks as cross-site (`Sec-Fetch-Site`, `Origin`) is refused.
- DNS rebinding points an attacker's name at 127.0.0.1; the browser then sends
  `Host: evil.example`. Bound to loopback, only localhost names are accepted.
- A declared `Content-Length` over the limit is refused before a byte of the body is read;
  chunked bodies are counted while they are read (`http_utils.read_json`).
- uvicorn closes idle keep-alive connections, but waits forever for a client that trickles
  its headers one byte at a time; `HeaderTimeoutH11Protocol` closes those.
"""
from __future__ import annotations

import ipaddress
import json
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
JSON_ERROR_TYPES = {400: "BadRequestError", 403: "PermissionDenied", 413: "PayloadTooLarge",
                    415: "UnsupportedMediaType"}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str, allowed: list[str] | None) -> set[str] | None:
    """The Host names to accept; None means any (bound to a public interface, no list given)."""
    if allowed:
        return None if "*" in allowed else {h.lower().rstrip(".") for h in allowed}
    if is_loopback(bind_host):
        return LOOPBACK_NAMES | {bind_host.lower()}
    log.warning("bound to %s with no --allowed_hosts: any Host header is accepted", bind_host)
    return None


def host_name(value: str) -> str:
    """'localhost:30000' -> 'localhost', '[::1]:30000' -> '::1' (lower case, no trailing dot)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0].rstrip(".") if value.count(":") == 1 else value.rstrip(".")


class GuardMiddleware:
    def __init__(self, app, allowed_hosts: set[str] | None, max_body_bytes: int):
        self.app, self.allowed, self.max_body = app, allowed_hosts, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.check(scope["method"], {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]})
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message = refusal
        body = json.dumps({"error": {"message": message, "type": JSON_ERROR_TYPES[status], "param": None,
                                     "code": status}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def check(self, method: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """(status, message) for a request to refuse, else None."""
        if self.allowed is not None and host_name(headers.get("host", "")) not in self.allowed:
            return 400, "invalid Host header (start the server with --allowed_hosts to accept this name)"
        if headers.get("sec-fetch-site") == "cross-site":
            return 403, "cross-site browser requests are not accepted"
        origin = headers.get("origin")          # "null" (a sandboxed frame) has no host: refused
        if origin is not None and self.allowed is not None and host_name(origin.partition("://")[2]) not in self.allowed:
            return 403, f"requests from origin {origin!r} are not accepted"
        if method != "POST":
            return None
        length = headers.get("content-length")
        has_body = "transfer-encoding" in headers or (length not in (None, "0"))
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if has_body and not (media == "application/json" or media.endswith("+json")):
            return 415, "POST bodies must be JSON: send 'Content-Type: application/json'"
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return 413, f"the request body is {length} bytes; the limit is {self.max_body} (--max_request_bytes)"
        return None


class HeaderTimeoutH11Protocol(H11Protocol):
    """Closes a connection whose next request's headers have not arrived within `header_timeout`
    seconds of it opening (or of the previous response), however slowly bytes trickle in."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._waiting_cycle = self.cycle          # a new cycle object means the headers arrived
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not self._waiting_cycle:
            self._disarm()

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()
        # Re-arm for the next request, unless a pipelined one already started in super().
        if not self.transport.is_closing() and self.cycle is finished:
            self._disarm()
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.debug("closing a connection that sent no complete request headers in %.0f s", self.header_timeout)
            self.transport.close()
