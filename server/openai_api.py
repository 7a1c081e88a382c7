"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Both generation routes reuse the native pipeline: a body becomes a GenerateBatch (prompt i's
n samples are choices i*n .. i*n+n-1), the TokenizerManager runs it, and a `Reply` reshapes
the cumulative results into OpenAI objects. Streams send deltas (cumulative text minus what
was sent; the detokenizer never takes text back, so this is safe), the finish_reason with
the last delta, a usage chunk when `stream_options.include_usage`, then `data: [DONE]`.
Chat prompts come from the tokenizer's own chat template (add_generation_prompt=True).
"""
from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from server.http_utils import gather, last, merge, read_json, sse_stream, until_disconnect
from server.openai_protocol import chat_messages, chat_params, completion_params, completion_prompts, get
from server.openai_reply import ChatReply, CompletionReply, usage
from server.tokenizer_manager import TokenizerManager
from server.validation import BadRequest, GenerateBatch, check_ids

BIG_CHAT_CHARS = 4096       # render long conversations in a worker thread


def served_model_name(server_args, info: dict) -> str:
    # "demo" is not a path a client can load a tokenizer from; its real directory is.
    if server_args.served_model_name:
        return server_args.served_model_name
    return info["model_path"] if server_args.model == "demo" else server_args.model


class OpenAIRoutes:
    def __init__(self, tm: TokenizerManager, server_args):
        self.tm, self.name = tm, served_model_name(server_args, tm.info)
        self.accepted = {self.name, server_args.model, tm.info["model_path"]}

    async def body(self, request: Request) -> dict:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model not in self.accepted:
            raise BadRequest(f"model: {model!r} is not served here; this server serves {self.name!r}")
        return body

    async def completions(self, request: Request):
        body = await self.body(request)
        params = completion_params(body, self.tm.vocab_size)
        prompts = [p if isinstance(p, str) else check_ids(p, self.tm.vocab_size, "prompt")
                   for p in completion_prompts(body)]
        echo = [(p if isinstance(p, str) else self.tm.tokenizer.decode(p)) if get(body, "echo", bool) else ""
                for p in prompts]
        reply = CompletionReply(self.name, params.n, self.tm.tokenizer, get(body, "logprobs", int) is not None, echo)
        return await self.run(request, body, prompts, params, reply)

    async def chat(self, request: Request):
        body = await self.body(request)
        messages = chat_messages(body)
        kwargs = get(body, "chat_template_kwargs", dict, {})     # e.g. Qwen3's enable_thinking
        ids = await self.apply_template(messages, kwargs)
        params = chat_params(body, self.tm.vocab_size, len(ids), self.tm.context_length)
        reply = ChatReply(self.name, params.n, self.tm.tokenizer, get(body, "logprobs", bool, False))
        return await self.run(request, body, [ids], params, reply)

    async def apply_template(self, messages: list[dict], kwargs: dict) -> list[int]:
        tok = self.tm.tokenizer

        def render() -> list[int]:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
            return tok.encode(text, add_special_tokens=False)     # the template wrote the special tokens
        try:
            if sum(len(m["content"]) for m in messages) > BIG_CHAT_CHARS:
                return await asyncio.to_thread(render)
            return render()
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation is a client error
            raise BadRequest(f"messages: the chat template failed: {e}") from None

    async def run(self, request: Request, body: dict, prompts: list, params, reply):
        stream = get(body, "stream", bool, False)
        batch = GenerateBatch(prompts, [params] * len(prompts), [None] * len(prompts), is_batch=True,
                              stream=stream, return_logprob=reply.logprobs)
        inputs = await self.tm.prepare(batch)
        if not stream:
            results = await until_disconnect(request, gather(*[last(self.tm.generate(x)) for x in inputs]))
            return reply.response(results)
        include_usage = bool(get(body, "stream_options", dict, {}).get("include_usage"))
        return StreamingResponse(sse_stream(self.stream(inputs, reply, include_usage)), media_type="text/event-stream")

    async def stream(self, inputs, reply, include_usage: bool):
        latest: dict[int, dict] = {}
        async for i, result in merge([self.tm.generate(x) for x in inputs]):
            for event in reply.chunks(i, result, latest.get(i)):
                yield event
            latest[i] = result
        if include_usage:
            yield reply.envelope([], usage=usage([latest[i] for i in sorted(latest)], reply.n))


def add_routes(app: FastAPI, tm: TokenizerManager, server_args) -> None:
    routes = OpenAIRoutes(tm, server_args)
    created = int(time.time())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": routes.name, "object": "model", "created": created,
                                            "owned_by": "mini-sglang", "root": routes.name,
                                            "max_model_len": tm.context_length}]}

    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat)
