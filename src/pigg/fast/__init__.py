"""The speed path: every replacement of third-party code that training uses, applied in one place.

`speedups()` installs them for the length of `trainer.train()` and puts the originals back after, so a
later run in the same process (personalization's next fold) gets what it asks for. Each keeps the
mathematics of what it replaces; each has a switch in the `fast` section of the configuration
(`--fast.NAME false` turns it off), and docs/performance.md says what each saves.

| patch | replaces | module | switch |
|---|---|---|---|
| Liger kernels | transformers' Qwen3-VL RMSNorm, RoPE, SwiGLU | `fast.liger` | `liger_kernel` |
| RMSNorm input gradient | Liger's RMSNorm backward where the weight is frozen | `fast.liger`, `fast.kernels.rms_norm` | `liger_kernel` |
| fused LoRA adapters | PEFT's LoRA forward and backward | `fast.lora`, `fast.kernels.lora` | `fused_lora`, `lora_kernels` |
| bf16 adapter inputs | PEFT's cast of each adapted layer's input to float32 | `peft.helpers` | `lora_input_fp32` |
| batched vision attention | transformers' vision attention, image by image | `fast.vision`, `fast.kernels.rotary` | `batched_vision_attention` |
| vision tower outside autocast | the Trainer's bf16 autocast over the frozen tower | `fast.vision` | `vision_without_autocast` |
| patch embedding as a matmul | the vision tower's Conv3d (kernel = stride) | `fast.vision` | always (same values) |
| DeepStack without waits | boolean-mask indexing of image tokens | `fast.vision` | always (same values) |
| cuDNN attention | PyTorch's choice of SDPA kernels | `torch.backends` | `cudnn_attention` |
| compiled decoder layers | eager decoder layers | `fast.compile` | `torch_compile` (off) |

Two more switches act outside this function: `logits_on_labels_only` (the loss, `pigg.trainer`) and
`padding_mask` / `pad_to_multiple` (the collator, `pigg.data.collate`).
"""
import contextlib

import torch

from pigg.fast.lora import fused_adapters
from pigg.fast.liger import liger_kernels, use_liger
from pigg.fast.vision import (batched_vision_attention, deepstack_without_waits, linear_patch_embedding,
                              vision_without_autocast)
from pigg.model.loading import unwrapped


@contextlib.contextmanager
def speedups(model, fast_cfg, trainer_args):
    """While in the block, training runs with every speed patch that `fast_cfg` asks for."""
    visual = unwrapped(model).model.visual
    with (liger_kernels(model, use_liger(fast_cfg.liger_kernel, fast_cfg.torch_compile)),
          fused_adapters(model, fuse_adapters(fast_cfg), fast_cfg.lora_kernels),
          adapter_input_casts(model, trainer_args, fast_cfg.lora_input_fp32),
          batched_vision_attention(visual, fast_cfg.batched_vision_attention),
          vision_without_autocast(visual, fast_cfg.vision_without_autocast),
          linear_patch_embedding(visual),
          deepstack_without_waits(),
          cudnn_attention(fast_cfg.cudnn_attention)):
        yield


def adapter_input_casts(model, args, fp32: bool):
    """PEFT casts each adapted layer's bf16 input to the adapters' float32 before the dropout, and
    bf16 autocast casts the result back for the matmul: two extra copies of every activation, the
    same values in the end. Under autocast the input can stay bf16."""
    if fp32 or not args.bf16 or not hasattr(model, "peft_config"):
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


@contextlib.contextmanager
def cudnn_attention(on: bool):
    """While training, allow or forbid cuDNN's SDPA kernels (a process-wide switch, restored after)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(on)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def fuse_adapters(fast_cfg) -> bool:
    """pigg.fast.lora's fused adapters: asked for, and neither compiled (Inductor fuses on its own) nor with
    the adapters' inputs cast to float32 (which the fused forward leaves to PEFT's)."""
    return fast_cfg.fused_lora and not fast_cfg.torch_compile and not fast_cfg.lora_input_fp32
