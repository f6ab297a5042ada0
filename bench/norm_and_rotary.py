"""Two memory-bound kernels of a LoRA step on the 8B's shapes: RMSNorm's backward with a frozen weight,
Liger's (one program per SM) against pigg.fast.kernels.rms_norm's input gradient (one tile of rows a program); and
the vision tower's rotary embedding, Liger's (q and k copied to contiguous memory, rotated in place)
and the stock function's (float32 copies) against pigg.fast.kernels.rotary at several tiles.

    python3 bench/norm_and_rotary.py [--json norm_and_rotary.json]

Rows are a micro-batch of 8 samples of 1,072 tokens (8,576): the decoder layers' norms over the hidden
size (4,096) and Qwen3's q_norm and k_norm over each of 32 and 8 heads (128); 8 screenshots' 30,912
patches of 16 heads of 72 for the rotary embedding, bf16. Times are the GPU's per call over queued
calls (lora_kernels.gpu_ms), with the bytes read and written over that time.
"""
import argparse
import json
import os

import torch
from lora_kernels import gpu_ms

from pigg.fast.kernels import rms_norm
from pigg.fast.kernels import rotary as rotary_kernel

NORMS = {"hidden": (8576, 4096), "q_norm": (8576 * 32, 128), "k_norm": (8576 * 8, 128)}
ROTARY = (30912, 16, 72)
ROTARY_TILES = [(1, 4), (1, 2), (2, 4), (2, 8), (4, 8)]  # rows a program, warps (the default first)


def tb_s(nbytes: int, ms: float) -> float:
    return round(nbytes / ms / 1e9, 2)


def norms() -> list:
    from liger_kernel.ops import rms_norm as liger

    results = []
    for name, shape in NORMS.items():
        x, dy = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        weight, rstd = torch.randn(shape[1], device="cuda", dtype=torch.bfloat16), torch.rand(shape[0], device="cuda")
        block, warps = liger.calculate_settings(shape[1])
        llama = liger._str_to_casting_mode["llama"]
        # in place, into dy, as Liger patches Qwen3-VL
        stock = gpu_ms(lambda: liger.rms_norm_backward(dy, x, weight, rstd, 0.0, llama, block, warps, True, None,
                                                       needs_dw=False))
        ours = gpu_ms(lambda: rms_norm.input_grad(dy, x, weight, rstd, out=dy))
        nbytes = 3 * x.numel() * 2  # dy and x read, dx written
        results.append(dict(norm=name, shape=shape, liger_ms=stock, pigg_ms=ours, liger_tb_s=tb_s(nbytes, stock),
                            pigg_tb_s=tb_s(nbytes, ours)))
        print(f"RMSNorm backward {name} {shape}: Liger {stock:.3f} ms ({tb_s(nbytes, stock)} TB/s), "
              f"pigg.fast.kernels.rms_norm {ours:.3f} ms ({tb_s(nbytes, ours)} TB/s)")
    return results


def rotary() -> dict:
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    length, heads, head_dim = ROTARY
    query, key, _ = torch.randn(length, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16).unbind(1)
    angles = torch.rand(length, head_dim // 2, device="cuda") * 60
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    nbytes = 4 * query.numel() * 2  # q and k read, their results written
    stock = gpu_ms(lambda: modeling_qwen3_vl.apply_rotary_pos_emb_vision(query, key, cos, sin))
    liger = gpu_ms(lambda: liger_rotary_pos_emb(query.unsqueeze(0).transpose(1, 2), key.unsqueeze(0).transpose(1, 2),
                                                cos, sin))
    tiles = {f"{rows}x{warps}": gpu_ms(lambda r=rows, w=warps: rotary_kernel.rotary(query, key, cos, sin, r, w))
             for rows, warps in ROTARY_TILES}
    row = dict(shape=ROTARY, stock_ms=stock, liger_ms=liger, pigg_tiles_ms=tiles)
    print(f"vision rotary {ROTARY}: stock {row['stock_ms']:.3f} ms, Liger {row['liger_ms']:.3f} ms, pigg.fast.kernels.rotary "
          + ", ".join(f"{t} {ms:.3f} ms ({tb_s(nbytes, ms)} TB/s)" for t, ms in row["pigg_tiles_ms"].items())
          + " (rows a program x warps)")
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="norm_and_rotary.json", help="file name under $OUT (else the working folder) for the results")
    args = parser.parse_args(argv)
    results = dict(device=torch.cuda.get_device_name(), rms_norm_backward=norms(), vision_rotary=rotary())
    with open(os.path.join(os.environ.get("OUT", "."), args.json), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
