"""Request fields that SGLang or OpenAI define and this server does not implement (yet).

    refusal(body, table) -> "name: why" for the first field that is set, or None

The rule: a field that would change the answer is honoured or refused with a 400, never
silently ignored, so a client written for SGLang learns at once what it cannot have here.
A field counts as set unless it is null, false, empty, or one of its harmless values (its
default, e.g. `logprob_start_len: -1`, which bench_serving always sends).
Fields that cannot change an answer (`user`, `metadata`, `log_metrics`, ...) are listed in
IGNORED so that a reader, and the schema test, can see they were considered.
"""
from __future__ import annotations

LATER = "not supported yet (needs engine support)"

# name -> (harmless values, why it is refused)
NATIVE = {   # /generate, top level
    "input_embeds": ((), "embeddings as input are not supported; send text or input_ids"),
    "image_data": ((), "images are not supported (text-only Qwen3)"),
    "video_data": ((), "video is not supported (text-only Qwen3)"),
    "audio_data": ((), "audio is not supported (text-only Qwen3)"),
    "lora_path": ((), "LoRA adapters are not supported"),
    "lora_id": ((), "LoRA adapters are not supported"),
    "return_hidden_states": ((), "hidden states are not returned by this server"),
    "return_routed_experts": ((), "Qwen3 dense models have no experts"),
    "return_entropy": ((), "entropy is not returned by this server"),
    "custom_logit_processor": ((), "custom logit processors would run client code; refused"),
    "session_params": ((), "sessions are not supported"),
    "bootstrap_host": ((), "prefill/decode disaggregation is not supported"),
    "bootstrap_port": ((), "prefill/decode disaggregation is not supported"),
    "bootstrap_room": ((), "prefill/decode disaggregation is not supported"),
    "require_reasoning": ((), "not supported"),
    "routed_dp_rank": ((0,), "data parallelism is not supported (one rank: 0)"),
    "data_parallel_rank": ((0,), "data parallelism is not supported (one rank: 0)"),
    "priority": ((), "priority scheduling is not supported"),
    "extra_key": ((), "cache salts are not supported (all requests share the prefix cache)"),
}

SAMPLING = {   # sampling_params (native) and the same names at the top of OpenAI bodies
    "structural_tag": ((), "structured output with structural_tag is " + LATER + "; use regex, json_schema "
                       "or ebnf"),
    "custom_params": ((), "custom logit processors would run client code; refused"),
}

OPENAI = {   # /v1/completions and /v1/chat/completions, top level
    **SAMPLING,
    "token_ids_logprob": ((), "token_ids_logprob is available on /generate (native API) only"),
    "return_hidden_states": NATIVE["return_hidden_states"],
    "return_routed_experts": NATIVE["return_routed_experts"],
    "custom_logit_processor": NATIVE["custom_logit_processor"],
    "lora_path": NATIVE["lora_path"],
    "session_params": NATIVE["session_params"],
    "priority": NATIVE["priority"],
    "extra_key": NATIVE["extra_key"],
    "cache_salt": NATIVE["extra_key"],
    "suffix": ((), "suffix (fill-in-the-middle) is not supported"),
    "functions": ((), "the legacy functions API is not supported; use tools"),
    "function_call": ((), "the legacy functions API is not supported; use tools and tool_choice"),
    "reasoning_effort": ((), "Qwen3 has no effort levels; use chat_template_kwargs.enable_thinking"),
    "audio": ((), "audio output is not supported"),
    "modalities": ((["text"],), "only text output is supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "web_search_options": ((), "web search is not supported"),
}

IGNORED = {   # accepted and without effect on the answer, on purpose
    "log_metrics", "no_logs", "custom_labels", "conversation_id", "routing_key", "background", "return_bytes",
    "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
}


def is_set(value, harmless: tuple) -> bool:
    return value not in (None, False, "", [], {}) and value not in harmless


def refusal(body: dict, table: dict) -> str | None:
    """The 400 message for the first field of `table` that `body` sets (the caller raises it:
    validation.py imports this module, so it cannot import validation's BadRequest here)."""
    for name, (harmless, why) in table.items():
        if is_set(body.get(name), harmless):
            return f"{name}: {why}"
    return None
