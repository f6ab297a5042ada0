"""Liger's Triton kernels for Qwen3-VL while training and in generation's prefill, put back afterwards.

Liger (liger-kernel, `pip install 'pigg[fast]'`) replaces transformers' RMSNorm, RoPE and SwiGLU with
fused kernels that compute the same functions. Where an RMSNorm's weight is frozen (LoRA), its
backward is `pigg.fast.kernels.rms_norm.input_grad`, which spreads the rows over more of the GPU.
"""
import contextlib
import importlib.util
import inspect

from pigg import config as C
from pigg.fast.kernels import rms_norm
from pigg.model.loading import device, unwrapped


def use_liger(setting: bool | None, compiled: bool = False) -> bool:
    available = device() == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if setting and not available:
        raise C.ConfigError("fast.liger_kernel needs a CUDA GPU and the liger-kernel package "
                            "(pip install 'pigg[fast]')")
    return available and not compiled if setting is None else setting


@contextlib.contextmanager
def liger_kernels(model, on: bool):
    """Liger's Triton RMSNorm, RoPE and SwiGLU (SiLU and product in one kernel that keeps only its two
    inputs for the backward) in place of transformers' while training: the same functions, fused. Its
    fused linear cross-entropy stays off: pigg computes logits only at the supervised positions
    already. Liger replaces functions and methods of transformers' Qwen3-VL module for the whole
    process; they are put back afterwards, so a later run in the same process (personalization's next
    fold, a compiled run) gets what it asks for. The model's own RMSNorm layers keep Liger's forward;
    where their weight is frozen (LoRA) the backward is `pigg.fast.kernels.rms_norm`'s, which runs on more of the GPU."""
    if not on:
        yield
        return
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    patched = [(modeling_qwen3_vl, name) for name in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_vision",
                                                      "Qwen3VLTextRMSNorm")]
    patched.append((modeling_qwen3_vl.Qwen3VLTextMLP, "forward"))
    saved = [(owner, name, getattr(owner, name)) for owner, name in patched]
    apply_liger_kernel_to_qwen3_vl(rope=True, rms_norm=True, cross_entropy=False, fused_linear_cross_entropy=False,
                                   model=unwrapped(model))
    kernels = "RMSNorm and RoPE"
    if liger_swiglu(unwrapped(model).config.get_text_config()):
        modeling_qwen3_vl.Qwen3VLTextMLP.forward = swiglu
        kernels = "RMSNorm, RoPE and SwiGLU"
    try:
        with wider_rms_norm_backward() as wider:
            print(f"Liger kernels: {kernels}"
                  + (" (RMSNorm's input gradient by pigg.fast.kernels.rms_norm where its weight is frozen)" if wider else ""))
            yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def swiglu(mlp, x):
    """Qwen3VLTextMLP.forward for SiLU, with Liger's SiLU-and-product kernel."""
    from liger_kernel.ops import LigerSiLUMulFunction

    return mlp.down_proj(LigerSiLUMulFunction.apply(mlp.gate_proj(x), mlp.up_proj(x)))


def liger_swiglu(text_config) -> bool:
    """Whether `liger_kernels` runs the MLP with Liger's SwiGLU (the batch plan counts its memory)."""
    return text_config.hidden_act == "silu"


@contextlib.contextmanager
def wider_rms_norm_backward():
    """While in the block, Liger's RMSNorm backward (a process-wide function of liger_kernel.ops.rms_norm,
    put back after) takes `input_grad` where the weight gets no gradient, the casting mode is llama's and
    the input is on a GPU; else its own kernels. Yields whether it does: a liger-kernel whose function
    takes other arguments keeps its own backward."""
    from liger_kernel.ops import rms_norm as liger

    stock = liger.rms_norm_backward
    expected = ["dY", "X", "W", "RSTD", "offset", "casting_mode", "BLOCK_SIZE", "num_warps", "in_place", "row_mode",
                "needs_dw"]  # the arguments `backward` below takes
    if list(inspect.signature(stock).parameters) != expected:
        yield False
        return
    llama = liger._str_to_casting_mode["llama"]

    def backward(dY, X, W, RSTD, offset, casting_mode, BLOCK_SIZE, num_warps, in_place, row_mode, needs_dw=None):
        if not X.is_cuda or W is None or needs_dw is not False or casting_mode != llama:
            return stock(dY, X, W, RSTD, offset, casting_mode, BLOCK_SIZE, num_warps, in_place, row_mode, needs_dw)
        rows = dY.reshape(-1, dY.shape[-1])
        dx = rms_norm.input_grad(rows, X.reshape(rows.shape), W, RSTD, offset, out=rows if in_place is True else None)
        return dx.view(dY.shape), None

    liger.rms_norm_backward = backward
    try:
        yield True
    finally:
        liger.rms_norm_backward = stock


@contextlib.contextmanager
def prefill_kernels(core, on: bool):
    """While in the block, the language model's RMSNorms (q and k norms too), RoPE and SwiGLU run Liger's
    fused kernels, and transformers' own come back after: generation's prefill (`pigg.generation`), where
    the ~1,100 tokens of each of up to 128 rows make each unfused elementwise pass cost milliseconds. The
    decoding step, a CUDA graph of one token a row, keeps transformers' functions. Any forward that a
    module held of its own before (a training run's Liger patch) is put back as it was."""
    if not on:
        yield
        return
    from liger_kernel.ops import LigerRMSNormFunction
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    def rms_norm(module):
        return lambda x: LigerRMSNormFunction.apply(x, module.weight, module.variance_epsilon, 0.0, "llama", False,
                                                    None)

    norms = [m for m in core.model.language_model.modules() if isinstance(m, modeling_qwen3_vl.Qwen3VLTextRMSNorm)]
    own = [(m, m.__dict__.get("forward")) for m in norms]
    functions = [(modeling_qwen3_vl, "apply_rotary_pos_emb", liger_rotary_pos_emb)]
    if liger_swiglu(core.config.get_text_config()):
        functions.append((modeling_qwen3_vl.Qwen3VLTextMLP, "forward", swiglu))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in functions]
    for module in norms:
        module.forward = rms_norm(module)
    for owner, name, value in functions:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        for module, forward in own:
            if forward is None:
                del module.forward
            else:
                module.forward = forward
