"""Qwen3-VL's frozen vision tower, run with fewer kernels while training.

`batched_vision_attention`: one SDPA call per layer for a micro-batch's same-sized images.

With SDPA, transformers' vision attention reads the images' lengths back from the GPU in every one
of the 27 layers (a wait for the GPU each time) and attends image by image: 216 calls a step for 8
screenshots. `batched_vision_attention` reads the lengths once per forward, from `grid_thw` before
the vision tower starts, and attends each run of same-sized images in one call, as a batch. Each
image still attends only to itself: the same function, in fewer calls (tests/test_vision.py). Its
rotary embedding is one Triton kernel (`rotary`) that reads q and k where the fused qkv projection
left them and writes each result once: the stock function copies q and k to float32 and back (four
copies a layer), Liger's copies them to contiguous memory to rotate them in place (two copies a
layer). What the
tower derives from the grid at each forward (position-embedding taps, rotary positions, segments:
small kernels, several of which wait for the GPU to learn their output's size) is computed once per
distinct grid and handed to it precomputed (`grid_tensors`).

`linear_patch_embedding`: the patch embedding, a 3-D convolution whose kernel is its stride, as the
matmul it computes.

`deepstack_without_waits`: the language model adds the tower's intermediate features (DeepStack) to
the hidden states of the image tokens in its first three layers by boolean-mask indexing, which finds
the masked positions on the GPU and makes the CPU wait for them twice a layer. The same sum is taken
here by scattering the features into zeros (no position list, no wait) and adding.

`vision_without_autocast`: the tower runs in its own bf16 outside the Trainer's bf16 autocast. Under
autocast each LayerNorm (two a block, 27 blocks on the 8B) copies its input to float32 and returns
float32, which the next linear layer copies back to bf16: four copies of 30,912 x 1,152 values a block
for 8 screenshots. Outside, the LayerNorm kernel computes in float32 on the bf16 input and rounds its
result to bf16 itself: the values the linear layer got before, up to float32 rounding. Nothing else in
the tower changes precision (its rotary embedding casts to float32 on its own).
"""
import contextlib
import functools
import itertools

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl import modeling_qwen3_vl

from pigg.fast.kernels.rotary import rotary, rotary_takes


def batches_attention(visual, on: bool) -> bool:
    """Whether `batched_vision_attention(visual, on)` changes anything (it needs SDPA)."""
    return on and visual.config._attn_implementation == "sdpa"


@contextlib.contextmanager
def batched_vision_attention(visual, on: bool):
    """While in the block, `visual` (a Qwen3-VL vision tower using SDPA) attends in batches. The images'
    grid may come on the CPU (`GlobalTrainer` leaves it there): no wait for the GPU to read it."""
    if not batches_attention(visual, on):
        yield
        return
    device = visual.patch_embed.proj.weight.device
    segments = []  # the attention segments of the forward running now: one per image frame
    derived = {}  # per grid, the tensors the tower derives from it (on its device)

    def read_segments(module, args, kwargs):
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        rows = tuple(map(tuple, grid.tolist()))
        segments[:] = [h * w for t, h, w in rows for _ in range(t)]
        if rows not in derived:
            if len(derived) >= 64:
                derived.clear()
            derived[rows] = grid_tensors(visual, grid.to(device))
        return args, {**derived[rows], **kwargs}

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


def grid_tensors(visual, grid: torch.Tensor) -> dict:
    """What the tower computes from the images' grid at every forward (where each patch takes its
    position embedding from, its rotary positions, the attention segments), as transformers' vision
    helpers compute it, under the names they take it precomputed by (transformers.vision_utils)."""
    from transformers import vision_utils

    indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size)
    return {"interp_indices": indices, "interp_weights": weights,
            "position_ids": vision_utils.get_vision_position_ids(grid, visual.spatial_merge_size),
            "cu_seqlens": vision_utils.get_vision_cu_seqlens(grid)}


def _forward(attention, segments: list, hidden_states, position_embeddings=None, **kwargs):
    """Qwen3VLVisionAttention.forward for SDPA, attending runs of equal segments in one call each
    (`kwargs`, the stock call's cu_seqlens and max_seqlen, are what `segments` replaces)."""
    length = hidden_states.shape[0]
    if sum(segments) != length:
        raise RuntimeError(f"vision attention: {length} patches, but grid_thw gave segments summing to {sum(segments)}")
    qkv = attention.qkv(hidden_states).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3)
    query, key, value = qkv.unbind(0)
    query, key = _rotary(query, key, *position_embeddings)
    outputs, start = [], 0
    for size, run in itertools.groupby(segments):
        count = len(list(run))
        end = start + size * count
        q, k, v = (x[start:end].reshape(count, size, *x.shape[1:]).transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, scale=attention.scaling)  # (count, heads, size, head_dim)
        outputs.append(out.transpose(1, 2).reshape(end - start, -1))
        start = end
    return attention.proj(outputs[0] if len(outputs) == 1 else torch.cat(outputs))


def _rotary(query, key, cos, sin):
    """The vision tower's rotary embedding, float32 arithmetic with bf16 results. Where no gradient is
    needed (the frozen tower), `rotary`: one kernel reads q and k where the fused qkv left them and
    writes each result once. Else, where Liger's patch is applied (looked up at each call), its kernel
    given q and k as they are: it copies them (to rotate them in place), computes in the dtype of cos
    and sin (float32) and rounds its results to q's. Its patch, like the stock function, first copies q
    and k to float32 and its results back: four more copies of 30,912 x 1,152 values a layer for 8
    screenshots. Each way each result is the float32 value rounded once to bf16."""
    if rotary_takes(query, key, cos, sin):
        return rotary(query, key, cos, sin)
    from_liger = getattr(modeling_qwen3_vl.apply_rotary_pos_emb_vision, "__module__", "").startswith("liger_kernel")
    if not from_liger or query.dtype == torch.float32:
        return modeling_qwen3_vl.apply_rotary_pos_emb_vision(query, key, cos, sin)
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    # Liger's layout is (batch, heads, length, head_dim)
    q, k = liger_rotary_pos_emb(query.unsqueeze(0).transpose(1, 2), key.unsqueeze(0).transpose(1, 2),
                                cos.float(), sin.float())
    return q.transpose(1, 2).squeeze(0), k.transpose(1, 2).squeeze(0)


@contextlib.contextmanager
def vision_without_autocast(visual, on: bool):
    """While in the block, `visual` runs with autocast off where autocast's dtype is its own."""
    if not on:
        yield
        return
    stock, device = visual.forward, visual.patch_embed.proj.weight.device.type

    def forward(*args, **kwargs):
        if not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != visual.dtype:
            return stock(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return stock(*args, **kwargs)

    visual.forward = forward
    try:
        yield
    finally:
        del visual.forward


@contextlib.contextmanager
def linear_patch_embedding(visual):
    """While in the block, `visual`'s patch embedding runs as the matmul it is (`_patch_embed`)."""
    embed = visual.patch_embed
    conv = embed.proj
    if not (isinstance(conv, torch.nn.Conv3d) and conv.kernel_size == conv.stride and conv.groups == 1
            and not any(conv.padding) and set(conv.dilation) == {1}):
        yield
        return
    embed.forward = functools.partial(_patch_embed, embed)
    try:
        yield
    finally:
        del embed.forward


def _patch_embed(embed, hidden_states):
    """Qwen3VLVisionPatchEmbed.forward as one matmul: a Conv3d whose kernel is its stride, applied to
    inputs the size of its kernel, is a linear layer on each flattened patch, which cuBLAS runs far faster
    than cuDNN's 3-D convolution runs the same product (docs/performance.md)."""
    weight = embed.proj.weight
    rows = hidden_states.to(weight.dtype).reshape(-1, weight[0].numel())
    return F.linear(rows, weight.reshape(weight.shape[0], -1), embed.proj.bias)


@contextlib.contextmanager
def deepstack_without_waits():
    """While in the block, Qwen3-VL's language models add the DeepStack features without waiting for
    the GPU (a process-wide patch of their method, put back after)."""
    owner = modeling_qwen3_vl.Qwen3VLTextModel
    stock = owner._deepstack_process
    owner._deepstack_process = _deepstack_process
    try:
        yield
    finally:
        owner._deepstack_process = stock


def _deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
    """Qwen3VLTextModel._deepstack_process: hidden_states plus visual_embeds at the masked positions."""
    mask = visual_pos_masks.to(hidden_states.device)[..., None]
    features = torch.zeros_like(hidden_states).masked_scatter_(
        mask, visual_embeds.to(hidden_states.device, hidden_states.dtype))
    return hidden_states + features
