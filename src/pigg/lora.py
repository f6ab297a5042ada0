"""LoRA adapters applied with fewer passes over memory while training.

PEFT applies an adapter op by op, y = base(x) + B(A(dropout(x))) * scale, and keeps for the backward
the dropped-out copy of every adapted layer's input with its mask: on the 8B 18 of the 60 bytes LoRA
keeps per token, layer and hidden unit (pigg.batching). It also scales and adds each adapter's output
in two passes of their own.

`fused_adapters` computes the same function while training, each adapted layer as one autograd node
(`AdaptedLinear`):
- it keeps the input x (q, k and v share it; so do gate and up), A's rank-wide output and the random
  generator's state, not the dropped-out copy; the backward draws the same mask again from that
  state, as activation checkpointing does;
- B, the scale and the sum are one `addmm_` into the base layer's output, and in the backward the
  adapter's input gradient is added into the base layer's in place: one autograd node a layer instead
  of one per op, and fewer kernels (the CPU launches every kernel of a step: README, Training speed).
Each mask is drawn by the same dropout from the same generator in the same order as PEFT's, so the
values are PEFT's up to the order of float rounding (tests/test_lora.py). On the 8B in an H100's
memory that leaves micro-batch 8 without recomputation: 9.35-10.00 samples/s on an H200 capped there,
against 8.85 with PEFT's adapters and 11 layers recomputed (README, sixth run). With `kernels` on a
GPU the dropout and A run in `pigg.lora_kernels` instead, which draw masks of the same keep
probability from the same generator, not the same masks (README, tenth run: 12.46 to 13.21 samples/s
on an H200). An input that PEFT would first cast to the adapters' float32 (the seed's
`train.lora_input_fp32`) goes to PEFT's forward, as does a layer whose base weights are trained.
"""
import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pigg import lora_kernels


class AdaptedLinear(torch.autograd.Function):
    """base(x) + scale * B(A(dropout(x, p))) for rows x, as one node of the autograd graph.

    The forward keeps x, A(dropout(x)) (rank columns) and the generator's state, not the dropped-out x;
    the backward puts the generator back where the forward found it, draws the same mask again, and
    adds the adapter's input gradient into the base layer's in place. B, the scale and the sum are one
    addmm_ forward.
    With `kernels` (and an input they take) dropout and A run in pigg.lora_kernels, which keep the
    mask's seed and counter for the backward instead of the generator's state.
    The base layer is frozen: its weight and bias get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, p, scale, kernels=False):
        ctx.kernels = kernels and lora_kernels.available(x)
        generator = _generator(x.device) if p > 0 and not ctx.kernels else None
        state = _state(generator) if generator is not None else None
        a_, b_ = a.to(x.dtype), b.to(x.dtype)  # A cast once here, not by each program of the kernels
        if ctx.kernels:  # the mask drawn inside the kernels
            ctx.draw = lora_kernels.draw(x) if p > 0 else (0, 0)
            hidden = lora_kernels.dropout_a(x, a_, p, *ctx.draw)
        else:
            hidden = F.linear(F.dropout(x, p, training=True) if generator is not None else x, a_)
        result = F.linear(x, weight, bias)
        result.addmm_(hidden, b_.t(), alpha=scale)
        ctx.p, ctx.scale, ctx.generator, ctx.state = p, scale, generator, state
        ctx.dtypes = a.dtype, b.dtype
        ctx.save_for_backward(x, weight, a_, b_, hidden)
        return result

    @staticmethod
    def backward(ctx, grad):
        x, weight, a_, b_, hidden = ctx.saved_tensors
        scale, grad_a, grad_b, grad_x = ctx.scale, None, None, None
        grad_hidden = torch.mm(grad, b_)  # without the scale, which each use below applies in a kernel it runs
        if ctx.needs_input_grad[4]:
            grad_b = _scaled(torch.mm(grad.t(), hidden), scale, ctx.dtypes[1])
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad, weight)
        if ctx.kernels:
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:  # A's gradient, and x's added into grad_x
                grad_a = lora_kernels.dropout_a_backward(x, grad_hidden, a_, ctx.p, scale, *ctx.draw, grad_x=grad_x)
                grad_a = grad_a.to(ctx.dtypes[0]) if ctx.needs_input_grad[3] else None
            return grad_x, None, None, grad_a, grad_b, None, None, None
        dropped = mask = None
        if ctx.generator is not None:
            now = _state(ctx.generator)
            _set_state(ctx.generator, ctx.state)
            dropped, mask = torch.native_dropout(x, ctx.p, True)  # F.dropout's kernel, and its draws
            _set_state(ctx.generator, now)
        if ctx.needs_input_grad[3]:
            grad_a = _scaled(torch.mm(grad_hidden.t(), x if dropped is None else dropped), scale, ctx.dtypes[0])
        if ctx.needs_input_grad[0]:
            if mask is None:
                grad_x.addmm_(grad_hidden, a_, alpha=scale)
            else:  # dropout's own backward (addcmul_ with the bool mask takes CUDA's slow mixed-dtype path)
                kept = 0.0 if ctx.p == 1 else scale / (1.0 - ctx.p)
                grad_x.add_(torch.ops.aten.native_dropout_backward(torch.mm(grad_hidden, a_), mask, kept))
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _scaled(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """t * scale in `dtype` (the adapter weight's), in one kernel."""
    if t.dtype == dtype:
        return t.mul_(scale)
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=dtype, device=t.device))


def _generator(device: torch.device) -> torch.Generator:
    return lora_kernels.cuda_generator(device) if device.type == "cuda" else torch.default_generator


def _state(generator: torch.Generator):
    """A CUDA generator's seed and offset (two numbers, no copy of its state), else the whole state."""
    if generator.device.type == "cuda":
        return generator.initial_seed(), generator.get_offset()
    return generator.get_state()


def _set_state(generator: torch.Generator, state) -> None:
    if generator.device.type != "cuda":
        generator.set_state(state)
        return
    seed, offset = state
    if generator.initial_seed() != seed:
        generator.manual_seed(seed)
    generator.set_offset(offset)


@dataclass(frozen=True)
class Adapter:
    """The modules and numbers of a layer's adapter, looked up once (a module's attributes cost
    microseconds each, and a step calls each of the 8B's 252 adapted layers once or twice)."""
    name: str
    base: nn.Linear
    a: nn.Linear
    b: nn.Linear
    dropout: float
    scale: float
    kernels: bool  # pigg.lora_kernels where they can take the input


def fused_forward(layer, adapter: Adapter, x, *args, **kwargs):
    """A PEFT `lora.Linear`'s forward with its one adapter fused; PEFT's own where the layer is merged,
    its adapters disabled or others active, the base layer trained, or PEFT would cast the input to the
    adapters' dtype first."""
    base = adapter.base
    if args or kwargs or layer.disable_adapters or layer.merged or layer.active_adapters != [adapter.name] \
            or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad) \
            or not _in_compute_dtype(layer, adapter, x):
        return type(layer).forward(layer, x, *args, **kwargs)
    p = adapter.dropout if layer.training else 0.0
    result = AdaptedLinear.apply(x.reshape(-1, x.shape[-1]), base.weight, base.bias, adapter.a.weight,
                                 adapter.b.weight, p, adapter.scale, adapter.kernels)
    return result.view(*x.shape[:-1], result.shape[-1])


def _in_compute_dtype(layer, adapter: Adapter, x) -> bool:
    """x is in the dtype the adapter computes in (autocast's, else the adapter's), as is the base layer,
    and PEFT would not cast it to the adapter's dtype first."""
    adapter_dtype = adapter.a.weight.dtype
    compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else adapter_dtype
    casts_input = getattr(layer, "cast_input_dtype_enabled", True) and x.dtype != adapter_dtype
    return x.dtype == compute == adapter.base.weight.dtype and not casts_input


def fusable_adapter(layer, kernels: bool = False) -> Adapter | None:
    """Plain LoRA on an nn.Linear: one adapter without biases or variant (DoRA, ...)."""
    if len(layer.lora_A) != 1 or getattr(layer, "lora_variant", None) or type(layer.base_layer) is not nn.Linear:
        return None
    name = next(iter(layer.lora_A))
    a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if a.bias is not None or b.bias is not None:
        return None
    return Adapter(name, layer.base_layer, a, b, dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
                   layer.scaling[name], kernels)


def adapted_layers(model) -> list:
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


@contextlib.contextmanager
def fused_adapters(model, on: bool, kernels: bool = False):
    """While in the block, the model's LoRA linear layers run `fused_forward`, with `pigg.lora_kernels`
    where asked and they can take the input; PEFT's forward after."""
    layers = []
    for layer in adapted_layers(model) if on else []:
        adapter = fusable_adapter(layer, kernels)
        if adapter is not None:
            layer.forward = functools.partial(fused_forward, layer, adapter)
            layers.append(layer)
    if layers:
        how = "in Triton kernels on a GPU, else " if kernels and lora_kernels.triton is not None else ""
        print(f"fused LoRA: {len(layers)} adapted layers (dropout masks drawn {how}again in the backward)")
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
