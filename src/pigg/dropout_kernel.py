"""LoRA's dropout and A in one Triton kernel each way, the masks drawn from a counter-based generator.

pigg.lora's `DropoutThenLinear` draws PEFT's masks with PyTorch's dropout: forward, it writes the
dropped-out input and its mask and reads them back for A; backward, it draws the mask again, writes the
dropped-out input again and applies the mask to A's input gradient in a pass of its own. On the 8B
that is ~21 bytes moved per element of the 252 adapted layers' inputs, ~45 ms of an H200's step.

Here the mask is a function of the element's place and the call, Philox4x32-10 keyed by the CUDA
generator's seed (as PyTorch's dropout is), its counter the element's row and column and a call number
reserved from that generator's offset. The forward reads x once and writes x's dropped-out product
with A; the backward reads x once more and writes A's input gradient, and each kernel draws the mask
on the fly: ~6 bytes an element, nothing kept but x (which q, k and v share, as do gate and up).

The masks are Bernoulli(1 - p) as PyTorch's, but not PyTorch's: training draws other masks than
PEFT's, the same ones again for the same seed, and after a resume the same ones as without it (the
reserved calls live in the generator state that checkpoints save; activation checkpointing restores it
before it recomputes a layer, so the recomputed layer draws its masks again). One Philox call gives 4
numbers, used for the columns j, j + K/4, j + K/2 and j + 3K/4 of a row.
"""
import functools

import torch
import triton
import triton.language as tl

MARK = 1 << 30  # in the counter's highest word: PyTorch's own kernels put their thread's index there


@triton.jit
def _keep(seed, call_lo, call_hi, threshold, rows, cols, quarter):
    """Four keep-masks, for columns cols + c * quarter (c = 0..3) of rows: one Philox call per element."""
    counter = rows.to(tl.int64)[:, None] * quarter + cols[None, :]
    c0 = counter.to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, (counter >> 32).to(tl.uint32), zero + call_lo, zero + call_hi)
    return r0 < threshold, r1 < threshold, r2 < threshold, r3 < threshold


@triton.jit
def _forward_part(acc, x_ptr, a_ptr, rows, cols, ok, valid, keep, stride_x, k, r, rank, scale):
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
    a = tl.load(a_ptr + r[None, :] * k + cols[:, None], mask=(r < rank)[None, :] & valid[:, None], other=0.0)
    return tl.dot(dropped, a, acc)


@triton.jit(do_not_specialize=["seed", "call_lo", "call_hi", "threshold"])
def _forward(x_ptr, a_ptr, h_ptr, m, k, stride_x, seed, call_lo, call_hi, threshold, scale,
             rank: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    quarter = k // 4
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for start in range(0, quarter, BLOCK_Q):
        cols = start + tl.arange(0, BLOCK_Q)
        valid = cols < quarter
        ok = (rows < m)[:, None] & valid[None, :]
        keep0, keep1, keep2, keep3 = _keep(seed, call_lo, call_hi, threshold, rows, cols, quarter)
        acc = _forward_part(acc, x_ptr, a_ptr, rows, cols, ok, valid, keep0, stride_x, k, r, rank, scale)
        acc = _forward_part(acc, x_ptr, a_ptr, rows, cols + quarter, ok, valid, keep1, stride_x, k, r, rank, scale)
        acc = _forward_part(acc, x_ptr, a_ptr, rows, cols + 2 * quarter, ok, valid, keep2, stride_x, k, r, rank,
                            scale)
        acc = _forward_part(acc, x_ptr, a_ptr, rows, cols + 3 * quarter, ok, valid, keep3, stride_x, k, r, rank,
                            scale)
    out = (rows < m)[:, None] & (r < rank)[None, :]
    tl.store(h_ptr + rows[:, None] * rank + r[None, :], acc.to(h_ptr.dtype.element_ty), mask=out)


@triton.jit
def _backward_part(acc, x_ptr, a_ptr, gx_ptr, grad, rows, cols, ok, valid, keep, stride_x, k, r, rank, scale,
                   INPUT_GRAD: tl.constexpr):
    """A's gradient for these columns gains grad.T @ dropped; x's gradient there is (grad @ A) * mask * scale."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
    if INPUT_GRAD:
        a = tl.load(a_ptr + r[:, None] * k + cols[None, :], mask=(r < rank)[:, None] & valid[None, :], other=0.0)
        grad_x = tl.where(keep, tl.dot(grad, a) * scale, 0.0)
        tl.store(gx_ptr + rows[:, None] * k + cols[None, :], grad_x.to(gx_ptr.dtype.element_ty), mask=ok)
    return tl.dot(tl.trans(grad), dropped, acc)


@triton.jit
def _store_part(ga_ptr, acc, cols, valid, r, k, rank):
    tl.store(ga_ptr + r[:, None] * k + cols[None, :], acc, mask=(r < rank)[:, None] & valid[None, :])


@triton.jit(do_not_specialize=["seed", "call_lo", "call_hi", "threshold"])
def _backward(x_ptr, a_ptr, g_ptr, gx_ptr, ga_ptr, m, k, stride_x, seed, call_lo, call_hi, threshold, scale,
              rank: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
              INPUT_GRAD: tl.constexpr):
    """Program (q, s) takes columns q * BLOCK_Q.. of each quarter and every split-th block of rows from s;
    it writes its share of A's gradient to ga[s] (summed over s after), and x's gradient there."""
    quarter = k // 4
    cols = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    valid = cols < quarter
    split = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    acc0 = tl.zeros((BLOCK_R, BLOCK_Q), tl.float32)
    acc1 = tl.zeros((BLOCK_R, BLOCK_Q), tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_Q), tl.float32)
    acc3 = tl.zeros((BLOCK_R, BLOCK_Q), tl.float32)
    for start in range(split * BLOCK_M, m, tl.num_programs(1) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        grad = tl.load(g_ptr + rows[:, None] * rank + r[None, :], mask=(rows < m)[:, None] & (r < rank)[None, :],
                       other=0.0)
        ok = (rows < m)[:, None] & valid[None, :]
        keep0, keep1, keep2, keep3 = _keep(seed, call_lo, call_hi, threshold, rows, cols, quarter)
        acc0 = _backward_part(acc0, x_ptr, a_ptr, gx_ptr, grad, rows, cols, ok, valid, keep0, stride_x, k, r, rank,
                              scale, INPUT_GRAD)
        acc1 = _backward_part(acc1, x_ptr, a_ptr, gx_ptr, grad, rows, cols + quarter, ok, valid, keep1, stride_x, k,
                              r, rank, scale, INPUT_GRAD)
        acc2 = _backward_part(acc2, x_ptr, a_ptr, gx_ptr, grad, rows, cols + 2 * quarter, ok, valid, keep2, stride_x,
                              k, r, rank, scale, INPUT_GRAD)
        acc3 = _backward_part(acc3, x_ptr, a_ptr, gx_ptr, grad, rows, cols + 3 * quarter, ok, valid, keep3, stride_x,
                              k, r, rank, scale, INPUT_GRAD)
    ga_ptr += split * rank * k
    _store_part(ga_ptr, acc0, cols, valid, r, k, rank)
    _store_part(ga_ptr, acc1, cols + quarter, valid, r, k, rank)
    _store_part(ga_ptr, acc2, cols + 2 * quarter, valid, r, k, rank)
    _store_part(ga_ptr, acc3, cols + 3 * quarter, valid, r, k, rank)


@triton.jit(do_not_specialize=["seed", "call_lo", "call_hi", "threshold"])
def _mask(out_ptr, m, k, seed, call_lo, call_hi, threshold, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr):
    """The keep-mask the kernels above draw, written out (for tests)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    quarter = k // 4
    ok = (rows < m)[:, None] & (cols < quarter)[None, :]
    keep0, keep1, keep2, keep3 = _keep(seed, call_lo, call_hi, threshold, rows, cols, quarter)
    where = out_ptr + rows[:, None] * k + cols[None, :]
    tl.store(where, keep0.to(tl.int8), mask=ok)
    tl.store(where + quarter, keep1.to(tl.int8), mask=ok)
    tl.store(where + 2 * quarter, keep2.to(tl.int8), mask=ok)
    tl.store(where + 3 * quarter, keep3.to(tl.int8), mask=ok)


# Tiles and launch settings (bench/dropout_kernel.py times others); the masks do not depend on them.
FORWARD = dict(BLOCK_M=64, BLOCK_Q=32, num_warps=4, num_stages=3)
BACKWARD = dict(BLOCK_M=64, BLOCK_Q=32, num_warps=4, num_stages=3)


def reserve_call(device: torch.device) -> tuple[int, int]:
    """The generator's seed and a call number of its own, the generator advanced past it as a dropout
    call advances it; on a CPU (Triton's interpreter) a seed and number from the CPU generator."""
    if device.type != "cuda":
        seed, call = torch.randint(0, 2**31 - 1, (2,)).tolist()
        return seed, call
    generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    offset = generator.get_offset()
    generator.set_offset(offset + 4)
    return generator.initial_seed() & (2**63 - 1), offset // 4


def _random_args(seed: int, call: int, p: float) -> tuple:
    threshold = min(round((1.0 - p) * 2**32), 2**32 - 1)
    return seed, call & 0x7FFFFFFF, MARK | ((call >> 31) & (MARK - 1)), threshold, 1.0 / (1.0 - p)


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float, seed: int, call: int) -> torch.Tensor:
    """dropout(x, p) @ weight.T for a 2-D x, the mask drawn from (seed, call)."""
    m, k = x.shape
    rank = weight.shape[0]
    out = torch.empty(m, rank, dtype=x.dtype, device=x.device)
    seed, lo, hi, threshold, scale = _random_args(seed, call, p)
    _forward[(triton.cdiv(m, FORWARD["BLOCK_M"]),)](x, weight, out, m, k, x.stride(0), seed, lo, hi, threshold,
                                                    scale, rank, _block_r(rank), **FORWARD)
    return out


def dropout_linear_backward(x, weight, grad, p: float, seed: int, call: int, input_grad: bool):
    """The gradients of x (None unless input_grad) and of weight, given grad of the output."""
    m, k = x.shape
    rank = weight.shape[0]
    columns = triton.cdiv(k // 4, BACKWARD["BLOCK_Q"])
    splits = max(1, min(triton.cdiv(m, BACKWARD["BLOCK_M"]), triton.cdiv(2 * _processors(x.device), columns)))
    grad_x = torch.empty_like(x) if input_grad else x  # x: a pointer the kernel does not write through
    partial = torch.empty(splits, rank, k, dtype=torch.float32, device=x.device)
    seed, lo, hi, threshold, scale = _random_args(seed, call, p)
    _backward[(columns, splits)](x, weight, grad, grad_x, partial, m, k, x.stride(0), seed, lo, hi, threshold,
                                 scale, rank, _block_r(rank), INPUT_GRAD=input_grad, **BACKWARD)
    return (grad_x if input_grad else None), partial.sum(0).to(weight.dtype)


@functools.cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def keep_mask(m: int, k: int, p: float, seed: int, call: int, device) -> torch.Tensor:
    """The [m, k] keep-mask (bool) that dropout_linear draws for (seed, call)."""
    out = torch.zeros(m, k, dtype=torch.int8, device=device)
    seed, lo, hi, threshold, _ = _random_args(seed, call, p)
    _mask[(triton.cdiv(m, 64), triton.cdiv(k // 4, 32))](out, m, k, seed, lo, hi, threshold, 64, 32)
    return out.bool()


class DropoutThenLinear(torch.autograd.Function):
    """dropout(x, p) @ weight.T for a 2-D x, keeping x and the call's number instead of the dropped-out x."""

    @staticmethod
    def serves(x: torch.Tensor) -> bool:
        """A GPU's 16-bit rows, contiguous along a width divisible by 4."""
        return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] % 4 == 0 and x.stride(-1) == 1

    @staticmethod
    def serves_rank(rank: int) -> bool:
        return rank <= 64

    @staticmethod
    def forward(ctx, x, weight, p):
        ctx.p, (ctx.seed, ctx.call) = p, reserve_call(x.device)
        ctx.save_for_backward(x, weight)
        return dropout_linear(x, weight, p, ctx.seed, ctx.call)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight = dropout_linear_backward(x, weight, grad.contiguous(), ctx.p, ctx.seed, ctx.call,
                                                      ctx.needs_input_grad[0])
        return grad_x, (grad_weight if ctx.needs_input_grad[1] else None), None
