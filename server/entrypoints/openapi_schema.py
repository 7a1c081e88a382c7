"""The OpenAPI document (`/openapi.json`), built from typed request models.

    install_openapi(app, api_key=...)    replaces app.openapi with a version that documents the bodies

The routes read their JSON themselves (validation.py, openai_protocol.py) so that every error
is a 400 with a message that names the field; FastAPI therefore sees no request models and
its document would describe no bodies. The pydantic models here state the real contract
(types and ranges, the same ones the validators enforce) and every error a route can answer,
so a client generator or schemathesis can check the server against it. Unknown top-level
fields are allowed where the server ignores them; unknown sampling parameters are not.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, RootModel
from pydantic.json_schema import models_json_schema

from stage3_scheduler.sampling_params import MAX_N, MAX_STOP_LEN, MAX_STOP_STRINGS

Ids = list[int]
Stop = Union[str, list[str], None]


LogitBias = Field(None, description="token id (a decimal string) -> bias in [-100, 100], at most 1024 entries")
StopRegex = Field(None, description=f"regular expressions (at most {MAX_STOP_STRINGS} of 1..{MAX_STOP_LEN} chars) "
                  "searched in the last 200 characters of the output; a match stops the request, untrimmed")


class GrammarFields(BaseModel):
    """Structured output (SGLang's names), at most one per request; compiled by xgrammar, a
    grammar that does not compile is a 400."""
    regex: Optional[str] = Field(None, min_length=1, description="the output must match this regular expression")
    json_schema: Union[str, dict, None] = Field(None, description="a JSON schema (object or its text); the "
                                                "output is compact JSON valid under it")
    ebnf: Optional[str] = Field(None, min_length=1, description="a GBNF/EBNF grammar with a `root` rule")
    stop_regex: Stop = StopRegex


class SamplingFields(BaseModel):
    """The sampling knobs native sampling_params and OpenAI bodies share, same names and ranges."""
    temperature: Optional[float] = Field(None, ge=0, le=100)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=2)
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    seed: Optional[int] = Field(None, ge=0)
    logit_bias: Optional[dict[str, float]] = LogitBias


class SamplingParamsModel(SamplingFields, GrammarFields):
    model_config = ConfigDict(extra="forbid", title="SamplingParams")
    max_new_tokens: Optional[int] = Field(None, ge=0)
    min_new_tokens: Optional[int] = Field(None, ge=0)
    stop: Stop = Field(None, description=f"at most {MAX_STOP_STRINGS} strings of 1..{MAX_STOP_LEN} characters")
    stop_token_ids: Optional[Ids] = None
    ignore_eos: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None
    spaces_between_special_tokens: Optional[bool] = None
    no_stop_trim: Optional[bool] = None


NonEmpty = Field(min_length=1)


class GenerateRequest(BaseModel):
    """SGLang's native /generate: exactly one of text / input_ids; a list means a batch."""
    text: Union[Annotated[str, NonEmpty], Annotated[list[Annotated[str, NonEmpty]], NonEmpty], None] = None
    input_ids: Union[Annotated[Ids, NonEmpty], Annotated[list[Annotated[Ids, NonEmpty]], NonEmpty], None] = None
    sampling_params: Union[SamplingParamsModel, list[SamplingParamsModel], None] = None
    stream: Optional[bool] = None
    return_logprob: Optional[bool] = None
    top_logprobs_num: Optional[int] = Field(None, ge=0, le=20)
    return_text_in_logprobs: Optional[bool] = None
    logprob_start_len: Union[Annotated[int, Field(ge=-1)], list[Annotated[int, Field(ge=-1)]], None] = Field(
        None, description="with return_logprob: -1 output logprobs only; n >= 0 (less than the prompt length) "
        "also meta_info.input_token_logprobs from prompt position n; one value or one per prompt")
    token_ids_logprob: Union[list[int], list[list[int]], None] = Field(
        None, description="with return_logprob: 1..64 ids whose logprobs come back at every position")
    rid: Union[str, list[str], None] = None


class JsonSchemaFormat(BaseModel):
    name: str = Field(min_length=1)
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None


class ResponseFormat(BaseModel):
    """"text": no constraint; "json_object": any JSON object; "json_schema": valid under its schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = Field(None, description='required when type is "json_schema"')


class OpenAICommon(SamplingFields, GrammarFields):
    model: Optional[str] = None
    response_format: Optional[ResponseFormat] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    min_tokens: Optional[int] = Field(None, ge=0)
    stop: Stop = None
    stream: Optional[bool] = None
    stream_options: Optional[dict] = None
    rid: Union[str, list[str], None] = None


class CompletionRequest(OpenAICommon):
    prompt: Union[Annotated[str, NonEmpty], Annotated[list[Annotated[str, NonEmpty]], NonEmpty],
                  Annotated[Ids, NonEmpty], Annotated[list[Annotated[Ids, NonEmpty]], NonEmpty]]
    echo: Optional[bool] = Field(None, description="prepend the prompt; with logprobs, its tokens' logprobs "
                                 "come first (the first one null)")
    logprobs: Optional[int] = Field(None, ge=0, le=20)


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None


class ChatCompletionRequest(OpenAICommon):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    chat_template_kwargs: Optional[dict] = Field(None, description="template variables (e.g. enable_thinking); "
                                                 "never a template")
    tools: Optional[list[dict]] = Field(None, description="function tools; needs --tool_call_parser")
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = Field(
        None, description='"required" or {"type": "function", "function": {"name"}} force one call by a grammar')


class AbortOne(BaseModel):
    rid: str


class AbortAll(BaseModel):
    abort_all: Literal[True]


class AbortRequest(RootModel[Union[AbortOne, AbortAll]]):
    """{"rid": ...} or {"abort_all": true}."""


class TokenizeRequest(BaseModel):
    """/tokenize (and /v1/tokenize): one prompt or a non-empty list of them."""
    prompt: Union[str, Annotated[list[str], NonEmpty]]
    add_special_tokens: bool = True
    model: Optional[str] = None


class DetokenizeRequest(BaseModel):
    """/detokenize (and /v1/detokenize): one list of ids or a non-empty list of lists."""
    tokens: Union[Ids, Annotated[list[Ids], NonEmpty]]
    model: Optional[str] = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


BODIES = {"/generate": GenerateRequest, "/v1/completions": CompletionRequest,
          "/v1/chat/completions": ChatCompletionRequest, "/abort_request": AbortRequest,
          # documented, so that a fuzzer reaches the tokenizer instead of the body check
          **{prefix + route: model for prefix in ("", "/v1")
             for route, model in (("/tokenize", TokenizeRequest), ("/detokenize", DetokenizeRequest))}}
STREAMING = {"/generate", "/v1/completions", "/v1/chat/completions"}
PLAIN = {"/flush_cache": {"text/plain": {"schema": {"type": "string"}}}, "/health": {}, "/health_generate": {}}
# OpenAPI before 3.2 has an event stream's `schema` describe one event (as parsed: data, event,
# id, retry), not the stream as a string; every event here is `data: {json}` or `data: [DONE]`.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "pattern": r"^(\[DONE\]|\{.*\})$",
                                     "description": "one JSON chunk (or {\"error\": ...}), then [DONE]"}}}
ERRORS = {"400": "bad input or Host header", "403": "cross-site browser request", "413": "over a size limit",
          "415": "body not JSON", "503": "scheduler or detokenizer stalled, or shutting down"}


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def _document(path: str, method: str, op: dict, api_key: bool) -> None:
    errors = {code: text for code, text in ERRORS.items() if method == "post" or code not in ("413", "415")}
    if api_key and path != "/health":
        errors["401"] = "missing or wrong API key"
    op["responses"].update({code: _error(text) for code, text in errors.items()})
    op["responses"].pop("422", None)              # FastAPI's default; this server answers 400
    if method == "post" and path != "/flush_cache":         # flush takes no body
        schema = {"$ref": f"#/components/schemas/{BODIES[path].__name__}"} if path in BODIES else {"type": "object"}
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    if path in STREAMING:
        op["responses"]["200"]["content"]["text/event-stream"] = {"schema": SSE_EVENT}
    if path in PLAIN:                   # a text answer, or none at all (health checks)
        op["responses"]["200"]["content"] = PLAIN[path]
    if "{" in path:
        op["responses"]["404"] = _error("no such item")


def install_openapi(app, api_key: bool = False) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in (*BODIES.values(), ErrorResponse)],
                                         ref_template="#/components/schemas/{model}")
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            for path, ops in doc["paths"].items():
                for method, op in ops.items():
                    _document(path, method, op, api_key)
            app.openapi_schema = doc
        return app.openapi_schema
    app.openapi = openapi
