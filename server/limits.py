"""Request size limits, checked before any expensive work (parsing, tokenizing, templating).

    Limits.from_args(server_args, context_length)
    limits.check_batch(prompts, params)      # counts and prompt characters, before tokenizing
    limits.check_chars(n, what)              # e.g. a conversation, before the chat template

Why before: tokenizing costs about 250 bytes of RAM per prompt character, so a 100 MB prompt
could take the host down before any token count was known. Every limit is a flag with a
default no legitimate request reaches:
- body bytes (`--max_request_bytes`, 32 MiB): refused from `Content-Length` before reading,
  and counted while reading a chunked body (413);
- prompt characters (`--max_prompt_chars`, default 10 per token of context: a prompt
  with more characters than that cannot fit the context in any real text) (413);
- prompts per request, and prompts x n sequences (`--max_prompts_per_request`, 1024) (400).
`n` (<= 16) and stop strings (<= 16, each <= 256 characters) have fixed bounds in
`SamplingParams`.
"""
from __future__ import annotations

from dataclasses import dataclass

from server.validation import BadRequest

CHARS_PER_TOKEN = 10            # generous: English averages ~4 characters per Qwen token


class PayloadTooLarge(BadRequest):
    """A size limit: the HTTP layer answers 413."""
    status = 413


@dataclass
class Limits:
    max_request_bytes: int = 32 << 20
    max_prompt_chars: int = 8192 * CHARS_PER_TOKEN
    max_prompts: int = 1024

    @classmethod
    def from_args(cls, args, context_length: int) -> "Limits":
        chars = args.max_prompt_chars or context_length * CHARS_PER_TOKEN
        return cls(args.max_request_bytes, chars, args.max_prompts_per_request)

    def check_batch(self, prompts: list, params: list) -> None:
        """Counts first (cheap), then each text prompt's length; token-id prompts are bounded
        by the body size and checked against the context after this."""
        if len(prompts) > self.max_prompts:
            raise BadRequest(f"{len(prompts)} prompts in one request; the limit is {self.max_prompts} "
                             "(--max_prompts_per_request)")
        sequences = sum(p.n for p in params)
        if sequences > self.max_prompts:
            raise BadRequest(f"{sequences} sequences (prompts x n) in one request; the limit is {self.max_prompts} "
                             "(--max_prompts_per_request)")
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                self.check_chars(len(prompt), f"prompt {i}" if len(prompts) > 1 else "the prompt")

    def check_chars(self, n: int, what: str) -> None:
        if n > self.max_prompt_chars:
            raise PayloadTooLarge(f"{what} has {n} characters; the limit is {self.max_prompt_chars} "
                                  "(--max_prompt_chars)")
