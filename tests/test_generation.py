"""pigg.generation on the tiny model: the fast path's greedy answers are transformers' generate()'s."""
import pytest
import torch

from pigg import config as C
from pigg.data.samples import load_samples
from pigg.evaluate import PromptCollator, generate_batch, prompt_and_truth
from pigg.generation import Generator, generate_answers, right_padded


@pytest.fixture(scope="module")
def setup(tiny_dir, synth_root, processor):
    from transformers import Qwen3VLForConditionalGeneration

    samples, _ = load_samples(C.DataConfig(data_root=str(synth_root), users="1-3", validation_workers=1))
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir).eval()
    items = [prompt_and_truth(s) for s in samples]
    return model, items


def left_padded_batch(processor, items):
    batch, _ = PromptCollator(processor)(items)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "the test needs prompts of different lengths"
    return batch


@pytest.mark.parametrize("min_new_tokens", [0, 12])
def test_fast_answers_equal_generate(setup, processor, min_new_tokens):
    model, items = setup
    batch = left_padded_batch(processor, items[:6])
    expected = generate_batch(model, processor, batch, 12, min_new_tokens)
    assert generate_answers(model, processor, batch, 12, min_new_tokens) == expected
    assert all(expected), "empty answers would compare nothing"


def test_positions_from_the_collator_give_the_same_answers(setup, processor):
    model, items = setup
    expected = generate_batch(model, processor, left_padded_batch(processor, items[:6]), 12)
    batch, _ = PromptCollator(processor, fast=True, pixel_dtype=torch.float32)(items[:6])
    assert (batch["attention_mask"][:, 0] == 1).all() and "position_ids" in batch
    assert generate_answers(model, processor, batch, 12) == expected


def test_one_generator_answers_batches_of_several_shapes(setup, processor):
    model, items = setup
    generator = Generator(model, processor, 10)
    batches = [left_padded_batch(processor, items[k:k + n]) for k, n in ((0, 4), (4, 3), (7, 4))]
    got = [generator(b) for b in batches]
    assert got == [generate_batch(model, processor, b, 10) for b in batches]


def test_answers_end_at_the_first_stop_token(setup, processor):
    model, items = setup
    tok = processor.tokenizer
    generator = Generator(model, processor, 6)
    end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    hello, world = tok.encode("Hello world")
    tokens = torch.tensor([[hello, world, end, hello, pad, pad], [world, pad, hello, end, end, end],
                           [hello, hello, hello, world, world, world]])
    assert generator.texts(tokens) == ["Hello world", " world", "HelloHelloHello world world world"]


def test_right_padded_moves_tokens_to_the_front():
    batch = {"input_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 1]]),
             "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
             "mm_token_type_ids": torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0]]),
             "pixel_values": torch.ones(3, 2)}
    moved, lengths = right_padded(batch)
    assert moved["input_ids"].tolist() == [[5, 6, 0, 0], [7, 8, 9, 1]]
    assert moved["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert moved["mm_token_type_ids"].tolist() == [[1, 0, 0, 0], [0, 1, 1, 0]]
    assert moved["pixel_values"] is batch["pixel_values"]
    assert lengths.tolist() == [2, 4]
    same, _ = right_padded(moved)
    assert same is moved


def test_right_padded_refuses_holes_in_the_mask():
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 0, 1, 1]])}
    with pytest.raises(ValueError, match="padding between real tokens"):
        right_padded(batch)


def test_right_padded_refuses_positions_of_left_padded_rows():
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.tensor([[0, 0, 1, 1]]),
             "position_ids": torch.zeros(3, 1, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="not padded on the right"):
        right_padded(batch)


@pytest.mark.gpu
def test_graph_answers_equal_eager_and_generate_on_gpu(setup, processor):
    model, items = setup
    model = model.to("cuda")
    batch = left_padded_batch(processor, items[:6])
    try:
        expected = generate_batch(model, processor, batch, 12)
        eager = Generator(model, processor, 12, graphs=False)(batch)
        graphed = Generator(model, processor, 12)
        assert graphed.graphs
        assert graphed(batch) == eager == expected
        assert graphed(batch) == expected  # the graph replayed for a second batch of the same shape
    finally:
        model.to("cpu")


@pytest.mark.gpu
def test_liger_prefill_equals_transformers_and_is_undone_on_gpu(setup, processor):
    pytest.importorskip("liger_kernel")
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    model, items = setup
    model = model.to("cuda")
    rope, mlp = modeling_qwen3_vl.apply_rotary_pos_emb, modeling_qwen3_vl.Qwen3VLTextMLP.forward
    try:
        batch, lengths = right_padded(PromptCollator(processor, fast=True)(items[:6])[0])
        gen = Generator(model, processor, 12, liger=True)
        assert gen.liger
        with torch.inference_mode():
            fused_logits, fused_cache, _ = gen.prefill(batch, lengths)
            gen.liger = False
            plain_logits, plain_cache, _ = gen.prefill(batch, lengths)
        torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused_cache.layers[-1].keys, plain_cache.layers[-1].keys, rtol=1e-4, atol=1e-4)
        assert fused_logits.argmax(-1).equal(plain_logits.argmax(-1))
        # transformers' functions and the norms' own forward are back for the decoding step
        assert modeling_qwen3_vl.apply_rotary_pos_emb is rope and modeling_qwen3_vl.Qwen3VLTextMLP.forward is mlp
        assert not any("forward" in m.__dict__ for m in model.model.language_model.modules())
    finally:
        model.to("cpu")
