"""LoRA adapters applied with fewer passes over memory while training.

PEFT applies an adapter op by op, y = base(x) + B(A(dropout(x))) * scale, and keeps for the backward
the dropped-out copy of every adapted layer's input with its mask: on the 8B 18 of the 60 bytes LoRA
keeps per token, layer and hidden unit (pigg.batching). It also scales and adds each adapter's output
in two passes of their own.

`fused_adapters` computes the same function while training:
- dropout and A in one autograd function that keeps the input x (q, k and v share it; so do gate and
  up) and the random generator's state, not the dropped-out copy; the backward draws the same mask
  again from that state, as activation checkpointing does;
- B, the scale and the sum in one `addmm_` into the base layer's output.
Each mask is drawn by the same dropout from the same generator in the same order as PEFT's, so the
values are PEFT's up to the order of float rounding (tests/test_lora.py). On the 8B in an H100's
memory that leaves micro-batch 8 without recomputation: 9.35-10.00 samples/s on an H200 capped there,
against 8.85 with PEFT's adapters and 11 layers recomputed (README, Measured). An input that PEFT
would first cast to the adapters' float32 (the seed's `train.lora_input_fp32`) goes to PEFT's forward.
"""
import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class DropoutThenLinear(torch.autograd.Function):
    """dropout(x, p) @ weight.T, keeping x and the generator's state instead of the dropped-out x."""

    @staticmethod
    def forward(ctx, x, weight, p):
        ctx.p, ctx.rng = p, _rng_state(x.device)
        ctx.save_for_backward(x, weight)
        return F.linear(F.dropout(x, p, training=True), weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        cuda = x.device.type == "cuda"
        with torch.random.fork_rng(devices=[x.device] if cuda else [], device_type="cuda"):
            _set_rng_state(x.device, ctx.rng)
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(ctx.needs_input_grad[0])
                dropped = F.dropout(leaf, ctx.p, training=True)
        grad_x = torch.autograd.grad(dropped, leaf, grad @ weight)[0] if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ dropped.detach() if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


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


def fused_forward(layer, adapter: Adapter, x, *args, **kwargs):
    """A PEFT `lora.Linear`'s forward with its one adapter fused; PEFT's own where the layer is merged,
    its adapters disabled or others active, or PEFT would cast the input to the adapters' dtype first."""
    if args or kwargs or layer.disable_adapters or layer.merged or layer.active_adapters != [adapter.name] \
            or not _in_compute_dtype(layer, adapter, x):
        return type(layer).forward(layer, x, *args, **kwargs)
    rows = x.reshape(-1, x.shape[-1])
    result = adapter.base(rows)  # 2-D, so that the in-place sum below needs no view's bookkeeping
    weight_a = adapter.a.weight.to(result.dtype)
    p = adapter.dropout if layer.training else 0.0
    hidden = DropoutThenLinear.apply(rows, weight_a, p) if p > 0 else F.linear(rows, weight_a)
    result.addmm_(hidden, adapter.b.weight.to(result.dtype).t(), alpha=adapter.scale)
    return result.view(*x.shape[:-1], result.shape[-1])


def _in_compute_dtype(layer, adapter: Adapter, x) -> bool:
    """x is in the dtype the adapter computes in (autocast's, else the adapter's), as is the base layer,
    and PEFT would not cast it to the adapter's dtype first."""
    adapter_dtype = adapter.a.weight.dtype
    compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else adapter_dtype
    casts_input = getattr(layer, "cast_input_dtype_enabled", True) and x.dtype != adapter_dtype
    return x.dtype == compute == adapter.base.weight.dtype and not casts_input


def fusable_adapter(layer) -> Adapter | None:
    """Plain LoRA on an nn.Linear: one adapter without biases or variant (DoRA, ...)."""
    if len(layer.lora_A) != 1 or getattr(layer, "lora_variant", None) or type(layer.base_layer) is not nn.Linear:
        return None
    name = next(iter(layer.lora_A))
    a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if a.bias is not None or b.bias is not None:
        return None
    return Adapter(name, layer.base_layer, a, b, dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
                   layer.scaling[name])


def adapted_layers(model) -> list:
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


@contextlib.contextmanager
def fused_adapters(model, on: bool):
    """While in the block, the model's LoRA linear layers run `fused_forward`; PEFT's after."""
    layers = []
    for layer in adapted_layers(model) if on else []:
        adapter = fusable_adapter(layer)
        if adapter is not None:
            layer.forward = functools.partial(fused_forward, layer, adapter)
            layers.append(layer)
    if layers:
        print(f"fused LoRA: {len(layers)} adapted layers (dropout masks drawn again in the backward)")
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
