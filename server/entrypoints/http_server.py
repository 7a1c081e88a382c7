"""The FastAPI app: SGLang's native routes, the OpenAI routes, auth and error handling.

    POST /generate              text | input_ids, single | batch, stream (SSE) or JSON
    GET|POST /flush_cache       400 while requests run
    POST /abort_request         {"rid": ...} or {"abort_all": true}
    GET /health  /health_generate  /get_model_info  /get_server_info (alias /server_info)
    /v1/...                     see openai_api.py

Streaming `/generate` sends SGLang's format exactly: one `data: {json}\\n\\n` event per
update with the cumulative "text", "output_ids" and "meta_info", then `data: [DONE]\\n\\n`.
An error after the headers went out is sent inside the stream (`data: {"error": ...}`).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from server.entrypoints import openai_api
from server.entrypoints.auth import ApiKeyMiddleware
from server.entrypoints.http_guard import GuardMiddleware, default_allowed_hosts
from server.entrypoints.http_utils import (ClientGone, error_response, gather, last, merge, read_json, sse_stream,
                               until_disconnect)
from server.entrypoints.openapi_schema import install_openapi
from server.managers.tokenizer_manager import GenInput, RequestFailed, TokenizerManager
from server.validation import BadRequest, parse_generate
from stage3_scheduler.sampling_params import SamplingParams

log = logging.getLogger(__name__)
VERSION = "mini-sglang 0.1.0"


class HTTPServer(uvicorn.Server):
    """uvicorn, plus one step at shutdown: end every request in flight first, so open streams
    finish with an error event and [DONE] instead of being cut after the grace period."""

    def __init__(self, config: uvicorn.Config, tm: TokenizerManager):
        super().__init__(config)
        self.tm = tm

    async def shutdown(self, sockets=None):
        self.tm.fail_all("the server is shutting down")
        await super().shutdown(sockets)


def build_app(tm: TokenizerManager, server_args) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        tm.start()                  # the output-routing task lives on uvicorn's loop
        yield

    app = FastAPI(title="mini-sglang", version=VERSION, lifespan=lifespan)
    app.state.tm, app.state.args = tm, server_args
    tm.configure(server_args)
    app.state.max_request_bytes = tm.limits.max_request_bytes
    if server_args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=server_args.api_key, open_paths={"/health"})
    # Added last, so it runs first: a refused Host or media type never reaches auth or a route.
    hosts = default_allowed_hosts(server_args.host, server_args.allowed_hosts)
    app.add_middleware(GuardMiddleware, allowed_hosts=hosts, max_body_bytes=tm.limits.max_request_bytes)
    install_error_handlers(app)
    add_native_routes(app, tm, server_args)
    openai_api.add_routes(app, tm, server_args)
    if server_args.enable_metrics:
        add_metrics(app, tm, openai_api.served_model_name(server_args, tm.info))
    install_openapi(app, api_key=bool(server_args.api_key))
    return app


def add_metrics(app: FastAPI, tm: TokenizerManager, model_name: str) -> None:
    from server.metrics import HttpMetricsMiddleware, Metrics      # prometheus-client: only when asked for

    @app.get("/metrics")
    async def metrics():
        try:
            stats = await tm.get_stats()
        except RequestFailed:               # a stalled scheduler: still report what we know
            stats = None
        body, media_type = tm.metrics.render(stats)
        return Response(body, media_type=media_type)
    tm.metrics = Metrics(model_name, {r.path for r in app.routes if hasattr(r, "path")})
    app.add_middleware(HttpMetricsMiddleware, metrics=tm.metrics)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def bad_request(_, exc: BadRequest):
        return error_response(getattr(exc, "status", 400), str(exc))      # 400, or 413 for a size limit

    @app.exception_handler(RequestFailed)
    async def failed(_, exc: RequestFailed):
        return error_response(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)    # FastAPI says 422; SGLang/OpenAI clients expect 400
    async def invalid(_, exc: RequestValidationError):
        return error_response(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(HTTPException)              # 404 unknown route, 405 wrong method
    async def http_error(_, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), exc.headers)     # keeps 405's Allow

    @app.exception_handler(ClientGone)
    async def gone(_, exc: ClientGone):
        return Response(status_code=499)              # nobody is listening any more

    @app.exception_handler(Exception)
    async def crash(_, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


async def generate_events(tm: TokenizerManager, inputs, is_batch: bool):
    """Cumulative results as they come (with "index" in a batch); sse_stream frames them."""
    async for i, result in merge([tm.generate(x) for x in inputs]):
        if is_batch:
            result["index"] = i
        yield result


def add_native_routes(app: FastAPI, tm: TokenizerManager, server_args) -> None:
    @app.post("/generate")
    async def generate(request: Request):
        batch = parse_generate(await read_json(request), tm.vocab_size)
        inputs = await tm.prepare(batch)
        if batch.stream:
            return StreamingResponse(sse_stream(generate_events(tm, inputs, batch.is_batch)), media_type="text/event-stream")
        results = await until_disconnect(request, gather(*[last(tm.generate(x)) for x in inputs]))
        return results if batch.is_batch else results[0]

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        if not await tm.flush_cache():
            return error_response(400, "cannot flush the cache while requests are running or waiting")
        return Response("Cache flushed.\n", media_type="text/plain")

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await read_json(request)
        if not isinstance(body, dict) or not (isinstance(body.get("rid"), str) or body.get("abort_all") is True):
            raise BadRequest('send {"rid": "<request id>"} or {"abort_all": true}')
        if body.get("abort_all") is True:
            return {"aborted": [tm.states[r].inp.label or r for r in list(tm.states) if tm.abort(r)]}
        # Exactly the requests sent with this rid (and their n samples), never "<rid>-1" of another.
        return {"aborted": [body["rid"]] if tm.abort_client_rid(body["rid"]) else []}

    @app.get("/health")
    async def health():
        """200 once the scheduler answers a probe (it still steps); 503 if it is stalled or silent."""
        await tm.check_health()
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate():
        """One real token through every process: proves the pipeline is alive, not just HTTP."""
        inp = GenInput(f"health-{uuid.uuid4().hex}", [0], SamplingParams(max_new_tokens=1, temperature=0.0))
        try:
            await asyncio.wait_for(last(tm.generate(inp)), timeout=20)
        except (asyncio.TimeoutError, RequestFailed) as e:
            return error_response(503, f"generation health check failed: {type(e).__name__}")
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def model_info():
        path = tm.info["model_path"]
        return {"model_path": path, "tokenizer_path": path, "is_generation": True}

    @app.get("/get_server_info")
    @app.get("/server_info")                 # SGLang's newer name
    async def server_info():
        stats = await tm.get_stats()
        state = {"avg_spec_accept_length": None, "max_total_num_tokens": tm.pool_size, **stats}
        return {**server_args.to_dict(), **tm.info, "version": VERSION, "max_total_num_tokens": tm.pool_size,
                "internal_states": [state]}
