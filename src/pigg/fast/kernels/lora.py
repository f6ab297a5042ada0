"""Triton kernels for LoRA adapters' dropout, A and B's sum, the dropout mask drawn inside them.

`pigg.fast.lora.AdaptedLinears` without these drops x out with torch's dropout, a kernel that reads x and
writes the dropped-out copy and its mask; the backward draws them again and takes the adapter's input
gradient through two more kernels (dropout's backward, the add into the base layer's): on the 8B a
sizeable share of a LoRA step, all of it passes over memory. Here (docs/performance.md says what it saves):
- `dropout_a` reads x once and writes only dropout(x) @ A^T (rank columns);
- `dropout_a_backward` reads x and the base layer's input gradient once, writes A's gradient and adds
  the adapter's input gradient into the base layer's in place; for q, k and v (gate and up) at once:
  x and the input gradient their matmuls summed are read once for all three, each with its own mask;
- `add_b` adds scale * B's output into the base layer's in one pass, where cuBLAS's addmm_ with
  rank-wide operands falls well short of the memory's bandwidth.
Each kernel draws the mask of the elements it reads from Philox-4x32-10 (Triton's, the algorithm of
torch's CUDA generator): counter `offset // 4 + (row * k + col) // 8` under the generator's seed gives
4 random words, each half word one of 8 neighbouring elements, kept where its 16 bits are at least
round(p * 2**16): probability 1 - p within 2**-17 (p 0.1: 0.100006). Eight elements a counter, not
four of 24 bits, halves the Philox work, which bounds the forward (bench/lora_kernels.py times the
kernels with and without dropout).
The forward takes the counters from the CUDA generator and moves it past them, as torch's dropout
does, so the backward, a recomputed forward (activation checkpointing restores the generator) and the
next random op agree with it. The masks have the distribution of torch's dropout, not its draws
(tests/test_lora_kernels.py).
"""
import functools

import torch

from pigg.fast import kernels
from pigg.fast.kernels import tl, triton


def available(x: torch.Tensor) -> bool:
    """These kernels can take x: Triton is installed, x is rows [n, k] with k divisible by 8 and
    contiguous rows, in bf16 or fp16 on a GPU with bf16 matmuls (Ampere or newer), or on the CPU where
    tests interpret the kernels."""
    if not kernels.runs_on(x) or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] % 8:
        return False
    return not x.is_cuda or x.dtype in (torch.bfloat16, torch.float16) and _ampere_or_newer(x.device.index)


@functools.cache
def _ampere_or_newer(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


_ROUND = 16  # Triton's dot needs every side at least 16: the rank is padded to this


if triton is not None:
    @triton.jit
    def _kept(seed, groups, p_threshold):
        """Which of the 8 * groups.shape[-1] consecutive elements from groups' counters are kept: element
        8g + 2i + h by half h of Philox's word i."""
        r0, r1, r2, r3 = tl.randint4x(seed, groups)
        low = tl.interleave(tl.interleave(r0 & 0xFFFF, r2 & 0xFFFF), tl.interleave(r1 & 0xFFFF, r3 & 0xFFFF))
        high = tl.interleave(tl.interleave(r0 >> 16, r2 >> 16), tl.interleave(r1 >> 16, r3 >> 16))
        return tl.interleave(low, high).to(tl.int32) >= p_threshold

    @triton.jit
    def _dropout_a_kernel(x_ptr, a_ptr, h_ptr, n, k, rank, stride_x, stride_a, stride_h,
                          seed, first_group, p_threshold, kept_scale,
                          DROP: tl.constexpr, DOT: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        # adapter `g` of the group: its rank rows of A, its rank columns of h, its mask (the counters of
        # row g * n + row); the programs of a row block's adapters follow each other, so x's tile comes
        # from memory once and from the L2 cache after
        g = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
                        mask=(rows[:, None] < n) & (cols[None, :] < k), other=0.0)
            if DROP:
                groups = first_group + (g * n + rows[:, None]).to(tl.int64) * (k // 8) \
                    + (start // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
                x = tl.where(_kept(seed, groups, p_threshold), x, 0.0)
            a = tl.load(a_ptr + (g * rank + ranks[None, :]) * stride_a + cols[:, None],
                        mask=(ranks[None, :] < rank) & (cols[:, None] < k), other=0.0)
            acc += tl.dot(x.to(DOT), a.to(DOT))
        tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_h + g * rank + ranks[None, :],
                 (acc * kept_scale).to(h_ptr.dtype.element_ty), mask=(rows[:, None] < n) & (ranks[None, :] < rank))

    @triton.jit
    def _adapter_a(a_ptr, g, rank, stride_a, cols, k, BLOCK_R: tl.constexpr):
        """Adapter g's A over the columns `cols`, ranks as rows."""
        ranks = tl.arange(0, BLOCK_R)
        return tl.load(a_ptr + (g * rank + ranks[:, None]) * stride_a + cols[None, :],
                       mask=(ranks[:, None] < rank) & (cols[None, :] < k), other=0.0)

    @triton.jit
    def _adapter_backward(x, a, rows, cols, g, n, k, rank, gh_ptr, stride_gh, seed, first_group, p_threshold,
                          scale, DROP: tl.constexpr, GRAD_X: tl.constexpr, DOT: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """Adapter g's share of a tile: the gradient of A (before the scale) and of x (scaled, zero
        without GRAD_X) from rows `rows` of x and of grad_hidden, with g's mask."""
        ranks = tl.arange(0, BLOCK_R)
        gh = tl.load(gh_ptr + rows[:, None].to(tl.int64) * stride_gh + g * rank + ranks[None, :],
                     mask=(rows[:, None] < n) & (ranks[None, :] < rank), other=0.0)
        if DROP:
            groups = first_group + (g * n + rows[:, None]).to(tl.int64) * (k // 8) \
                + (tl.program_id(0) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8))[None, :]
            kept = _kept(seed, groups, p_threshold)
            x = tl.where(kept, x, 0.0)
        grad_a = tl.dot(tl.trans(gh).to(DOT), x.to(DOT))
        grad_x = tl.zeros(x.shape, dtype=tl.float32)
        if GRAD_X:
            grad_x = tl.dot(gh.to(DOT), a.to(DOT)) * scale
            if DROP:
                grad_x = tl.where(kept, grad_x, 0.0)
        return grad_a, grad_x

    @triton.jit
    def _dropout_a_backward_kernel(x_ptr, gh_ptr, a_ptr, gx_ptr, part_ptr, n, k, rank,
                                   stride_x, stride_gh, stride_a, stride_gx,
                                   seed, first_group, p_threshold, scale, ADAPTERS: tl.constexpr,
                                   DROP: tl.constexpr, GRAD_X: tl.constexpr, DOT: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        # up to 3 adapters of one input, each with an accumulator of its own; x and grad_x are read once
        cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        split, splits = tl.program_id(1), tl.num_programs(1)
        a0 = _adapter_a(a_ptr, 0, rank, stride_a, cols, k, BLOCK_R)
        a1, a2 = a0, a0  # the adapters a group has not: never read
        if ADAPTERS > 1:
            a1 = _adapter_a(a_ptr, 1, rank, stride_a, cols, k, BLOCK_R)
        if ADAPTERS > 2:
            a2 = _adapter_a(a_ptr, 2, rank, stride_a, cols, k, BLOCK_R)
        acc0 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for start in range(split * BLOCK_N, n, splits * BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            inside = (rows[:, None] < n) & (cols[None, :] < k)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=inside, other=0.0)
            grad_a, g = _adapter_backward(x, a0, rows, cols, 0, n, k, rank, gh_ptr, stride_gh, seed, first_group,
                                          p_threshold, scale, DROP, GRAD_X, DOT, BLOCK_K, BLOCK_R)
            acc0 += grad_a
            if ADAPTERS > 1:
                grad_a, g1 = _adapter_backward(x, a1, rows, cols, 1, n, k, rank, gh_ptr, stride_gh, seed,
                                               first_group, p_threshold, scale, DROP, GRAD_X, DOT, BLOCK_K, BLOCK_R)
                acc1 += grad_a
                g += g1
            if ADAPTERS > 2:
                grad_a, g2 = _adapter_backward(x, a2, rows, cols, 2, n, k, rank, gh_ptr, stride_gh, seed,
                                               first_group, p_threshold, scale, DROP, GRAD_X, DOT, BLOCK_K, BLOCK_R)
                acc2 += grad_a
                g += g2
            if GRAD_X:
                at = gx_ptr + rows[:, None].to(tl.int64) * stride_gx + cols[None, :]
                tl.store(at, (tl.load(at, mask=inside, other=0.0).to(tl.float32) + g).to(gx_ptr.dtype.element_ty),
                         mask=inside)
        ranks = tl.arange(0, BLOCK_R)
        part = part_ptr + (split * ADAPTERS * BLOCK_R + ranks[:, None]) * k + cols[None, :]
        inside = (ranks[:, None] < rank) & (cols[None, :] < k)
        tl.store(part, acc0 * scale, mask=inside)
        if ADAPTERS > 1:
            tl.store(part + BLOCK_R * k, acc1 * scale, mask=inside)
        if ADAPTERS > 2:
            tl.store(part + 2 * BLOCK_R * k, acc2 * scale, mask=inside)

    @triton.jit
    def _add_b_kernel(y_ptr, h_ptr, b_ptr, n, out, rank, stride_y, stride_h, stride_b, scale, DOT: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_R: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + ranks[None, :],
                    mask=(rows[:, None] < n) & (ranks[None, :] < rank), other=0.0)
        b = tl.load(b_ptr + cols[None, :] * stride_b + ranks[:, None],
                    mask=(cols[None, :] < out) & (ranks[:, None] < rank), other=0.0)
        inside = (rows[:, None] < n) & (cols[None, :] < out)
        at = y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :]
        y = tl.load(at, mask=inside, other=0.0).to(tl.float32) + tl.dot(h.to(DOT), b.to(DOT)) * scale
        tl.store(at, y.to(y_ptr.dtype.element_ty), mask=inside)


MAX_ADAPTERS = 3  # of one input, in one backward kernel: q, k and v


def _check(x: torch.Tensor, a: torch.Tensor, adapters: int = 1) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or a.dim() != 2 or a.stride(1) != 1 or a.shape[1] != x.shape[1]:
        raise ValueError(f"LoRA kernels need rows x [n, k] and A [r, k], each with contiguous rows "
                         f"(got x {tuple(x.shape)} strides {x.stride()}, A {tuple(a.shape)} strides {a.stride()})")
    if x.shape[1] % 8:
        raise ValueError(f"LoRA kernels need an input width divisible by 8 (got {x.shape[1]})")
    if x.is_cuda and x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"LoRA kernels take bf16 or fp16 inputs on a GPU (got {x.dtype})")
    if not 1 <= adapters <= MAX_ADAPTERS or a.shape[0] % adapters:
        raise ValueError(f"LoRA kernels take 1 to {MAX_ADAPTERS} adapters of one rank, their A stacked "
                         f"(got {adapters} adapters, A {tuple(a.shape)})")


def _dot_type(x: torch.Tensor):
    """The dtype the kernels' matmuls take: x's on a GPU; float32 in Triton's interpreter, whose bf16
    matmul reads the numbers' bits as integers."""
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[x.dtype] if x.is_cuda else tl.float32


def _threshold(p: float) -> int:
    return round(p * 2 ** 16)


def counters(n: int, k: int) -> int:
    """How many Philox counters the mask of an n x k input takes (8 elements each, `_kept`)."""
    return n * k // 8


def cuda_generator(device: torch.device) -> torch.Generator:
    """The default generator of a CUDA device (the current one where the device has no index)."""
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


def draw(x: torch.Tensor, adapters: int = 1) -> tuple[int, int]:
    """The seed and offset (4 a Philox counter, as torch counts) of the dropout masks of `adapters`
    adapters of x, one after another, from the CUDA generator of x's device, which it moves past the
    counters the masks take: as far as each adapter drawing its own in turn."""
    if not x.is_cuda:  # Triton's interpreter: a number from the CPU generator stands for the offset
        return torch.initial_seed() & (2 ** 63 - 1), int(torch.randint(2 ** 40, ())) * 4
    generator = cuda_generator(x.device)
    offset = generator.get_offset()
    generator.set_offset(offset + 4 * adapters * counters(*x.shape))
    return generator.initial_seed() & (2 ** 63 - 1), offset


def dropout_a(x: torch.Tensor, a: torch.Tensor, p: float, seed: int, offset: int, adapters: int = 1,
              block_n: int = 16, block_k: int = 256, warps: int = 4, stages: int = 3) -> torch.Tensor:
    """dropout(x, p) @ A^T in x's dtype, the mask drawn from (seed, offset): rows x [n, k], A [r, k].
    With `adapters` > 1, A stacks theirs ([adapters * r, k]) and each drops x out with a mask of its
    own (adapter i's the one `adapters` = 1 draws at offset + 4 * i * counters(n, k)); the result
    stacks their columns.
    The default tiles (16 x 256) are within a few percent of the fastest over the 8B's layers of those
    bench/lora_kernels.py times."""
    _check(x, a, adapters)
    n, k = x.shape
    rank = a.shape[0] // adapters
    hidden = torch.empty(n, a.shape[0], dtype=x.dtype, device=x.device)
    _dropout_a_kernel[(adapters, triton.cdiv(n, block_n))](
        x, a, hidden, n, k, rank, x.stride(0), a.stride(0), hidden.stride(0),
        seed, offset // 4, _threshold(p), 1.0 / (1.0 - p), DROP=p > 0, DOT=_dot_type(x), BLOCK_N=block_n,
        BLOCK_K=block_k, BLOCK_R=_block_r(rank), num_warps=warps, num_stages=stages)
    return hidden


def _block_r(rank: int) -> int:
    return max(_ROUND, triton.next_power_of_2(rank))


def dropout_a_backward(x: torch.Tensor, grad_hidden: torch.Tensor, a: torch.Tensor, p: float, scale: float,
                       seed: int, offset: int, grad_x: torch.Tensor | None = None, adapters: int = 1,
                       splits: int = 16, block_n: int = 32, block_k: int = 64, warps: int = 4,
                       stages: int = 3) -> torch.Tensor:
    """The gradient of scale * dropout(x, p) @ A^T (the mask `dropout_a` drew) for A, in float32, given
    grad_hidden [n, r] (the gradient of dropout(x) @ A^T, before the scale); with grad_x, adds the
    gradient for x into it in place. `adapters` as in `dropout_a`: A and grad_hidden stacked, x and
    grad_x read and written once for all of them. Each of `splits` programs a column block sums its own
    rows' share of A's gradient, and the shares are summed after (no atomics: the same sum every run)."""
    _check(x, a, adapters)
    n, k = x.shape
    if grad_hidden.shape != (n, a.shape[0]) or grad_hidden.stride(1) != 1:
        raise ValueError(f"grad_hidden {tuple(grad_hidden.shape)} does not match x {tuple(x.shape)} and A "
                         f"{tuple(a.shape)}")
    if grad_x is not None and (grad_x.shape != x.shape or grad_x.stride(1) != 1):
        raise ValueError(f"grad_x {tuple(grad_x.shape)} does not match x {tuple(x.shape)}")
    rank = a.shape[0] // adapters
    block_r = _block_r(rank)
    parts = torch.empty(splits, adapters, block_r, k, dtype=torch.float32, device=x.device)
    _dropout_a_backward_kernel[(triton.cdiv(k, block_k), splits)](
        x, grad_hidden, a, grad_x if grad_x is not None else x, parts, n, k, rank,
        x.stride(0), grad_hidden.stride(0), a.stride(0), grad_x.stride(0) if grad_x is not None else 0,
        seed, offset // 4, _threshold(p), scale / (1.0 - p), ADAPTERS=adapters, DROP=p > 0,
        GRAD_X=grad_x is not None, DOT=_dot_type(x), BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        num_warps=warps, num_stages=stages)
    return parts[:, :, :rank].sum(0).view(a.shape)


def add_b(y: torch.Tensor, hidden: torch.Tensor, b: torch.Tensor, scale: float,
          block_n: int = 32, block_out: int = 256, warps: int = 4) -> torch.Tensor:
    """y += scale * hidden @ B^T in place, in one pass over y (float32 sums, rounded once, as cuBLAS's
    addmm_ does): y [n, out], hidden [n, r] (its rows may be strided, as `dropout_a` stacks a group's),
    B [out, r]. Faster than addmm_ into the 8B's wide outputs; bench/lora_kernels.py times both on each
    of the 8B's output widths."""
    if y.dim() != 2 or hidden.dim() != 2 or b.dim() != 2 or hidden.shape[0] != y.shape[0] \
            or b.shape != (y.shape[1], hidden.shape[1]) or (y.stride(1), hidden.stride(1), b.stride(1)) != (1, 1, 1):
        raise ValueError(f"add_b needs y [n, out], hidden [n, r] and B [out, r], each with contiguous "
                         f"rows (got y {tuple(y.shape)}, hidden {tuple(hidden.shape)}, B {tuple(b.shape)})")
    n, out = y.shape
    _add_b_kernel[(triton.cdiv(out, block_out), triton.cdiv(n, block_n))](
        y, hidden, b, n, out, hidden.shape[1], y.stride(0), hidden.stride(0), b.stride(0), scale,
        DOT=_dot_type(y), BLOCK_N=block_n, BLOCK_OUT=block_out, BLOCK_R=_block_r(hidden.shape[1]), num_warps=warps)
    return y
