"""The vision tower's attention and MLP on the 8B's shapes. Attention: each of SDPA's backends at the
head size of 72, and at head sizes padded with zeros (80, 96, 128), whose scores and outputs are the
same numbers. MLP: the GELU (tanh) after the first linear layer as its own kernel, as transformers
runs it, against cuBLASLt's epilogue (torch._addmm_activation), which applies it before rounding.

    python3 bench/vision_tower.py [--json vision_tower.json]

8 screenshots of 3,864 patches, 16 heads of 72, each image attending to itself (one SDPA call of 8),
bf16, forward only (the tower is frozen), q, k and v taken from the fused qkv projection's output as
pigg.fast.vision does. Times are the GPU's per call over queued calls (lora_kernels.gpu_ms). Padding q, k
and v costs copies that are timed apart: a padded qkv projection (rows of zeros in its weight) would
write them padded.
"""
import argparse
import contextlib
import json
import os

import torch
import torch.nn.functional as F
from lora_kernels import gpu_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

IMAGES, PATCHES, HEADS, HEAD_DIM = 8, 3864, 16, 72
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
PADDED = [80, 96, 128]


def heads(head_dim: int):
    """q, k and v [images, heads, patches, head_dim], views of one qkv output [patches, 3, heads, head_dim]
    whose columns past 72 are zeros."""
    torch.manual_seed(0)
    qkv = torch.zeros(IMAGES * PATCHES, 3, HEADS, head_dim, device="cuda", dtype=torch.bfloat16)
    qkv[..., :HEAD_DIM] = torch.randn(IMAGES * PATCHES, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return [x.reshape(IMAGES, PATCHES, HEADS, head_dim).transpose(1, 2) for x in qkv.unbind(1)]


def attend(q, k, v, backend=None):
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, scale=HEAD_DIM ** -0.5)


def tflops(ms: float) -> float:
    return round(4 * IMAGES * HEADS * PATCHES ** 2 * HEAD_DIM / ms / 1e9, 1)  # at the head size of 72


def mlp() -> dict:
    """fc1 (1152 -> 4304, bias) and GELU over 8 screenshots' patches, then fc2: stock against the GELU
    in fc1's epilogue; each against float32 arithmetic from the same bf16 weights."""
    torch.manual_seed(0)
    x = torch.randn(IMAGES * PATCHES, 1152, device="cuda", dtype=torch.bfloat16)
    fc1 = torch.nn.Linear(1152, 4304, device="cuda", dtype=torch.bfloat16)
    fc2 = torch.nn.Linear(4304, 1152, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        stock = lambda: F.gelu(fc1(x), approximate="tanh")  # noqa: E731
        fused = lambda: torch._addmm_activation(fc1.bias, x, fc1.weight.t(), use_gelu=True)  # noqa: E731
        exact = F.gelu(F.linear(x.float(), fc1.weight.float(), fc1.bias.float()), approximate="tanh")
        row = dict(fc1_gelu_ms=gpu_ms(stock), fc1_gelu_epilogue_ms=gpu_ms(fused),
                   mlp_ms=gpu_ms(lambda: fc2(stock())), mlp_epilogue_ms=gpu_ms(lambda: fc2(fused())),
                   max_abs_diff_from_float32=(stock().float() - exact).abs().max().item(),
                   epilogue_max_abs_diff_from_float32=(fused().float() - exact).abs().max().item())
    print(f"vision MLP ({IMAGES * PATCHES} x 1152 -> 4304 -> 1152): fc1 + GELU {row['fc1_gelu_ms']:.3f} ms, with GELU "
          f"in fc1's epilogue {row['fc1_gelu_epilogue_ms']:.3f} ms; whole MLP {row['mlp_ms']:.3f} against "
          f"{row['mlp_epilogue_ms']:.3f} ms; max |diff| from float32 {row['max_abs_diff_from_float32']:.2e} against "
          f"{row['epilogue_max_abs_diff_from_float32']:.2e}")
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="vision_tower.json", help="file name under $OUT (else the working folder) for the results")
    args = parser.parse_args(argv)
    reference = attend(*heads(HEAD_DIM), SDPBackend.MATH).float()
    rows = []
    for head_dim in [HEAD_DIM, *PADDED]:
        q, k, v = heads(head_dim)
        for name, backend in [("default", None), *BACKENDS.items()]:
            try:
                out = attend(q, k, v, backend)
            except RuntimeError as error:
                rows.append(dict(head_dim=head_dim, backend=name, error=str(error).splitlines()[0]))
                print(f"head size {head_dim:3d} {name:9s} not run: {rows[-1]['error'][:100]}")
                continue
            ms = gpu_ms(lambda: attend(q, k, v, backend))
            err = (out[..., :HEAD_DIM].float() - reference).abs().max().item()
            pad = out[..., HEAD_DIM:].abs().max().item() if head_dim > HEAD_DIM else 0.0
            rows.append(dict(head_dim=head_dim, backend=name, ms=ms, tflops_at_72=tflops(ms),
                             max_abs_diff_from_math=err, max_abs_padding_out=pad))
            print(f"head size {head_dim:3d} {name:9s} {ms:.3f} ms ({tflops(ms)} TFLOP/s at 72), "
                  f"max |diff| from math {err:.2e}, padding's output {pad:.1e}")
    q, k, v = heads(HEAD_DIM)
    pad_ms = {d: gpu_ms(lambda d=d: [F.pad(x, (0, d - HEAD_DIM)) for x in (q, k, v)]) for d in PADDED}
    print("padding q, k and v with zeros (copies): " + ", ".join(f"to {d} {ms:.3f} ms" for d, ms in pad_ms.items()))
    mlp_row = mlp()  # before the file is opened: a failure leaves no empty result behind
    with open(os.path.join(os.environ.get("OUT", "."), args.json), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       shape=dict(images=IMAGES, patches=PATCHES, heads=HEADS, head_dim=HEAD_DIM),
                       attention=rows, pad_copies_ms=pad_ms, mlp=mlp_row), f, indent=1)


if __name__ == "__main__":
    main()
