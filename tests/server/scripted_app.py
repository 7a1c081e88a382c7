"""A real app (routes, validation, replies, parsers) over a TokenizerManager whose "model"
replays forced tokens: tests of outputs a random demo model would never write.

`scripted_app(tokens, *flags)` returns a FastAPI app whose every request produces `tokens`
(cut at max_new_tokens), decoded by the real Detokenizer one token per step, with made-up
logprobs: the chosen token gets -0.5, and alternative k (token id + k) gets -0.5 - k.
No processes, no model: the OpenAI client talks to it through Starlette's TestClient.
"""
from __future__ import annotations

from server.managers import io_struct as io
from server.args import parse_args
from server.managers.detokenizer import Detokenizer
from server.entrypoints.http_server import build_app
from server.managers.ipc import Endpoints
from server.managers.req_state import ReqState, apply_output, native_result
from server.managers.tokenizer_manager import TokenizerManager

EOS = 151645      # <|im_end|>


class ScriptedTM(TokenizerManager):
    script: list[int] = []

    async def generate(self, inp):
        detok, state = Detokenizer(self.tokenizer), ReqState(inp)
        ids = self.script[:inp.params.max_new_tokens]
        for k, t in enumerate(ids):
            last = k == len(ids) - 1
            reason = None
            if last:
                reason = {"type": "stop", "matched": t} if t == EOS else {"type": "length", "length": len(ids)}
            lp = [(-0.5, t)] if inp.return_logprob else []
            top = [[(-0.5 - j, t + j) for j in range(inp.top_logprobs_num)]] if inp.top_logprobs_num else []
            params = io.DetokParams(inp.params.skip_special_tokens, inp.params.no_stop_trim, list(inp.params.stop))
            out = detok.feed(io.TokenOut(inp.rid, [t], last, reason, len(inp.input_ids), k + 1, 0, lp, top,
                                         params if k == 0 else None))
            apply_output(state, out)
            yield native_result(state, out, self.tokenizer)


def scripted_app(tokenizer, *flags: str):
    """(app, tm, endpoints): set `tm.script` before each request; remove the endpoints after."""
    endpoints = Endpoints.create()
    info = {"vocab_size": 151936, "context_length": 4096, "max_total_tokens": 4096,
            "model_path": tokenizer.name_or_path}
    tm = ScriptedTM(tokenizer, endpoints, info)
    return build_app(tm, parse_args(list(flags))), tm, endpoints
