"""pigg.generation on the tiny model: the fast path's greedy answers are transformers' generate()'s."""
import pytest
import torch

from pigg import config as C
from pigg.data.samples import load_samples
from pigg.evaluate import PromptCollator, generate_batch, prompt_and_truth
from pigg.generation import Generator, Sampling, draw, generate_answers, right_padded, sampling_cuts, shared_prompts


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


def test_sampling_cuts_are_transformers_warpers():
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_p, top_k in ((0.7, 0.9, 0), (1.0, 0.5, 20), (1.3, 1.0, 7), (1.0, 0.95, 0)):
        warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
            ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        expected = LogitsProcessorList(warpers)(None, logits.clone())
        got = sampling_cuts(logits.clone(), Sampling(temperature, top_p, top_k))
        assert torch.equal(got.isinf(), expected.isinf())
        assert torch.allclose(got[~got.isinf()], expected[~expected.isinf()])
        assert (~got.isinf()).sum() < got.numel() or (top_p, top_k) == (1.0, 0)


def test_draws_follow_the_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, float("-inf")])
    torch.manual_seed(0)
    counts = torch.bincount(draw(logits.expand(100_000, 5).clone()), minlength=5) / 100_000
    assert counts[4] == 0
    assert torch.allclose(counts, logits.softmax(-1), atol=0.005)


def test_sampling_settings_are_checked():
    for bad in (dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError, match="generation:"):
            Sampling(**bad)


def test_sampled_answers_keep_to_the_likeliest_token_when_top_p_leaves_one(setup, processor):
    model, items = setup
    batch = left_padded_batch(processor, items[:4])
    generator = Generator(model, processor, 10, sampling=Sampling(temperature=1.0, top_p=1e-6))
    assert generator(batch) == generate_batch(model, processor, batch, 10)


def test_banned_tokens_are_never_sampled(setup, processor):
    model, items = setup
    batch = left_padded_batch(processor, items[:4])
    greedy = Generator(model, processor, 6).answer_ids(batch)
    first = greedy[0][0]
    torch.manual_seed(0)
    banned = Generator(model, processor, 6, sampling=Sampling(top_p=1e-6, banned=(first,))).answer_ids(batch)
    assert first not in {t for row in banned for t in row}


def test_repeated_prompts_are_prefilled_once_and_answered_as_alone(setup, processor):
    model, items = setup
    group = [items[0]] * 3 + [items[1]] * 2 + [items[0]]
    batch = left_padded_batch(processor, group)
    distinct, source = shared_prompts(right_padded(batch)[0], model.config.vision_start_token_id)
    assert source.tolist() == [0, 0, 0, 1, 1, 2] and len(distinct["input_ids"]) == 3
    assert len(distinct["image_grid_thw"]) == 3
    assert distinct["pixel_values"].shape[0] == distinct["image_grid_thw"].prod(-1).sum()
    assert Generator(model, processor, 10)(batch) == generate_batch(model, processor, batch, 10)


def test_rows_with_the_same_text_and_other_images_are_not_shared(setup, processor):
    model, items = setup
    batch, _ = PromptCollator(processor)([items[0]] * 2)
    half = batch["pixel_values"].shape[0] // 2
    batch["pixel_values"] = batch["pixel_values"].clone()
    batch["pixel_values"][half:] += 1  # the second row's image
    distinct, source = shared_prompts(batch, model.config.vision_start_token_id)
    assert source is None and distinct is batch


def sampled(generator, batch, seed):
    torch.manual_seed(seed)
    return generator.answer_ids(batch)


def test_same_seed_same_samples_other_seed_other_samples(setup, processor):
    model, items = setup
    batch = left_padded_batch(processor, [items[0]] * 4 + [items[1]] * 4)
    generator = Generator(model, processor, 10, sampling=Sampling(temperature=1.0))
    first = sampled(generator, batch, 0)
    assert sampled(generator, batch, 0) == first
    assert sampled(generator, batch, 1) != first
    assert len({tuple(a) for a in first}) > 2  # a group's copies are drawn apart


@pytest.mark.gpu
def test_graph_samples_draw_new_noise_at_every_replay_on_gpu(setup, processor):
    model, items = setup
    model = model.to("cuda")
    batch = left_padded_batch(processor, [items[0]] * 4 + [items[1]] * 4)
    try:
        greedy = Generator(model, processor, 12)(batch)
        assert Generator(model, processor, 12, sampling=Sampling(top_p=1e-6))(batch) == greedy
        graphed = Generator(model, processor, 12, sampling=Sampling(temperature=1.0))
        assert graphed.graphs
        sampled(graphed, batch, 5)  # the capture's warm-up step draws too: the calls compared come after
        first = sampled(graphed, batch, 0)
        assert sampled(graphed, batch, 0) == first and sampled(graphed, batch, 1) != first
        assert len({tuple(a[1:]) for a in first}) > 2
    finally:
        model.to("cpu")


@pytest.mark.gpu
def test_a_captured_draw_draws_anew_at_each_replay_on_gpu():
    logits = torch.zeros(1000, 1000, device="cuda")
    draw(logits)  # kernels loaded before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = draw(logits)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert (out != first).float().mean() > 0.9  # equal only by chance (1 in 1000 a row)
