"""pigg.vision: the vision tower's attention in one SDPA call per run of same-sized images."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

from pigg.vision import batched_vision_attention


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


def test_batched_vision_attention_checks_the_patch_count(tiny_dir):
    visual = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir).model.visual
    with batched_vision_attention(visual, True), torch.no_grad(), pytest.raises(RuntimeError, match="segments"):
        visual.blocks[0].attn(torch.zeros(7, visual.config.hidden_size), position_embeddings=None)
