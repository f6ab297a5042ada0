"""Are the attention kernels' gradients right on this GPU? Each of PyTorch's SDPA backends (cuDNN,
Flash, memory-efficient, bf16 math) against a float32 math reference, on the shapes the 8B model's
language layers train with: a micro-batch of 4, 32 query heads over 8 key/value heads, head size 128,
~1,060 tokens, bf16. Two calls, as transformers makes them: causal without a mask (`is_causal`, GQA in
the kernel) when no sample of the micro-batch is padded, and a boolean causal-and-padding mask with the
key/value heads repeated when one is. Prints the relative error of the output and of dq, dk, dv.

    python bench/attention_grads.py     # writes $OUT/attention_grads.json when OUT is set
"""
import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BATCH, HEADS, KV_HEADS, HEAD_DIM = 4, 32, 8, 128
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math_bf16": SDPBackend.MATH}


def inputs(length: int, padded: bool, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):  # q and k come out of Qwen3's q_norm/k_norm: entries of unit scale
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

    q, k, v = randn(BATCH, HEADS, length, HEAD_DIM), randn(BATCH, KV_HEADS, length, HEAD_DIM), \
        randn(BATCH, KV_HEADS, length, HEAD_DIM)
    grad = randn(BATCH, HEADS, length, HEAD_DIM)
    if not padded:
        return q, k, v, grad, dict(is_causal=True, enable_gqa=True)
    lengths = torch.tensor([length - 7 * i for i in range(BATCH)], device="cuda")  # right padding
    keys_valid = torch.arange(length, device="cuda")[None, :] < lengths[:, None]
    causal = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()
    mask = causal[None, None] & keys_valid[:, None, None, :]
    repeat = HEADS // KV_HEADS
    return q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), grad, dict(attn_mask=mask)


def attention(q, k, v, grad, kwargs, backend, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(*leaves, **kwargs)
    out.backward(grad.to(dtype))
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def relative_error(x, ref) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    results = []
    for length, padded in [(1060, False), (1060, True), (1088, False), (1088, True)]:
        q, k, v, grad, kwargs = inputs(length, padded)
        reference = attention(q, k, v, grad, kwargs, SDPBackend.MATH, torch.float32)
        for name, backend in BACKENDS.items():
            row = dict(length=length, call="padding mask" if padded else "causal, no mask", backend=name)
            try:
                got = attention(q, k, v, grad, kwargs, backend, torch.bfloat16)
            except RuntimeError as e:  # the backend does not take this call (Flash and a mask)
                row["error"] = str(e).splitlines()[0][:100]
            else:
                row.update({part: round(relative_error(x, r), 5)
                            for part, x, r in zip(("out", "dq", "dk", "dv"), got, reference)})
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  cuDNN {torch.backends.cudnn.version()}")
    print(f"{'tokens':>6}  {'call':<16} {'backend':<10} {'out':>8} {'dq':>8} {'dk':>8} {'dv':>8}")
    for r in results:
        errors = "  ".join(f"{r[p]:8.5f}" for p in ("out", "dq", "dk", "dv")) if "out" in r else r["error"]
        print(f"{r['length']:>6}  {r['call']:<16} {r['backend']:<10} {errors}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "attention_grads.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
