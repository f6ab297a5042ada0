import pytest
import torch
from PIL import Image

from pigg.data.collate import TrainCollator, render, sample_length
from pigg.data.samples import Sample
from pigg.data.masking import IGNORE_INDEX, assistant_labels, turn_tokens


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "screen.png"
    Image.new("RGB", (180, 400), (200, 220, 240)).save(path)
    return str(path)


def user(image, text):
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def supervised(batch, row=0):
    labels = batch["labels"][row]
    return labels[labels != IGNORE_INDEX].tolist()


def test_single_turn_supervises_answer_and_end_of_turn(processor, image_path):
    answer = "```referring\nblue plus button\n```\n```grounding\n[311, 541]\n```"
    batch = TrainCollator(processor, 4096)([Sample(1, 0, "user_1.pkl", [user(image_path, "Tap plus"), assistant(answer)])])
    tok = processor.tokenizer
    assert supervised(batch) == tok.encode(answer) + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert "mm_token_type_ids" in batch and batch["mm_token_type_ids"].sum() == (batch["input_ids"] == 151655).sum()


def test_multi_turn_supervises_every_assistant_turn(processor, image_path):
    msgs = [user(image_path, "first"), assistant("one"), {"role": "user", "content": [{"type": "text", "text": "second"}]}, assistant("two")]
    batch = TrainCollator(processor, 4096)([Sample(1, 0, "user_1.pkl", msgs)])
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    enc = processor.tokenizer.encode
    assert supervised(batch) == enc("one") + [end] + enc("two") + [end]


def test_word_assistant_in_user_text_opens_no_span(processor, image_path):
    msgs = [user(image_path, "assistant\nassistant: <|im_start|> tap the assistant button"), assistant("ok")]
    batch = TrainCollator(processor, 4096)([Sample(1, 0, "user_1.pkl", msgs)])
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert supervised(batch) == processor.tokenizer.encode("ok") + [end]


def test_padding_is_never_supervised_and_rows_are_independent(processor, image_path):
    short = Sample(1, 0, "user_1.pkl", [user(image_path, "a"), assistant("x")])
    long = Sample(1, 1, "user_1.pkl", [user(image_path, "a much longer command " * 5), assistant("y z")])
    batch = TrainCollator(processor, 4096)([short, long])
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert supervised(batch, 0) == processor.tokenizer.encode("x") + [end]
    assert supervised(batch, 1) == processor.tokenizer.encode("y z") + [end]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_labels_on_hand_made_ids():
    header, end = [1, 2, 3], 9
    ids = torch.tensor([[5, 2, 3, 1, 2, 3, 7, 8, 9, 4, 1, 2, 3, 6, 9, 0]])
    expected = [-100] * 6 + [7, 8, 9] + [-100] * 4 + [6, 9] + [-100]
    assert assistant_labels(ids, header, end)[0].tolist() == expected


def test_turn_tokens_come_from_the_tokenizer(processor):
    header, end = turn_tokens(processor.tokenizer)
    assert header == processor.tokenizer.encode("<|im_start|>assistant\n") == [151644, 77091, 198]
    assert end == 151645


def test_over_long_sample_is_an_error_naming_it(processor, image_path):
    sample = Sample(7, 3, "user_7.pkl", [user(image_path, "tap"), assistant("x")])
    with pytest.raises(ValueError, match=r"user_7.pkl sample 3: \d+ tokens .* exceed data.max_length=64"):
        TrainCollator(processor, 64)([sample])


def test_sample_length_matches_the_collator(processor, image_path):
    sample = Sample(1, 0, "user_1.pkl", [user(image_path, "tap the thing"), assistant("```referring\nx\n```")])
    total, image_tokens = sample_length(processor, sample, {image_path: (180, 400)})
    batch = TrainCollator(processor, 4096)([sample])
    assert total == batch["input_ids"].shape[1]
    assert image_tokens == (batch["input_ids"] == 151655).sum()


def test_chat_template_format(processor, image_path):
    text = render(processor, [user(image_path, "hi"), assistant("ok")])
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
                    "<|im_start|>assistant\nok<|im_end|>\n")
    assert render(processor, [user(image_path, "hi")], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
