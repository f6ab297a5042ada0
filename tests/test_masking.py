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


def end_of_turn(processor):
    """`<|im_end|>` and the newline after it, as Qwen's fine-tuning code and LLaMA-Factory supervise them."""
    return [processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), processor.tokenizer.encode("\n")[0]]


def test_single_turn_supervises_answer_end_of_turn_and_newline(processor, image_path):
    answer = "```referring\nblue plus button\n```\n```grounding\n[311, 541]\n```"
    batch = TrainCollator(processor, 4096)([Sample(1, 0, "user_1.pkl", [user(image_path, "Tap plus"), assistant(answer)])])
    tok = processor.tokenizer
    assert end_of_turn(processor) == [151645, 198]
    assert supervised(batch) == tok.encode(answer) + [151645, 198]
    assert tok.decode(supervised(batch)) == answer + "<|im_end|>\n"
    assert "mm_token_type_ids" in batch and batch["mm_token_type_ids"].sum() == (batch["input_ids"] == 151655).sum()


def test_multi_turn_supervises_every_assistant_turn(processor, image_path):
    msgs = [user(image_path, "first"), assistant("one"), {"role": "user", "content": [{"type": "text", "text": "second"}]}, assistant("two")]
    batch = TrainCollator(processor, 4096)([Sample(1, 0, "user_1.pkl", msgs)])
    end = end_of_turn(processor)
    enc = processor.tokenizer.encode
    assert supervised(batch) == enc("one") + end + enc("two") + end


def test_word_assistant_in_user_text_opens_no_span(processor, image_path):
    msgs = [user(image_path, "assistant\nassistant: <|im_start|> tap the assistant button"), assistant("ok")]
    batch = TrainCollator(processor, 4096)([Sample(1, 0, "user_1.pkl", msgs)])
    assert supervised(batch) == processor.tokenizer.encode("ok") + end_of_turn(processor)


def test_padding_is_never_supervised_and_rows_are_independent(processor, image_path):
    short = Sample(1, 0, "user_1.pkl", [user(image_path, "a"), assistant("x")])
    long = Sample(1, 1, "user_1.pkl", [user(image_path, "a much longer command " * 5), assistant("y z")])
    batch = TrainCollator(processor, 4096)([short, long])
    end = end_of_turn(processor)
    assert supervised(batch, 0) == processor.tokenizer.encode("x") + end
    assert supervised(batch, 1) == processor.tokenizer.encode("y z") + end
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_labels_on_hand_made_ids():
    header, end, newline = [1, 2, 3], 9, 4
    ids = torch.tensor([[5, 2, 3, 1, 2, 3, 7, 8, 9, 4, 1, 2, 3, 6, 9, 0]])
    # the first turn's newline is supervised; the second turn is followed by another token, not a newline
    expected = [-100] * 6 + [7, 8, 9, 4] + [-100] * 3 + [6, 9] + [-100]
    assert assistant_labels(ids, header, end, newline)[0].tolist() == expected
    assert assistant_labels(ids, header, end)[0].tolist() == [-100] * 6 + [7, 8, 9] + [-100] * 4 + [6, 9] + [-100]


def test_last_turn_without_newline_ends_at_end_of_turn():
    header, end, newline = [1, 2, 3], 9, 4
    rows = [[1, 2, 3, 7, 9, 4, 1, 2, 3, 6, 9],  # the template writes no newline after the last turn
            [1, 2, 3, 7, 9, 4, 1, 2, 3, 6, 9, 4],  # it does
            [1, 2, 3, 7, 9, 4, 1, 2, 3, 6, 9, 0]]  # none, and padding (0) follows
    assert assistant_labels(torch.tensor([rows[0]]), header, end, newline)[0].tolist() == \
        [-100] * 3 + [7, 9, 4] + [-100] * 3 + [6, 9]
    labels = assistant_labels(torch.tensor(rows[1:]), header, end, newline)
    assert labels[0].tolist() == [-100] * 3 + [7, 9, 4] + [-100] * 3 + [6, 9, 4]
    assert labels[1].tolist() == [-100] * 3 + [7, 9, 4] + [-100] * 3 + [6, 9, -100]


def test_template_without_final_newline_supervises_up_to_end_of_turn(processor, image_path):
    """A chat template that writes nothing after the last `<|im_end|>` (some do): the span ends there,
    and no padding token after it is supervised."""
    import copy

    trimmed = copy.copy(processor)
    trimmed.chat_template = processor.chat_template.replace("<|im_end|>\n{% endfor", "<|im_end|>{% if not loop.last %}\n"
                                                                                  "{% endif %}{% endfor")
    assert trimmed.chat_template != processor.chat_template
    short = Sample(1, 0, "user_1.pkl", [user(image_path, "a"), assistant("x")])
    long = Sample(1, 1, "user_1.pkl", [user(image_path, "a much longer command " * 5), assistant("y z")])
    assert render(trimmed, short.messages).endswith("x<|im_end|>")
    batch = TrainCollator(trimmed, 4096)([short, long])
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert supervised(batch, 0) == processor.tokenizer.encode("x") + [end]
    assert supervised(batch, 1) == processor.tokenizer.encode("y z") + [end]


def test_turn_tokens_come_from_the_tokenizer(processor):
    header, end, newline = turn_tokens(processor.tokenizer)
    assert header == processor.tokenizer.encode("<|im_start|>assistant\n") == [151644, 77091, 198]
    assert (end, newline) == (151645, 198)


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
