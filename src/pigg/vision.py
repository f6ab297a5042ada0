"""Qwen3-VL's vision attention with one SDPA call per layer for a micro-batch's same-sized images.

With SDPA, transformers' vision attention reads the images' lengths back from the GPU in every one
of the 27 layers (a wait for the GPU each time) and attends image by image: 216 calls a step for 8
screenshots. `batched_vision_attention` reads the lengths once per forward, from `grid_thw` before
the vision tower starts, and attends each run of same-sized images in one call, as a batch. Each
image still attends only to itself: the same function, in fewer calls (tests/test_vision.py).
"""
import contextlib
import functools
import itertools

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl import modeling_qwen3_vl


@contextlib.contextmanager
def batched_vision_attention(visual, on: bool):
    """While in the block, `visual` (a Qwen3-VL vision tower using SDPA) attends in batches."""
    if not on or visual.config._attn_implementation != "sdpa":
        yield
        return
    segments = []  # the attention segments of the forward running now: one per image frame

    def read_segments(module, args, kwargs):
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        segments[:] = [h * w for t, h, w in grid.tolist() for _ in range(t)]

    hook = visual.register_forward_pre_hook(read_segments, with_kwargs=True)
    attentions = [block.attn for block in visual.blocks]
    for attention in attentions:
        attention.forward = functools.partial(_forward, attention, segments)
    try:
        yield
    finally:
        hook.remove()
        for attention in attentions:
            del attention.forward


def _forward(attention, segments: list, hidden_states, position_embeddings=None, **kwargs):
    """Qwen3VLVisionAttention.forward for SDPA, attending runs of equal segments in one call each
    (`kwargs`, the stock call's cu_seqlens and max_seqlen, are what `segments` replaces)."""
    length = hidden_states.shape[0]
    if sum(segments) != length:
        raise RuntimeError(f"vision attention: {length} patches, but grid_thw gave segments summing to {sum(segments)}")
    qkv = attention.qkv(hidden_states).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3)
    query, key, value = qkv.unbind(0)
    # looked up at each call: Liger's patch of the rotary function where it is applied
    query, key = modeling_qwen3_vl.apply_rotary_pos_emb_vision(query, key, *position_embeddings)
    outputs, start = [], 0
    for size, run in itertools.groupby(segments):
        count = len(list(run))
        end = start + size * count
        q, k, v = (x[start:end].reshape(count, size, *x.shape[1:]).transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, scale=attention.scaling)  # (count, heads, size, head_dim)
        outputs.append(out.transpose(1, 2).reshape(end - start, -1))
        start = end
    return attention.proj(outputs[0] if len(outputs) == 1 else torch.cat(outputs))
