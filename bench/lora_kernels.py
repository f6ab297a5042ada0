"""One adapted layer's forward and backward on the 8B's shapes, with torch's dropout (drawn again in the
backward) and with pigg.fast.kernels.lora; the kernels' own time at several tile sizes, and without dropout
(what drawing the mask costs in them). Then q, k and v as one node against three (x's gradient summed
by autograd), the grouped backward kernel's tiles and its time with the mask or x's gradient left out,
and B's sum (`add_b`) against cuBLAS's addmm_ on each of the 8B's output widths.

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

from pigg.fast.kernels import lora as lora_kernels
from pigg.fast.lora import AdaptedLinears

ROWS, RANK, P, SCALE = 8576, 8, 0.1, 4.0
LAYERS = {"q_proj": (4096, 4096), "down_proj": (12288, 4096)}
# block_n, block_k, warps, stages (the default first)
FORWARD_TILES = [(16, 256, 4, 3), (32, 128, 4, 3), (16, 128, 4, 3), (16, 128, 2, 3), (16, 256, 2, 3)]
BACKWARD_TILES = [(16, 32, 64, 4, 3), (64, 16, 64, 4, 3), (8, 32, 64, 4, 3), (16, 32, 128, 4, 3)]  # splits first
GROUP_TILES = [(16, 32, 64, 4, 3), (8, 32, 64, 4, 3), (16, 16, 64, 4, 3), (16, 32, 32, 4, 3), (16, 32, 64, 8, 3)]
ADD_B_TILES = [(64, 128, 4), (32, 256, 4), (128, 128, 8), (64, 256, 8), (128, 64, 4)]  # block_n, block_out, warps
OUT_WIDTHS = {"k_proj, v_proj": 1024, "q_proj, o_proj, down_proj": 4096, "gate_proj, up_proj": 12288}
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
        AdaptedLinears.apply(x, P, SCALE, kernels, weight, None, a, b)[0].backward(grad)
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="lora_kernels.json", help="file name under $OUT (else the working folder) for the results")
    args = parser.parse_args(argv)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {lora_kernels.triton.__version__}")
    results = []
    for name, (k, out) in LAYERS.items():
        x, weight, a, b, grad = layer(k, out)
        base = gpu_ms(lambda: (torch.mm(grad, weight), torch.mm(x.detach(), weight.t())))
        row = dict(layer=name, rows=ROWS, k=k, out=out, base_matmuls_ms=base,
                   torch_dropout_ms=gpu_ms(step(x, weight, a, b, grad, False)))
        seed, offset, a_ = 0, 0, a.detach().bfloat16()  # A as AdaptedLinears gives it to the kernels
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
    group = qkv_group()
    add_b = add_b_widths()
    path = os.path.join(os.environ.get("OUT", "."), args.json)
    with open(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), results=results, qkv_group=group, add_b=add_b), f,
                  indent=1)


def qkv_group() -> dict:
    """q, k and v of one decoder layer with the kernels: one AdaptedLinears node against one a layer,
    forward and backward; the grouped backward kernel's tiles."""
    torch.manual_seed(0)
    x = torch.randn(ROWS, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layers = [layer(4096, out)[1:4] for out in (4096, 1024, 1024)]
    grads = [torch.randn(ROWS, out, device="cuda", dtype=torch.bfloat16) for out in (4096, 1024, 1024)]

    def run(grouped):
        def once():
            x.grad = None
            for _, a, b in layers:
                a.grad = b.grad = None
            if grouped:
                outs = AdaptedLinears.apply(x, P, SCALE, True, *[t for w, a, b in layers for t in (w, None, a, b)])
            else:
                outs = [AdaptedLinears.apply(x, P, SCALE, True, w, None, a, b)[0] for w, a, b in layers]
            torch.autograd.backward(outs, grads)
        return once

    row = dict(one_node_ms=gpu_ms(run(True)), three_nodes_ms=gpu_ms(run(False)))
    a_ = torch.cat([a.detach() for _, a, _ in layers]).bfloat16()
    grad_hidden = torch.randn(ROWS, 3 * RANK, device="cuda", dtype=torch.bfloat16)
    grad_x = torch.zeros(ROWS, 4096, device="cuda", dtype=torch.bfloat16)
    row["forward_ms"] = gpu_ms(lambda: lora_kernels.dropout_a(x.detach(), a_, P, 0, 0, adapters=3))
    row["backward_tiles_ms"] = {
        "x".join(map(str, t)): gpu_ms(lambda t=t: lora_kernels.dropout_a_backward(
            x.detach(), grad_hidden, a_, P, SCALE, 0, 0, grad_x=grad_x, adapters=3, splits=t[0], block_n=t[1],
            block_k=t[2], warps=t[3], stages=t[4]))
        for t in GROUP_TILES}
    # what the default tiles spend on the mask and on x's gradient: each left out in turn
    row["backward_parts_ms"] = {
        f"{'dropout' if p else 'no dropout'}, {'x gradient' if into is not None else 'A only'}": gpu_ms(
            lambda p=p, into=into: lora_kernels.dropout_a_backward(x.detach(), grad_hidden, a_, p, SCALE, 0, 0,
                                                                   grad_x=into, adapters=3))
        for p in (P, 0.0) for into in (grad_x, None)}
    print(f"q, k and v forward + backward with the kernels: one node {row['one_node_ms']:.3f} ms, three nodes "
          f"{row['three_nodes_ms']:.3f} ms; grouped forward kernel {row['forward_ms']:.3f} ms")
    print("  grouped backward tiles (splits x block_n x block_k x warps x stages): "
          + ", ".join(f"{t} {ms:.3f}" for t, ms in row["backward_tiles_ms"].items()))
    print("  grouped backward at the default tiles: "
          + ", ".join(f"{part} {ms:.3f}" for part, ms in row["backward_parts_ms"].items()))
    return row


def add_b_widths() -> list:
    """y += scale * hidden @ B^T on each of the 8B's output widths: cuBLAS's addmm_ against add_b's tiles."""
    rows = []
    for names, out in OUT_WIDTHS.items():
        y = torch.randn(ROWS, out, device="cuda", dtype=torch.bfloat16)
        hidden = torch.randn(ROWS, RANK, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(out, RANK, device="cuda", dtype=torch.bfloat16)
        row = dict(layers=names, out=out, addmm_ms=gpu_ms(lambda: y.addmm_(hidden, b.t(), alpha=SCALE)))
        row["add_b_tiles_ms"] = {"x".join(map(str, t)): gpu_ms(lambda t=t: lora_kernels.add_b(
            y, hidden, b, SCALE, block_n=t[0], block_out=t[1], warps=t[2])) for t in ADD_B_TILES}
        gigabytes = 2 * y.numel() * y.element_size() / 1e9
        best = min(row["add_b_tiles_ms"].values())
        print(f"B's sum into {ROWS} x {out} ({names}): addmm_ {row['addmm_ms']:.3f} ms "
              f"({gigabytes / row['addmm_ms']:.2f} TB/s), add_b fastest {best:.3f} ms ({gigabytes / best:.2f} TB/s): "
              + ", ".join(f"{t} {ms:.3f}" for t, ms in row["add_b_tiles_ms"].items()))
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
