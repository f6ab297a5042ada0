"""One adapted layer's forward and backward on the 8B's shapes, with torch's dropout (drawn again in the
backward) and with pigg.lora_kernels; the kernels' own time at several tile sizes, and without dropout
(what drawing the mask costs in them).

    python3 bench/lora_kernels.py [--json lora_kernels.json]

Rows are a micro-batch of 8 samples of 1,072 tokens (8,576); the layers are the 8B's q_proj (4096 in,
4096 out) and down_proj (12288 in, 4096 out), LoRA r 8, dropout 0.1, scale 4, bf16 as pigg trains.
Each time is the GPU's per call over 10 calls queued back to back, as training queues them: a kernel
of tens of microseconds timed alone measures its launch from Python as well.
"""
import argparse
import json
import os

import torch

from pigg import lora_kernels
from pigg.lora import AdaptedLinear

ROWS, RANK, P, SCALE = 8576, 8, 0.1, 4.0
LAYERS = {"q_proj": (4096, 4096), "down_proj": (12288, 4096)}
# block_n, block_k, warps, stages (the default first)
FORWARD_TILES = [(16, 256, 4, 3), (32, 128, 4, 3), (16, 128, 4, 3), (16, 128, 2, 3), (16, 256, 2, 3)]
BACKWARD_TILES = [(16, 32, 64, 4, 3), (64, 16, 64, 4, 3), (8, 32, 64, 4, 3), (16, 32, 128, 4, 3)]  # splits first
CALLS = 10


def gpu_ms(fn, repeats: int = 7) -> float:
    """Median GPU milliseconds per call of fn over `repeats` runs of CALLS calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS)
    return sorted(times)[len(times) // 2]


def layer(k: int, out: int):
    torch.manual_seed(0)
    x = torch.randn(ROWS, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(out, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    a = (torch.randn(RANK, k, device="cuda") / k ** 0.5).requires_grad_()
    b = (torch.randn(out, RANK, device="cuda") / 8).requires_grad_()
    return x, weight, a, b, torch.randn(ROWS, out, device="cuda", dtype=torch.bfloat16)


def step(x, weight, a, b, grad, kernels: bool):
    def run():
        x.grad = a.grad = b.grad = None
        AdaptedLinear.apply(x, weight, None, a, b, P, SCALE, kernels).backward(grad)
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="lora_kernels.json")
    args = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {lora_kernels.triton.__version__}")
    results = []
    for name, (k, out) in LAYERS.items():
        x, weight, a, b, grad = layer(k, out)
        base = gpu_ms(lambda: (torch.mm(grad, weight), torch.mm(x.detach(), weight.t())))
        row = dict(layer=name, rows=ROWS, k=k, out=out, base_matmuls_ms=base,
                   torch_dropout_ms=gpu_ms(step(x, weight, a, b, grad, False)))
        seed, offset, a_ = 0, 0, a.detach().bfloat16()  # A as AdaptedLinear gives it to the kernels
        hidden = lora_kernels.dropout_a(x.detach(), a_, P, seed, offset)
        grad_hidden = torch.randn_like(hidden)
        grad_x = torch.zeros(ROWS, k, device="cuda", dtype=torch.bfloat16)
        row["kernels_ms"] = gpu_ms(step(x, weight, a, b, grad, True))
        row["forward_tiles_ms"] = {
            "x".join(map(str, t)): gpu_ms(lambda t=t: lora_kernels.dropout_a(
                x.detach(), a_, P, seed, offset, block_n=t[0], block_k=t[1], warps=t[2], stages=t[3]))
            for t in FORWARD_TILES}
        row["backward_tiles_ms"] = {
            "x".join(map(str, t)): gpu_ms(lambda t=t: lora_kernels.dropout_a_backward(
                x.detach(), grad_hidden, a_, P, SCALE, seed, offset, grad_x=grad_x, splits=t[0],
                block_n=t[1], block_k=t[2], warps=t[3], stages=t[4]))
            for t in BACKWARD_TILES}
        # without dropout the kernels draw nothing: what the mask costs in them
        row["forward_no_dropout_ms"] = gpu_ms(lambda: lora_kernels.dropout_a(x.detach(), a_, 0.0, 0, 0))
        row["backward_no_dropout_ms"] = gpu_ms(lambda: lora_kernels.dropout_a_backward(
            x.detach(), grad_hidden, a_, 0.0, SCALE, 0, 0, grad_x=grad_x))
        results.append(row)
        print(f"{name} ({ROWS} x {k} -> {out}): base layer's two matmuls {base:.3f} ms; whole layer forward + "
              f"backward: torch's dropout {row['torch_dropout_ms']:.3f} ms, kernels {row['kernels_ms']:.3f} ms; "
              f"default tiles without dropout: forward {row['forward_no_dropout_ms']:.3f} ms, backward "
              f"{row['backward_no_dropout_ms']:.3f} ms")
        print("  forward tiles (block_n x block_k x warps x stages): "
              + ", ".join(f"{t} {ms:.3f}" for t, ms in row["forward_tiles_ms"].items()))
        print("  backward tiles (splits x block_n x block_k x warps x stages): "
              + ", ".join(f"{t} {ms:.3f}" for t, ms in row["backward_tiles_ms"].items()))
    path = os.path.join(os.environ.get("OUT", "."), args.json)
    with open(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
