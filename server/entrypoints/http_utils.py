"""HTTP helpers shared by the native and OpenAI routes: errors, JSON bodies, SSE, disconnects.

Error bodies have one shape everywhere, the one OpenAI clients parse:
    {"error": {"message": "...", "type": "BadRequestError", "param": null, "code": 400}}
Non-streaming handlers run under `until_disconnect`, which cancels the work when the client
goes away (cancellation reaches the TokenizerManager generator, whose `finally` aborts the
request). Streaming responses get the same from Starlette, which cancels the body iterator
on disconnect. `gather` and `merge` run the sequences of a batch (or n samples) together,
and cancel all of them when one fails or the consumer goes away: no orphaned requests.
"""
from __future__ import annotations

import asyncio
import json
import logging

from fastapi import Request
from fastapi.responses import JSONResponse

from server.limits import Limits, PayloadTooLarge
from server.managers.tokenizer_manager import RequestFailed
from server.validation import BadRequest

log = logging.getLogger(__name__)
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDenied", 404: "NotFoundError",
               405: "MethodNotAllowed", 413: "PayloadTooLarge", 415: "UnsupportedMediaType",
               500: "InternalServerError", 503: "ServiceUnavailable"}
BODY_TIMEOUT_S = 60.0


class ClientGone(Exception):
    pass


def error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "Error"), "param": None, "code": status}}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, counted as it arrives: a chunked body has no Content-Length to refuse early."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes (--max_request_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request):
    limit = getattr(request.app.state, "max_request_bytes", Limits.max_request_bytes)
    try:                                   # a client trickling its body must not hold a task forever
        raw = await asyncio.wait_for(_read_body(request, limit), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise BadRequest(f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s") from None
    if not raw:
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
        json.dumps(body, ensure_ascii=False).encode("utf-8")    # rejects lone surrogates ("\ud800")
        return body
    # ValueError covers JSONDecodeError and integer literals over Python's 4,300-digit limit.
    except (ValueError, UnicodeError, RecursionError) as e:
        raise BadRequest(f"invalid JSON: {e}") from None


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_stream(events):
    """An SSE body from an async iterator of events: once headers are sent an error can only
    go inside the stream (`data: {"error": ...}`), and `[DONE]` always ends it."""
    try:
        async for event in events:
            yield sse(event)
    except (BadRequest, RequestFailed) as e:
        yield sse(error_body(getattr(e, "status", 400), str(e)))
    except Exception as e:  # noqa: BLE001 - a bug must not cut the stream without a word
        log.exception("stream failed")
        yield sse(error_body(500, f"internal error: {type(e).__name__}"))
    yield SSE_DONE


async def _wait_disconnect(request: Request) -> None:
    # After the body is read, the next ASGI message is http.disconnect: it arrives when the
    # client closes the connection (or after the response is complete; we cancel before).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, coro):
    """Run `coro`; if the client disconnects first, cancel it and raise ClientGone."""
    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    try:
        await work
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone either way
        pass
    raise ClientGone()


async def gather(*coros) -> list:
    """asyncio.gather that cancels the others when one fails (no orphaned requests)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


async def last(agen):
    """The final item of an async iterator (the finished result)."""
    item = None
    async for item in agen:
        pass
    return item


async def merge(gens: list):
    """Interleave several async iterators as (index, item), as items arrive.

    Closing this generator cancels the pumps, which closes every inner generator."""
    queue: asyncio.Queue = asyncio.Queue()
    DONE = object()

    async def pump(i, gen):
        try:
            async for item in gen:
                queue.put_nowait((i, item))
            queue.put_nowait((i, DONE))
        except Exception as e:  # noqa: BLE001 - surfaced to the consumer below
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
