"""RMSNorm's input gradient in one row-parallel Triton kernel, for norms whose weight is frozen.

Liger's RMSNorm backward (liger-kernel 0.8.5) launches one program per SM, each walking its share of
the rows one row (or 16 short rows) at a time and summing the weight's gradient as it goes. With LoRA
the 8B's norms are frozen, so nothing needs that sum, and one program of 8 (or 4) warps per SM keeps
too few loads in flight: the 72 norms over the hidden size (4,096) and the 72 over each head (128) of
a step run well below the memory's bandwidth. Many programs of a few rows each keep it busy
(bench/norm_and_rotary.py times both; docs/performance.md gives the figures).

`input_grad` computes Liger's "llama" casting mode's gradient for x (the mode Liger patches Qwen3-VL
with) from the same saved tensors, one tile of rows a program over a grid of thousands:
    dx = rstd * m - rstd^3 / n * sum(m * x) * x,   m = dy * w in float32, x in float32,
rounded to x's dtype once. `pigg.fast.liger.wider_rms_norm_backward` has Liger's RMSNorm use it wherever
the weight gets no gradient on a GPU, and Liger's own backward elsewhere (bench/norm_and_rotary.py times both).
"""
import torch

from pigg.fast.kernels import tl, triton

ELEMENTS = 8192  # per program: 2 rows of 4,096 or 64 of 128


if triton is not None:
    @triton.jit
    def _input_grad_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, n_rows, n_cols, stride_dy, stride_x, stride_dx,
                           offset, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_COLS)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        rows = rows.to(tl.int64)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=inside, other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)[:, None]
        m = (dy * w[None, :]).to(tl.float32)
        dx = rstd * m - rstd * rstd * rstd * (tl.sum(m * x, axis=1)[:, None] / n_cols) * x
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=inside)


def input_grad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float = 0.0,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient for x [rows, n] of Liger's llama-mode RMSNorm y = (x * rstd).to(x.dtype) * (weight +
    offset), given the output's gradient dy and the float32 rstd [rows] the forward saved; in x's dtype,
    written into `out` where given (it may be dy itself)."""
    if x.dim() != 2 or dy.shape != x.shape or weight.shape != x.shape[-1:] or rstd.shape != x.shape[:1]:
        raise ValueError(f"RMSNorm's input gradient needs rows x [rows, n], dy like x, weight [n] and rstd [rows] "
                         f"(got x {tuple(x.shape)}, dy {tuple(dy.shape)}, weight {tuple(weight.shape)}, rstd "
                         f"{tuple(rstd.shape)})")
    if x.stride(1) != 1 or dy.stride(1) != 1 or not weight.is_contiguous() or not rstd.is_contiguous():
        raise ValueError("RMSNorm's input gradient needs contiguous rows, weight and rstd")
    out = torch.empty_like(x) if out is None else out
    n_rows, n_cols = x.shape
    cols = triton.next_power_of_2(n_cols)
    rows = max(1, ELEMENTS // cols)
    _input_grad_kernel[(triton.cdiv(n_rows, rows),)](
        dy, x, weight, rstd, out, n_rows, n_cols, dy.stride(0), x.stride(0), out.stride(0), float(offset),
        BLOCK_ROWS=rows, BLOCK_COLS=cols, num_warps=min(32, max(4, rows * cols // 1024)))
    return out
