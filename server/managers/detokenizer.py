"""Incremental, UTF-8-safe detokenization: token ids in, new text out, per request.

    Detokenizer(tokenizer).feed(TokenOut) -> StrOut      (pure; unit-tested without processes)
    run_detokenizer_process(...)                          (the process around it; echoes Pings)

Why not decode each new token alone? A byte-level BPE token can hold half of a UTF-8
character (an emoji is often 3 tokens), and decoding a lone token also loses the spaces
and merges the tokenizer decides from context. So each request keeps two offsets:

    ids:  [ .... prefix_offset ........ read_offset ........ len(ids) ]
            already emitted   |  context  |   new, not yet emitted

and decodes ids[prefix_offset:] minus ids[prefix_offset:read_offset]; the difference is the
new text. When it ends in U+FFFD (an incomplete character) it is held back until the next
token completes it. Stop strings: the scheduler stops on them; here the text is cut at the
match, and while running, a tail that could be the start of a stop string is held back,
so a streaming client never receives text that is later trimmed away.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from dataclasses import dataclass, field

import msgspec
import zmq

from server.managers import io_struct as io
from server.managers.ipc import parent_alive, pull_socket, push_socket
from stage1_model.model_source import tokenizer_dir
from stage1_model.tokenizer import load_tokenizer
from stage3_scheduler.stops import ids_for_text, stop_string_end

log = logging.getLogger(__name__)
REPLACEMENT = "\ufffd"


@dataclass
class DecodeState:
    params: io.DetokParams
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""          # all text decoded so far (untrimmed)
    sent: int = 0           # how many chars of `text` were emitted


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, DecodeState] = {}

    def feed(self, out: io.TokenOut) -> io.StrOut:
        st = self.states.get(out.rid)
        if st is None:
            st = self.states[out.rid] = DecodeState(out.params or io.DetokParams())
        # the final chunk's matched stop token (EOS / stop_token_ids) is not text, as in SGLang
        st.ids += ids_for_text(out.new_token_ids, st.params, out.finish_reason) if out.finished \
            else out.new_token_ids
        self._decode_new(st, final=out.finished)
        end = stop_string_end(st.text, st.params, out.finish_reason) if out.finished else self._safe_end(st)
        new_text = st.text[st.sent:end] if end > st.sent else ""
        st.sent = max(st.sent, end)
        if out.finished:
            del self.states[out.rid]
        return io.StrOut(out.rid, new_text, out.new_token_ids, out.finished, out.finish_reason,
                         out.prompt_tokens, out.completion_tokens, out.cached_tokens, out.logprobs,
                         out.top_logprobs, out.ids_logprobs, out.input_logprobs, out.input_top_logprobs,
                         out.input_ids_logprobs)

    def _decode(self, st: DecodeState, ids: list[int]) -> str:
        if self.tokenizer is None:           # --skip_tokenizer_init: ids only, text stays ""
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=st.params.skip_special_tokens)

    def _decode_new(self, st: DecodeState, final: bool) -> None:
        prefix = self._decode(st, st.ids[st.prefix_offset:st.read_offset])
        full = self._decode(st, st.ids[st.prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith(REPLACEMENT)):
            st.text += full[len(prefix):]
            st.prefix_offset, st.read_offset = st.read_offset, len(st.ids)

    def _safe_end(self, st: DecodeState) -> int:
        """End of the text that can be emitted now: minus any tail that may begin a stop string."""
        if st.params.no_stop_trim or not st.params.stop:
            return len(st.text)
        hold = 0
        for s in st.params.stop:
            for k in range(min(len(s) - 1, len(st.text)), hold, -1):
                if st.text.endswith(s[:k]):
                    hold = k
                    break
        return len(st.text) - hold


def serve(detok: Detokenizer, inbox, outbox, parent_pid: int) -> None:
    """BatchTokenOut in, BatchStrOut out, one for one, until the launcher is gone. A Ping (the
    main process's liveness probe, see heartbeat.py) goes back as it came; ZMQ reads the
    scheduler's and the main process's connections in turn, so it waits one batch at most."""
    while True:
        if not inbox.poll(1000):
            if not parent_alive(parent_pid):
                return
            continue
        raw = inbox.recv()
        try:
            msg = io.detokenizer_decoder.decode(raw)
        except msgspec.DecodeError as e:         # not one of ours: drop it, keep serving
            log.error("dropped an undecodable message (%d bytes): %s", len(raw), e)
            continue
        if isinstance(msg, io.Ping):
            outbox.send(raw)
            continue
        outbox.send(io.encode(io.BatchStrOut([detok.feed(o) for o in msg.outs])))


def run_detokenizer_process(server_args, model_path: str, endpoints, ready_conn, parent_pid: int) -> None:
    """Process entry point: load the tokenizer, report ready (or the error), then serve."""
    from server.launch_server import child_setup
    child_setup("detokenizer", server_args.log_level)
    try:
        skip = getattr(server_args, "skip_tokenizer_init", False)
        detok = Detokenizer(None if skip else load_tokenizer(tokenizer_dir(Path(model_path))))
        ctx = zmq.Context()
        inbox, outbox = pull_socket(ctx, endpoints.detokenizer), push_socket(ctx, endpoints.tokenizer)
    except Exception as e:  # noqa: BLE001 - report any start-up failure to the launcher
        log.exception("detokenizer failed to start")
        ready_conn.send_bytes(io.encode(io.Ready("detokenizer", error=f"{type(e).__name__}: {e}")))
        os._exit(1)
    ready_conn.send_bytes(io.encode(io.Ready("detokenizer")))
    try:
        serve(detok, inbox, outbox, parent_pid)
    except Exception:  # noqa: BLE001 - crash loudly; the launcher's watchdog takes the server down
        log.exception("detokenizer crashed")
        os._exit(1)
