"""Tokenizer routes, in SGLang's shapes (also under /v1):

    POST /tokenize    {"prompt": str | [str], "add_special_tokens": true}
                   -> {"tokens": [int] | [[int]], "count": int | [int], "max_model_len": int}
    POST /detokenize  {"tokens": [int] | [[int]]}  -> {"text": str | [str]}

They run the server's own tokenizer in the main process, so a client can count tokens
before sending a request, or read ids it got back, without running the model. `model` may
be sent and must name the served model, as on the other /v1 routes. Big inputs are
tokenized in a worker thread (the event loop serves other clients meanwhile).
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request

from server.validation import BadRequest, check_ids

BIG_CHARS = 4096


def _texts(body: dict) -> tuple[list[str], bool]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt], True
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt, False
    raise BadRequest("prompt: must be a string or a non-empty list of strings")


def _id_lists(body: dict, vocab_size: int) -> tuple[list[list[int]], bool]:
    tokens = body.get("tokens")
    if isinstance(tokens, list) and tokens and all(isinstance(t, list) for t in tokens):
        return [check_ids(t, vocab_size, "tokens") for t in tokens], False
    return [check_ids(tokens, vocab_size, "tokens")], True


def add_routes(app: FastAPI, tm, routes) -> None:
    """`routes`: the OpenAI routes object, whose `body()` checks the JSON and the model name."""
    tok = tm.tokenizer

    async def run(fn, size: int):
        return await asyncio.to_thread(fn) if size > BIG_CHARS else fn()

    async def tokenize(request: Request):
        body = await routes.body(request)
        texts, single = _texts(body)
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise BadRequest("add_special_tokens: must be true or false")
        ids = await run(lambda: [tok.encode(t, add_special_tokens=special) for t in texts], sum(map(len, texts)))
        counts = [len(x) for x in ids]
        return {"tokens": ids[0] if single else ids, "count": counts[0] if single else counts,
                "max_model_len": tm.context_length}

    async def detokenize(request: Request):
        body = await routes.body(request)
        lists, single = _id_lists(body, tm.vocab_size)
        texts = await run(lambda: [tok.decode(x) for x in lists], sum(map(len, lists)))
        return {"text": texts[0] if single else texts}

    for prefix in ("", "/v1"):
        app.post(prefix + "/tokenize")(tokenize)
        app.post(prefix + "/detokenize")(detokenize)
