"""Rendering chat templates safely: the template is trusted, the request is not.

    tpl = ChatTemplate(source, bos_token=..., eos_token=..., max_chars=...)
    text = tpl.render(messages, tools=None, add_generation_prompt=True, variables={"enable_thinking": False})
    check_template_kwargs(kwargs)   # 400 unless every key is a plain template variable

Where the template comes from: the model's tokenizer, or the operator (`--chat_template
FILE`); never from a request. `chat_template_kwargs` reaches the template only as variables
(Qwen3's `enable_thinking`), so a client cannot pass `chat_template` or any other argument of
`apply_chat_template`. A request's Jinja would be code: a 150-byte template with nested loops
blocks for minutes, `{{ 'a b ' * 50000000 }}` takes gigabytes.

Defence in depth, for templates too: rendering runs in Jinja's immutable sandbox, with a
deadline (checked on every call, every 1,024 steps of `range`, and every output chunk) and
a size bound (output characters, and the result of `*`/`**` computed before it is made).
The environment matches what Hugging Face templates expect: trim_blocks, lstrip_blocks,
loop controls, `raise_exception`, `strftime_now`, and a `tojson` that does not HTML-escape.
"""
from __future__ import annotations

import datetime
import json
import threading
import time

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError, safe_range

from server.validation import BadRequest

RENDER_TIMEOUT_S = 2.0
RESERVED = {"messages", "tools", "add_generation_prompt", "continue_final_message", "bos_token", "eos_token",
            "documents", "chat_template", "tokenize", "raise_exception", "strftime_now", "range"}
_deadline = threading.local()       # rendering runs in worker threads: one deadline per thread


class TemplateLimit(SecurityError):
    """The template ran past its deadline or its size bound."""


def _check_deadline() -> None:
    if time.monotonic() > getattr(_deadline, "at", float("inf")):
        raise TemplateLimit(f"rendering took over {RENDER_TIMEOUT_S} s")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, max_chars: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.max_chars = max_chars
        self.globals.update(range=self.bounded_range, raise_exception=_raise, strftime_now=_strftime_now)
        self.filters["tojson"] = _tojson

    def call(self, __context, __obj, *args, **kwargs):
        _check_deadline()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        _check_deadline()
        seq = (str, list, tuple)
        if operator == "*" and (isinstance(left, seq) or isinstance(right, seq)):
            size, count = (len(left), right) if isinstance(left, seq) else (len(right), left)
            if isinstance(count, int) and size * count > self.max_chars:
                raise TemplateLimit("a repetition in the template is larger than the prompt limit")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1000:
            raise TemplateLimit("an exponent in the template is too large")
        return super().call_binop(context, operator, left, right)

    @staticmethod
    def bounded_range(*args):
        for i, x in enumerate(safe_range(*args)):       # safe_range: at most 100,000 items
            if i % 1024 == 0:
                _check_deadline()
            yield x


def _raise(message: str):
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def check_template_kwargs(kwargs: dict) -> dict:
    """`chat_template_kwargs` as template variables, or a 400 saying which key is refused."""
    for key in kwargs:
        if key == "chat_template":
            raise BadRequest("chat_template_kwargs: a request may not supply a chat template; the server uses the "
                             "model's (or the operator's --chat_template)")
        if not key.isidentifier() or key.startswith("_") or key in RESERVED:
            raise BadRequest(f"chat_template_kwargs: {key!r} is not a template variable a request may set")
    return kwargs


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 max_chars: int = 1 << 20):
        self.env = BoundedEnvironment(max_chars)
        self.template = self.env.from_string(source)
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        self.max_chars = max_chars

    def render(self, messages: list[dict], tools=None, add_generation_prompt: bool = True,
               continue_final_message: bool = False, variables: dict | None = None) -> str:
        """The prompt text; raises BadRequest when the template fails or passes its bounds."""
        ctx = {**(variables or {}), **self.special, "messages": messages, "tools": tools,
               "add_generation_prompt": add_generation_prompt}
        _deadline.at = time.monotonic() + RENDER_TIMEOUT_S
        try:
            parts, size = [], 0
            for chunk in self.template.generate(ctx):
                size += len(chunk)
                if size > self.max_chars:
                    raise TemplateLimit(f"the rendered prompt is over {self.max_chars} characters")
                _check_deadline()
                parts.append(chunk)
        except (TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as e:
            raise BadRequest(f"messages: the chat template failed: {e}") from None
        finally:
            _deadline.at = float("inf")
        text = "".join(parts)
        return _cut_after_final(text, messages) if continue_final_message else text


def _cut_after_final(text: str, messages: list[dict]) -> str:
    """continue_final_message: the prompt ends where the last message's content ends (the
    template closed the turn after it; the model should continue it instead)."""
    final = messages[-1].get("content") if messages else None
    if not isinstance(final, str) or not final.strip() or final.strip() not in text:
        raise BadRequest("continue_final_message: the final message's content was not found in the prompt")
    end = text.rindex(final.strip()) + len(final.strip())
    return text[:end]
