"""pigg.fast.vision: the frozen vision tower with fewer kernels and no waits for the GPU, and DeepStack without waits."""
import contextlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

from pigg.fast.vision import batched_vision_attention


def stock_and_batched(tiny_dir, processor, monkeypatch, device="cpu", dtype=torch.float32):
    """The vision tower's features for runs of 3, 1 and 1 same-sized images, image by image (stock)
    and batched, with the batch size of each SDPA call of each."""
    rng = np.random.default_rng(0)
    sizes = [(180, 400)] * 3 + [(300, 200), (180, 400)]
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    inputs = processor.image_processor(images=images, return_tensors="pt").to(device)
    visual = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=dtype).to(device).eval().model.visual
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    results = []
    with torch.no_grad():
        for on in (False, True):
            with batched_vision_attention(visual, on):
                out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            results.append(([out.pooler_output, *out.deepstack_features], list(calls)))
            calls.clear()
    assert "forward" not in vars(visual.blocks[0].attn)  # the stock forward is back
    return results, len(visual.blocks)


def test_batched_vision_attention_gives_the_same_features_in_fewer_calls(tiny_dir, processor, monkeypatch):
    ((stock, stock_calls), (batched, batched_calls)), layers = stock_and_batched(tiny_dir, processor, monkeypatch)
    assert stock_calls == [1] * 5 * layers and batched_calls == [3, 1, 1] * layers
    for a, b in zip(batched, stock, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_batched_vision_attention_derives_from_each_grid_once(tiny_dir, processor, monkeypatch):
    """The tensors derived from the images' grid are computed once per distinct grid and given to the
    tower precomputed; its features are the ones it computes itself."""
    import pigg.fast.vision

    calls = []
    derive = pigg.fast.vision.grid_tensors
    monkeypatch.setattr(pigg.fast.vision, "grid_tensors", lambda *args: calls.append(1) or derive(*args))
    rng = np.random.default_rng(0)
    visual = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir).eval().model.visual
    features = []
    with torch.no_grad():
        for size in [(180, 400), (180, 400), (300, 200)]:
            image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
            inputs = processor.image_processor(images=[image], return_tensors="pt")
            with batched_vision_attention(visual, True):
                batched = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
            features.append((visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output,
                             batched))
        assert len(calls) == 3  # a new context each time: its cache is its own
        with batched_vision_attention(visual, True):
            for _ in range(2):
                visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    assert len(calls) == 4
    for stock, batched in features:
        torch.testing.assert_close(batched, stock, rtol=1e-5, atol=1e-6)


def test_linear_patch_embedding_is_the_convolution(tiny_dir):
    from pigg.fast.vision import linear_patch_embedding

    visual = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir).model.visual
    embed = visual.patch_embed
    pixels = torch.randn(40, embed.proj.weight[0].numel(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = embed(pixels)
        with linear_patch_embedding(visual):
            linear = embed(pixels)
    assert "forward" not in vars(embed)
    torch.testing.assert_close(linear, stock, rtol=1e-5, atol=1e-5)


def test_batched_vision_attention_checks_the_patch_count(tiny_dir):
    visual = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir).model.visual
    with batched_vision_attention(visual, True), torch.no_grad(), pytest.raises(RuntimeError, match="segments"):
        visual.blocks[0].attn(torch.zeros(7, visual.config.hidden_size), position_embeddings=None)



def with_and_without_autocast(tiny_dir, processor, device="cpu"):
    """The bf16 tower's features under bf16 autocast, stock and with `vision_without_autocast`, and the
    dtype its first LayerNorm returned in each."""
    from pigg.fast.vision import vision_without_autocast

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 180, 3), dtype=np.uint8))
    inputs = processor.image_processor(images=[image, image], return_tensors="pt").to(device)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16).to(device)
    visual = model.eval().model.visual
    norm_dtypes, results = [], []
    hook = visual.blocks[0].norm1.register_forward_hook(lambda module, args, out: norm_dtypes.append(out.dtype))
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        for on in (False, True):
            with vision_without_autocast(visual, on):
                out = visual(inputs["pixel_values"].to(torch.bfloat16), grid_thw=inputs["image_grid_thw"])
            results.append([out.pooler_output, *out.deepstack_features])
    hook.remove()
    assert "forward" not in vars(visual)  # the stock forward is back
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(b, a, rtol=1.6e-2, atol=1e-2)
    return norm_dtypes


def test_vision_without_autocast_gives_the_same_features(tiny_dir, processor):
    """On the CPU autocast leaves LayerNorm in bf16 already (the float32 copies it skips are CUDA's:
    tests/test_gpu.py); the features are the same."""
    assert with_and_without_autocast(tiny_dir, processor) == [torch.bfloat16] * 2


def test_deepstack_without_waits_gives_the_models_logits_and_gradients(tiny_dir, processor, synth_root, monkeypatch):
    """The DeepStack features added by scattering into zeros: the stock logits and input gradients
    (float32), and the stock method is back afterwards."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    import pigg.fast.vision
    from pigg import config as C
    from pigg.data.collate import TrainCollator
    from pigg.data.samples import load_samples
    from pigg.fast.vision import deepstack_without_waits

    samples, _ = load_samples(C.DataConfig(data_root=str(synth_root), users="1", validation_workers=1))
    batch = TrainCollator(processor, 4096)(samples[:2])
    batch.pop("labels")
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    assert model.config.vision_config.deepstack_visual_indexes  # the tiny model has DeepStack layers
    stock, calls = modeling_qwen3_vl.Qwen3VLTextModel._deepstack_process, []
    patch = pigg.fast.vision._deepstack_process
    monkeypatch.setattr(pigg.fast.vision, "_deepstack_process", lambda *args: calls.append(1) or patch(*args))
    results = []
    for patched in (False, True):
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
        with deepstack_without_waits() if patched else contextlib.nullcontext():
            logits = model(**{k: v for k, v in batch.items() if k != "input_ids"}, inputs_embeds=embeds).logits
        logits.square().mean().backward()
        results.append((logits.detach(), embeds.grad))
    assert modeling_qwen3_vl.Qwen3VLTextModel._deepstack_process is stock
    assert len(calls) == len(model.config.vision_config.deepstack_visual_indexes)
    (logits, grad), (patched_logits, patched_grad) = results
    torch.testing.assert_close(patched_logits, logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(patched_grad, grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kernel_gives_the_stock_rotary_embedding(monkeypatch, dtype):
    """pigg.fast.kernels.rotary (interpreted here) on q and k as the fused qkv lays them out: the stock
    function's results (float32 arithmetic, one rounding to q's dtype), contiguous, the inputs untouched;
    `_rotary` takes it where no gradient is needed."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("compiled on the GPU: test_vision_rotary_*_on_gpu")
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    from pigg.fast import kernels, vision
    from pigg.fast.kernels import rotary

    monkeypatch.setattr(kernels, "INTERPRET_ON_CPU", True)
    length, heads, head_dim = 37, 3, 12  # rows not a multiple of the kernel's; heads and half not powers of 2
    torch.manual_seed(0)
    query, key, _ = torch.randn(length, 3, heads, head_dim).to(dtype).unbind(1)
    angles = torch.rand(length, head_dim // 2) * 60
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    before = query.clone()
    expected = modeling_qwen3_vl.apply_rotary_pos_emb_vision(query, key, cos, sin)
    assert rotary.rotary_takes(query, key, cos, sin)
    got = vision._rotary(query, key, cos, sin)
    assert torch.equal(query, before)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == dtype and a.is_contiguous()
        # Triton's interpreter rounds to bf16 toward zero, CUDA to nearest: one bf16 step apart at most here
        torch.testing.assert_close(a, b, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    assert not rotary.rotary_takes(query.requires_grad_(), key, cos, sin)  # the trained tower: autograd's ops
