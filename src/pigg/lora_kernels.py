"""Triton kernels for a LoRA adapter's dropout and A, the dropout mask drawn inside them.

`pigg.lora.AdaptedLinear` without these drops x out with torch's dropout, a kernel that reads x and
writes the dropped-out copy and its mask; the backward draws them again and takes the adapter's input
gradient through two more kernels (dropout's backward, the add into the base layer's). On the 8B that
is 70-90 ms of a 0.63 s LoRA step on an H200 (bench/results/profile_train_step_*), all of it passes
over memory. Here:
- `dropout_a` reads x once and writes only dropout(x) @ A^T (rank columns);
- `dropout_a_backward` reads x and the base layer's input gradient once, writes A's gradient and adds
  the adapter's input gradient into the base layer's in place.
Each kernel draws the mask of the elements it reads from Philox-4x32-10 (Triton's, the algorithm of
torch's CUDA generator): counter `offset // 4 + (row * k + col) // 8` under the generator's seed gives
4 random words, each half word one of 8 neighbouring elements, kept where its 16 bits are at least
round(p * 2**16): probability 1 - p within 2**-17 (p 0.1: 0.100006). Eight elements a counter, not
four of 24 bits, halves the Philox work, which bounds the forward (on down_proj 0.174 ms a call, 0.076
without dropout; bench/lora_kernels.py).
The forward takes the counters from the CUDA generator and moves it past them, as torch's dropout
does, so the backward, a recomputed forward (activation checkpointing restores the generator) and the
next random op agree with it. The masks have the distribution of torch's dropout, not its draws
(tests/test_lora_kernels.py).
"""
import functools

import torch

from pigg import kernels
from pigg.kernels import tl, triton


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
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
                        mask=(rows[:, None] < n) & (cols[None, :] < k), other=0.0)
            if DROP:
                groups = first_group + rows[:, None].to(tl.int64) * (k // 8) \
                    + (start // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
                x = tl.where(_kept(seed, groups, p_threshold), x, 0.0)
            a = tl.load(a_ptr + ranks[None, :] * stride_a + cols[:, None],
                        mask=(ranks[None, :] < rank) & (cols[:, None] < k), other=0.0)
            acc += tl.dot(x.to(DOT), a.to(DOT))
        tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_h + ranks[None, :],
                 (acc * kept_scale).to(h_ptr.dtype.element_ty), mask=(rows[:, None] < n) & (ranks[None, :] < rank))

    @triton.jit
    def _dropout_a_backward_kernel(x_ptr, gh_ptr, a_ptr, gx_ptr, part_ptr, n, k, rank,
                                   stride_x, stride_gh, stride_a, stride_gx,
                                   seed, first_group, p_threshold, scale,
                                   DROP: tl.constexpr, GRAD_X: tl.constexpr, DOT: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        split, splits = tl.program_id(1), tl.num_programs(1)
        ranks = tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :],
                    mask=(ranks[:, None] < rank) & (cols[None, :] < k), other=0.0)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for start in range(split * BLOCK_N, n, splits * BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            inside = (rows[:, None] < n) & (cols[None, :] < k)
            gh = tl.load(gh_ptr + rows[:, None].to(tl.int64) * stride_gh + ranks[None, :],
                         mask=(rows[:, None] < n) & (ranks[None, :] < rank), other=0.0)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=inside, other=0.0)
            if DROP:
                groups = first_group + rows[:, None].to(tl.int64) * (k // 8) \
                    + (tl.program_id(0) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8))[None, :]
                kept = _kept(seed, groups, p_threshold)
                x = tl.where(kept, x, 0.0)
            acc += tl.dot(tl.trans(gh).to(DOT), x.to(DOT))
            if GRAD_X:
                g = tl.dot(gh.to(DOT), a.to(DOT)) * scale
                if DROP:
                    g = tl.where(kept, g, 0.0)
                at = gx_ptr + rows[:, None].to(tl.int64) * stride_gx + cols[None, :]
                tl.store(at, (tl.load(at, mask=inside, other=0.0).to(tl.float32) + g).to(gx_ptr.dtype.element_ty),
                         mask=inside)
        tl.store(part_ptr + split * BLOCK_R * k + ranks[:, None] * k + cols[None, :], acc * scale,
                 mask=(ranks[:, None] < rank) & (cols[None, :] < k))


def _check(x: torch.Tensor, a: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or a.dim() != 2 or a.stride(1) != 1 or a.shape[1] != x.shape[1]:
        raise ValueError(f"LoRA kernels need rows x [n, k] and A [r, k], each with contiguous rows "
                         f"(got x {tuple(x.shape)} strides {x.stride()}, A {tuple(a.shape)} strides {a.stride()})")
    if x.shape[1] % 8:
        raise ValueError(f"LoRA kernels need an input width divisible by 8 (got {x.shape[1]})")
    if x.is_cuda and x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"LoRA kernels take bf16 or fp16 inputs on a GPU (got {x.dtype})")


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


def draw(x: torch.Tensor) -> tuple[int, int]:
    """The seed and offset (4 a Philox counter, as torch counts) of x's dropout mask, from the CUDA
    generator of x's device, which it moves past the counters the mask takes."""
    if not x.is_cuda:  # Triton's interpreter: a number from the CPU generator stands for the offset
        return torch.initial_seed() & (2 ** 63 - 1), int(torch.randint(2 ** 40, ())) * 4
    generator = cuda_generator(x.device)
    offset = generator.get_offset()
    generator.set_offset(offset + 4 * counters(*x.shape))
    return generator.initial_seed() & (2 ** 63 - 1), offset


def dropout_a(x: torch.Tensor, a: torch.Tensor, p: float, seed: int, offset: int,
              block_n: int = 16, block_k: int = 256, warps: int = 4, stages: int = 3) -> torch.Tensor:
    """dropout(x, p) @ A^T in x's dtype, the mask drawn from (seed, offset): rows x [n, k], A [r, k].
    16 x 256 tiles: over the 8B's layers within 3% of the fastest that bench/lora_kernels.py times on
    an H200 (bench/results/lora_kernels_h200_part37.json; 32 x 128 took down_proj 15% longer)."""
    _check(x, a)
    n, k = x.shape
    hidden = torch.empty(n, a.shape[0], dtype=x.dtype, device=x.device)
    _dropout_a_kernel[(triton.cdiv(n, block_n),)](
        x, a, hidden, n, k, a.shape[0], x.stride(0), a.stride(0), hidden.stride(0),
        seed, offset // 4, _threshold(p), 1.0 / (1.0 - p), DROP=p > 0, DOT=_dot_type(x), BLOCK_N=block_n,
        BLOCK_K=block_k, BLOCK_R=max(_ROUND, triton.next_power_of_2(a.shape[0])), num_warps=warps,
        num_stages=stages)
    return hidden


def dropout_a_backward(x: torch.Tensor, grad_hidden: torch.Tensor, a: torch.Tensor, p: float, scale: float,
                       seed: int, offset: int, grad_x: torch.Tensor | None = None, splits: int = 16,
                       block_n: int = 32, block_k: int = 64, warps: int = 4, stages: int = 3) -> torch.Tensor:
    """The gradient of scale * dropout(x, p) @ A^T (the mask `dropout_a` drew) for A, in float32, given
    grad_hidden [n, r] (the gradient of dropout(x) @ A^T, before the scale); with grad_x, adds the
    gradient for x into it in place. Each of `splits` programs a column block sums its own rows' share
    of A's gradient, and the shares are summed after (no atomics: the same sum every run)."""
    _check(x, a)
    n, k = x.shape
    if grad_hidden.shape != (n, a.shape[0]) or grad_hidden.stride(1) != 1:
        raise ValueError(f"grad_hidden {tuple(grad_hidden.shape)} does not match x {tuple(x.shape)} and A "
                         f"{tuple(a.shape)}")
    if grad_x is not None and (grad_x.shape != x.shape or grad_x.stride(1) != 1):
        raise ValueError(f"grad_x {tuple(grad_x.shape)} does not match x {tuple(x.shape)}")
    block_r = max(_ROUND, triton.next_power_of_2(a.shape[0]))
    parts = torch.empty(splits, block_r, k, dtype=torch.float32, device=x.device)
    _dropout_a_backward_kernel[(triton.cdiv(k, block_k), splits)](
        x, grad_hidden, a, grad_x if grad_x is not None else x, parts, n, k, a.shape[0],
        x.stride(0), grad_hidden.stride(0), a.stride(0), grad_x.stride(0) if grad_x is not None else 0,
        seed, offset // 4, _threshold(p), scale / (1.0 - p), DROP=p > 0, GRAD_X=grad_x is not None,
        DOT=_dot_type(x), BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps, num_stages=stages)
    return parts[:, :a.shape[0]].sum(0)
