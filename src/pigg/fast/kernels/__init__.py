"""What pigg's Triton kernels (pigg.fast.kernels.lora, pigg.fast.kernels.rms_norm, pigg.fast.vision.rotary) share: Triton
itself, an optional dependency (CUDA builds of torch bring it), and where they run."""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

INTERPRET_ON_CPU = False  # tests set it to run the kernels in Triton's interpreter (TRITON_INTERPRET=1)


def runs_on(x: torch.Tensor) -> bool:
    """Triton is installed and x is on a GPU, or on the CPU where tests interpret the kernels."""
    return triton is not None and (x.is_cuda or INTERPRET_ON_CPU and os.environ.get("TRITON_INTERPRET") == "1")
