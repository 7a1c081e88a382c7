"""OpenAI-compatible routes: /v1/models[/{id}], /v1/completions, /v1/chat/completions.

Both generation routes reuse the native pipeline: a body becomes a GenerateBatch (prompt i's
n samples are choices i*n .. i*n+n-1), the TokenizerManager runs it, and a `Reply` reshapes
the cumulative results into OpenAI objects. Streams send deltas (cumulative text minus what
was sent; the detokenizer never takes text back, so this is safe), the finish_reason with
the last delta, a usage chunk when `stream_options.include_usage`, then `data: [DONE]`.
Chat prompts come from the tokenizer's own chat template (add_generation_prompt=True, or
`continue_final_message` to extend a partial assistant turn), with `tools` when the server
has a `--tool_call_parser`; `--reasoning_parser` splits the answer (see openai_reply.py).
"""
from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from server.chat_template import check_template_kwargs
from server.entrypoints import tokenize
from server.entrypoints.http_utils import error_response, gather, last, merge, read_json, sse_stream, until_disconnect
from server.entrypoints.openai_logprobs import TokenText
from server.entrypoints.openai_protocol import chat_messages, chat_params, completion_params, completion_prompts, get
from server.entrypoints.openai_reply import ChatReply, CompletionReply, usage
from server.entrypoints.openai_tools import template_tools, tool_request
from server.parsers.chat import ChatParsing
from server.parsers.reasoning import prompt_opens_reasoning
from server.managers.tokenizer_manager import NO_TOKENIZER, TokenizerManager
from server.validation import BadRequest, GenerateBatch, check_ids, rids_of


def served_model_name(server_args, info: dict) -> str:
    # "demo" is not a path a client can load a tokenizer from; its real directory is.
    if server_args.served_model_name:
        return server_args.served_model_name
    return info["model_path"] if server_args.model == "demo" else server_args.model


class OpenAIRoutes:
    def __init__(self, tm: TokenizerManager, server_args):
        self.tm, self.name = tm, served_model_name(server_args, tm.info)
        self.accepted = {self.name, server_args.model, tm.info["model_path"]}
        self.tt = TokenText(tm.tokenizer)
        self.reasoning_parser = getattr(server_args, "reasoning_parser", None)
        self.tool_call_parser = getattr(server_args, "tool_call_parser", None)
        self.cache_report = getattr(server_args, "enable_cache_report", False)

    async def body(self, request: Request) -> dict:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not (isinstance(model, str) and model in self.accepted):    # [] is unhashable
            raise BadRequest(f"The model `{model}` does not exist.")       # SGLang's (and vLLM's) words
        if self.tm.tokenizer is None:
            raise BadRequest(f"{NO_TOKENIZER}; this route needs one (use /generate with input_ids)")
        return body

    async def completions(self, request: Request):
        body = await self.body(request)
        params = completion_params(body, self.tm.vocab_size)
        prompts = [p if isinstance(p, str) else check_ids(p, self.tm.vocab_size, "prompt")
                   for p in completion_prompts(body)]
        echo = [(p if isinstance(p, str) else self.tm.tokenizer.decode(p)) if get(body, "echo", bool) else ""
                for p in prompts]
        logprobs = get(body, "logprobs", int)
        reply = CompletionReply(self.name, params.n, self.tt, logprobs is not None, echo, logprobs or 0)
        # echo + logprobs: the prompt's own logprobs first (SGLang: logprob_start_len 0)
        reply.echo_logprobs = logprobs is not None and get(body, "echo", bool, False)
        return await self.run(request, body, prompts, params, reply)

    async def chat(self, request: Request):
        body = await self.body(request)
        messages = chat_messages(body)
        kwargs = get(body, "chat_template_kwargs", dict, {})     # e.g. Qwen3's enable_thinking
        tools = tool_request(body, self.tool_call_parser)
        continue_final = get(body, "continue_final_message", bool, False)
        if continue_final and messages[-1]["role"] != "assistant":
            raise BadRequest("continue_final_message: the last message must be the assistant's partial answer")
        ids, text = await self.apply_template(messages, kwargs, tools, continue_final)
        params = chat_params(body, self.tm.vocab_size, len(ids), self.tm.context_length,
                             tools.grammar if tools else None)
        parsing = ChatParsing(reasoning=self.reasoning_parser is not None and get(body, "separate_reasoning", bool, True)
                              and kwargs.get("enable_thinking", True) is not False,
                              in_reasoning=prompt_opens_reasoning(text),
                              tool_names=tools.names if tools else None, parallel=tools is None or tools.parallel,
                              stream_reasoning=get(body, "stream_reasoning", bool, True))
        reply = ChatReply(self.name, params.n, self.tt, get(body, "logprobs", bool, False),
                          get(body, "top_logprobs", int, 0), parsing)
        return await self.run(request, body, [ids], params, reply)

    async def apply_template(self, messages: list[dict], kwargs: dict, tools=None,
                             continue_final: bool = False) -> tuple[list[int], str]:
        tok = self.tm.tokenizer
        template_list, tools_text = template_tools(tools, tok.chat_template)
        if tools_text:          # the template does not render tools: tell the model in a system turn
            if messages[0]["role"] == "system":
                messages = [{**messages[0], "content": messages[0]["content"] + "\n\n" + tools_text}, *messages[1:]]
            else:
                messages = [{"role": "system", "content": tools_text}, *messages]

        # Sizes before any work; request kwargs are template variables only, never a template.
        self.tm.limits.check_chars(sum(len(str(m.get("content") or "")) for m in messages), "the conversation")
        check_template_kwargs(kwargs)

        def render() -> tuple[list[int], str]:       # sandboxed, with a deadline and a size bound
            text = self.tm.chat_template.render(messages, tools=template_list, add_generation_prompt=not continue_final,
                                                continue_final_message=continue_final, variables=kwargs)
            return tok.encode(text, add_special_tokens=False), text     # the template wrote the special tokens
        try:
            return await self.tm.in_pool(render)       # never on the event loop, however small
        except BadRequest:
            raise
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation is a client error
            raise BadRequest(f"messages: the chat template failed: {e}") from None

    async def run(self, request: Request, body: dict, prompts: list, params, reply):
        stream = get(body, "stream", bool, False)
        reply.cache_report = self.cache_report
        batch = GenerateBatch(prompts, [params] * len(prompts), rids_of(body.get("rid"), len(prompts)), is_batch=True,
                              stream=stream, return_logprob=reply.logprobs, top_logprobs_num=reply.top_logprobs,
                              logprob_start_len=[0] * len(prompts) if reply.echo_logprobs else None)
        inputs = await self.tm.prepare(batch)
        if not stream:
            results = await until_disconnect(request, gather(*[last(self.tm.generate(x)) for x in inputs]))
            return reply.response(results)
        options = stream_options(body)
        return StreamingResponse(sse_stream(self.stream(inputs, reply, **options)), media_type="text/event-stream")

    async def stream(self, inputs, reply, include_usage: bool, continuous_usage_stats: bool):
        latest: dict[int, dict] = {}
        async for i, result in merge([self.tm.generate(x) for x in inputs]):
            for event in reply.chunks(i, result, latest.get(i)):
                if continuous_usage_stats:        # this choice's counts so far, on every chunk
                    event["usage"] = usage([result], 1, reply.cache_report)
                yield event
            latest[i] = result
        if include_usage:
            yield reply.envelope([], usage=usage([latest[i] for i in sorted(latest)], reply.n, reply.cache_report))


def stream_options(body: dict) -> dict:
    opts = get(body, "stream_options", dict, {})
    unknown = set(opts) - {"include_usage", "continuous_usage_stats"}
    if unknown:
        raise BadRequest(f"stream_options: unknown option {sorted(unknown)[0]!r}")
    return {name: get(opts, name, bool, False) for name in ("include_usage", "continuous_usage_stats")}


def add_routes(app: FastAPI, tm: TokenizerManager, server_args) -> None:
    routes = OpenAIRoutes(tm, server_args)
    created = int(time.time())

    card = {"id": routes.name, "object": "model", "created": created, "owned_by": "mini-sglang",
            "root": routes.name, "max_model_len": tm.context_length}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model not in routes.accepted:
            return error_response(404, f"The model `{model}` does not exist.")
        return card

    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat)
    tokenize.add_routes(app, tm, routes)          # /tokenize, /detokenize (and /v1/...)
