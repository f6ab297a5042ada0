"""One chat template: the processor's, as stock AutoProcessor takes it, whether or not torchvision exists."""
import json
import shutil

import pytest
from transformers import AutoTokenizer

from pigg.data.collate import render
from pigg.data.processor import load_processor
from pigg.offline.tokenizer import CHAT_TEMPLATE

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


@pytest.fixture()
def two_templates(tiny_dir, tmp_path):
    """A checkpoint folder whose processor (chat_template.json, as Qwen's releases ship it) and tokenizer
    (tokenizer_config.json) carry different chat templates."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "config.json"):
        shutil.copy(tiny_dir / name, folder / name)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "PROCESSOR:" + CHAT_TEMPLATE}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "TOKENIZER:" + CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_the_processors_template_wins_over_the_tokenizers(two_templates):
    assert AutoTokenizer.from_pretrained(two_templates).chat_template.startswith("TOKENIZER:")  # they differ
    processor = load_processor(str(two_templates))
    assert processor.chat_template == "PROCESSOR:" + CHAT_TEMPLATE
    assert render(processor, MESSAGES) == "PROCESSOR:<|im_start|>user\nhi<|im_end|>\n"


def test_a_jinja_file_is_the_processors_template_too(two_templates):
    (two_templates / "chat_template.json").unlink()
    (two_templates / "chat_template.jinja").write_text("JINJA:" + CHAT_TEMPLATE)
    assert render(load_processor(str(two_templates)), MESSAGES).startswith("JINJA:<|im_start|>user")


def test_only_a_tokenizer_template_is_refused_as_stock_autoprocessor_would(two_templates):
    (two_templates / "chat_template.json").unlink()
    with pytest.raises(ValueError, match="has no chat template"):
        load_processor(str(two_templates))
