"""The frozen vision tower's rotary embedding in one Triton kernel.

The stock `apply_rotary_pos_emb_vision` copies q and k to float32 and back (four copies a layer);
Liger's copies them to contiguous memory to rotate them in place (two). This kernel reads q and k
where the fused qkv projection left them and writes each result once, rounded once from float32.
`pigg.fast.vision` uses it where no gradient is needed.
"""
import torch

from pigg.fast import kernels
from pigg.fast.kernels import tl, triton


def rotary_takes(query, key, cos, sin) -> bool:
    """`rotary` can take these: Triton is installed, q and k [length, heads, head_dim] (each head's
    values contiguous) need no gradient, cos and sin are [length, head_dim]; on a GPU, or on the CPU
    where tests interpret the kernel."""
    if not kernels.runs_on(query) or query.requires_grad or key.requires_grad or query.shape != key.shape \
            or query.dim() != 3:
        return False
    length, _, head_dim = query.shape
    return not head_dim % 2 and query.stride(2) == 1 and key.stride(2) == 1 \
        and cos.shape == sin.shape == (length, head_dim)


def rotary(query, key, cos, sin, block_rows: int = 1, warps: int = 4):
    """q * cos + rotate_half(q) * sin and the same for k, in float32, each rounded once to q's dtype:
    the stock `apply_rotary_pos_emb_vision`, reading q and k [length, heads, head_dim] with any row and
    head strides and writing contiguous results. A program a row by default: far faster than 8 rows a
    program (bench/norm_and_rotary.py times the tiles)."""
    length, heads, head_dim = query.shape
    q_out, k_out = (torch.empty(query.shape, dtype=query.dtype, device=query.device) for _ in range(2))
    half = head_dim // 2
    cos, sin = cos.contiguous(), sin.contiguous()
    _rotary_kernel[(triton.cdiv(length, block_rows),)](
        query, key, cos, sin, q_out, k_out, length, heads, query.stride(0), query.stride(1), key.stride(0),
        key.stride(1), HALF=half, HEADS_PAD=triton.next_power_of_2(heads), HALF_PAD=triton.next_power_of_2(half),
        BLOCK_ROWS=block_rows, num_warps=warps)
    return q_out, k_out


if triton is not None:
    @triton.jit
    def _rotate(src, stride_row, stride_head, dst, rows, head, col, inside, cos1, cos2, sin1, sin2, heads,
                HALF: tl.constexpr):
        at = src + rows * stride_row + head * stride_head + col
        x1 = tl.load(at, mask=inside, other=0.0).to(tl.float32)
        x2 = tl.load(at + HALF, mask=inside, other=0.0).to(tl.float32)
        out = dst + rows * (heads * 2 * HALF) + head * (2 * HALF) + col
        tl.store(out, (x1 * cos1 - x2 * sin1).to(dst.dtype.element_ty), mask=inside)
        tl.store(out + HALF, (x2 * cos2 + x1 * sin2).to(dst.dtype.element_ty), mask=inside)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out, k_out, length, heads, stride_q_row, stride_q_head,
                       stride_k_row, stride_k_head, HALF: tl.constexpr, HEADS_PAD: tl.constexpr,
                       HALF_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS))[:, None]
        lanes = tl.arange(0, HEADS_PAD * HALF_PAD)  # each head's first half, padded to a power of 2
        head, col = (lanes // HALF_PAD)[None, :], (lanes % HALF_PAD)[None, :]
        inside = (rows < length) & (head < heads) & (col < HALF)
        rows = rows.to(tl.int64)
        angle = rows * (2 * HALF) + col
        cos1 = tl.load(cos_ptr + angle, mask=inside, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + angle + HALF, mask=inside, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + angle, mask=inside, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + angle + HALF, mask=inside, other=0.0).to(tl.float32)
        _rotate(q_ptr, stride_q_row, stride_q_head, q_out, rows, head, col, inside, cos1, cos2, sin1, sin2, heads, HALF)
        _rotate(k_ptr, stride_k_row, stride_k_head, k_out, rows, head, col, inside, cos1, cos2, sin1, sin2, heads, HALF)
