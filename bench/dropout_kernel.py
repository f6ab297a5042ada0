"""LoRA's dropout and A, forward and backward, on one adapted layer of the 8B: pigg.lora's
`DropoutThenLinear` (PyTorch's dropout, PEFT's masks drawn again in the backward) against
pigg.dropout_kernel's Triton kernels with a few tile settings. Rows of 8 x 1,056 tokens, rank 8, the
widths of q, k, v, o, gate and up (4,096) and of down (12,288). Prints each one's time and the bytes it
moves at the kernels' minimum (x read twice, x's gradient written once), and what a step of 36 layers
would save. No model, no data: ~1 minute on an H100.

    PYTHONPATH=src python bench/dropout_kernel.py    # writes $OUT/dropout_kernel.json with OUT set
"""
import json
import os
from pathlib import Path

import torch

from pigg import dropout_kernel as D
from pigg import lora

ROWS, RANK, P = 8 * 1056, 8, 0.1
WIDTHS = {"q, k, v, o, gate, up": (4096, 6), "down": (12288, 1)}  # width: (name, layers of it per decoder layer)
TILES = [dict(BLOCK_M=m, BLOCK_Q=q, num_warps=w, num_stages=s)
         for m, q, w, s in [(64, 32, 4, 3), (32, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 8, 4),
                            (32, 64, 4, 4)]]


def milliseconds(function, x, weight, grad, repeats: int = 20) -> float:
    """Median time of forward + backward."""
    def once():
        out = function.apply(x, weight, P)
        out.backward(grad)

    for _ in range(3):
        once()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}")
    results, saved = [], 0.0
    for name, (width, count) in WIDTHS.items():
        x = torch.randn(ROWS, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(RANK, width, device="cuda") / width**0.5).bfloat16().requires_grad_()
        grad = torch.randn(ROWS, RANK, device="cuda", dtype=torch.bfloat16)
        pytorch = milliseconds(lora.DropoutThenLinear, x, weight, grad)
        kernel = {}
        for forward in TILES:
            D.FORWARD = forward
            kernel[("forward", tuple(forward.values()))] = milliseconds(D.DropoutThenLinear, x, weight, grad)
        D.FORWARD = min(TILES, key=lambda t: kernel[("forward", tuple(t.values()))])
        for backward in TILES:
            D.BACKWARD = backward
            kernel[("backward", tuple(backward.values()))] = milliseconds(D.DropoutThenLinear, x, weight, grad)
        D.BACKWARD = min(TILES, key=lambda t: kernel[("backward", tuple(t.values()))])
        best = milliseconds(D.DropoutThenLinear, x, weight, grad)
        minimum = 3 * x.numel() * x.element_size() / 1e9
        print(f"{name} (width {width}): PyTorch's dropout {pytorch:.3f} ms, kernels {best:.3f} ms "
              f"({minimum / best:.0f} GB/s at their minimum of {minimum * 1e3:.0f} MB); "
              f"forward tiles {D.FORWARD}, backward tiles {D.BACKWARD}")
        for (which, tiles), ms in kernel.items():
            print(f"    {which} tiles {tiles}: {ms:.3f} ms")
        saved += 36 * count * (pytorch - best)
        results.append(dict(width=width, layers=name, pytorch_ms=pytorch, kernel_ms=best, forward=D.FORWARD,
                            backward=D.BACKWARD, tiles={f"{w} {t}": ms for (w, t), ms in kernel.items()}))
    print(f"a step of 36 decoder layers: {saved:.1f} ms less")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "dropout_kernel.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
