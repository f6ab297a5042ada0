"""LoRA adapters applied with fewer passes over memory while training.

PEFT applies an adapter op by op, y = base(x) + B(A(dropout(x))) * scale, and keeps for the backward
the dropped-out copy of every adapted layer's input with its mask: on the 8B 18 of the 60 bytes LoRA
keeps per token, layer and hidden unit (pigg.model.batch_plan). It also scales and adds each adapter's output
in two passes of their own.

`fused_adapters` computes the same function while training, each adapted layer as one autograd node
(`AdaptedLinears`), and the layers a module calls in turn on one input (q, k and v; gate and up:
`Siblings`) as one node:
- it keeps the input x, A's rank-wide output and the random generator's state, not the dropped-out
  copy; the backward draws the same mask again from that state, as activation checkpointing does;
- B, the scale and the sum are one `addmm_` into the base layer's output, and in the backward the
  adapters' input gradients are added into the base layers' in place, which the layers' matmuls sum
  into one tensor: one autograd node where PEFT has one per op, and fewer kernels (the CPU launches
  every kernel of a step, and must stay ahead of the GPU).
Each mask is drawn by the same dropout from the same generator in the same order as PEFT's, so the
values are PEFT's up to the order of float rounding (tests/test_lora.py). On the 8B the memory saved
lets an 80 GB card train micro-batch 8 without recomputing layers. With `kernels` on a GPU the dropout,
A and B's sum run in `pigg.fast.kernels.lora` instead, a node's adapters in one kernel each way, which
draw masks of the same keep probability from the same generator, not the same masks. An input that PEFT
would first cast to the adapters' float32 (the seed's `fast.lora_input_fp32`) goes to PEFT's
forward, as does a layer whose base weights are trained. What each saves: docs/performance.md.
"""
import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pigg.fast.kernels import lora as lora_kernels


class AdaptedLinears(torch.autograd.Function):
    """base_i(x) + scale * B_i(A_i(dropout_i(x, p))) for rows x and each of the layers i that take x (q,
    k and v; gate and up), as one node of the autograd graph: `apply(x, p, scale, kernels, *layers)`,
    each layer's weight, bias, A and B in turn, gives their outputs.

    The forward keeps x, A_i(dropout_i(x)) (rank columns) and the generator's state, not the dropped-out
    x; the backward puts the generator back where the forward found it, draws the same masks again in
    the same order, and adds the adapters' input gradients into the base layers' in place: x's gradient
    is one tensor the layers' matmuls add into, not one a layer summed after. B, the scale and the sum
    are one addmm_ forward.
    With `kernels` (and an input they take) dropout and A run in pigg.fast.kernels.lora, all layers' in one
    kernel each way, which keeps the masks' seed and counter for the backward instead of the
    generator's state; B's sum too (`lora_kernels.add_b`).
    The base layers are frozen: their weights and biases get no gradient; the adapters share p, scale
    and rank."""

    @staticmethod
    def forward(ctx, x, p, scale, kernels, *layers):
        weights, biases, a, b = layers[0::4], layers[1::4], layers[2::4], layers[3::4]
        count, rank = len(weights), a[0].shape[0]
        if any(t.shape[0] != rank for t in a):
            raise ValueError(f"adapters fused into one node need one rank (got {[t.shape[0] for t in a]})")
        ctx.kernels = kernels and lora_kernels.available(x)
        generator = _generator(x.device) if p > 0 and not ctx.kernels else None
        state = _state(generator) if generator is not None else None
        b_ = [t.to(x.dtype) for t in b]
        if ctx.kernels:  # the masks drawn inside the kernels; A cast once here, the layers' stacked
            a_ = [a[0].to(x.dtype) if count == 1 else torch.cat(a, out=x.new_empty(count * rank, a[0].shape[1]))]
            ctx.draw = lora_kernels.draw(x, count) if p > 0 else (0, 0)
            stacked = lora_kernels.dropout_a(x, a_[0], p, *ctx.draw, adapters=count)
            hidden = [stacked[:, i * rank:(i + 1) * rank] for i in range(count)]
        else:
            a_ = [t.to(x.dtype) for t in a]
            hidden = [F.linear(F.dropout(x, p, training=True) if generator is not None else x, t) for t in a_]
        results = []
        for weight, bias, h, b_i in zip(weights, biases, hidden, b_, strict=True):
            result = F.linear(x, weight, bias)
            if ctx.kernels:
                lora_kernels.add_b(result, h, b_i, scale)
            else:
                result.addmm_(h, b_i.t(), alpha=scale)
            results.append(result)
        ctx.p, ctx.scale, ctx.generator, ctx.state = p, scale, generator, state
        ctx.count, ctx.dtypes = count, [(t.dtype, u.dtype) for t, u in zip(a, b, strict=True)]
        ctx.save_for_backward(x, *weights, *b_, *hidden, *a_)
        return tuple(results)

    @staticmethod
    def backward(ctx, *grads):
        count, scale = ctx.count, ctx.scale
        x, *saved = ctx.saved_tensors
        weights, b_, hidden, a_ = saved[:count], saved[count:2 * count], saved[2 * count:3 * count], saved[3 * count:]
        needs_x, needs_a = ctx.needs_input_grad[0], [ctx.needs_input_grad[4 + 4 * i + 2] for i in range(count)]
        grad_a, grad_b, grad_x = [None] * count, [None] * count, None
        # without the scale, which each use below applies in a kernel it runs
        grad_hidden = [torch.mm(grad, t) for grad, t in zip(grads, b_, strict=True)]
        for i in range(count):
            if ctx.needs_input_grad[4 + 4 * i + 3]:
                grad_b[i] = _scaled(torch.mm(grads[i].t(), hidden[i]), scale, ctx.dtypes[i][1])
        if needs_x:
            grad_x = torch.mm(grads[0], weights[0])
            for grad, weight in zip(grads[1:], weights[1:], strict=True):
                grad_x.addmm_(grad, weight)
        if ctx.kernels:
            if needs_x or any(needs_a):  # A's gradients, and x's added into grad_x
                stacked = lora_kernels.dropout_a_backward(
                    x, grad_hidden[0] if count == 1 else torch.cat(grad_hidden, 1), a_[0], ctx.p, scale,
                    *ctx.draw, grad_x=grad_x, adapters=count)
                grad_a = [t.to(dtype) if needs else None
                          for t, needs, (dtype, _) in zip(stacked.split(a_[0].shape[0] // count), needs_a,
                                                          ctx.dtypes, strict=True)]
            return grad_x, None, None, None, *_layer_grads(grad_a, grad_b)
        if ctx.generator is not None:
            now = _state(ctx.generator)
            _set_state(ctx.generator, ctx.state)
        for i, a_i in enumerate(a_):
            # each mask drawn again in the forward's order: F.dropout's kernel, and its draws
            dropped, mask = torch.native_dropout(x, ctx.p, True) if ctx.generator is not None else (None, None)
            if needs_a[i]:
                grad_a[i] = _scaled(torch.mm(grad_hidden[i].t(), x if dropped is None else dropped), scale,
                                    ctx.dtypes[i][0])
            if not needs_x:
                continue
            if mask is None:
                grad_x.addmm_(grad_hidden[i], a_i, alpha=scale)
            else:  # dropout's own backward (addcmul_ with the bool mask takes CUDA's slow mixed-dtype path)
                kept = 0.0 if ctx.p == 1 else scale / (1.0 - ctx.p)
                grad_x.add_(torch.ops.aten.native_dropout_backward(torch.mm(grad_hidden[i], a_i), mask, kept))
        if ctx.generator is not None:
            _set_state(ctx.generator, now)
        return grad_x, None, None, None, *_layer_grads(grad_a, grad_b)


def _layer_grads(grad_a: list, grad_b: list) -> list:
    """The gradients for `AdaptedLinears`'s layers' weight, bias, A and B in turn: the base layers' none."""
    return [g for pair in zip(grad_a, grad_b, strict=True) for g in (None, None, *pair)]


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
    kernels: bool  # pigg.fast.kernels.lora where they can take the input


def fused_forward(layer, adapter: Adapter, x, *args, **kwargs):
    """A PEFT `lora.Linear`'s forward with its one adapter fused; PEFT's own where the layer is merged,
    its adapters disabled or others active, the base layer trained, or PEFT would cast the input to the
    adapters' dtype first."""
    if args or kwargs or not _fusable(layer, adapter, x):
        return type(layer).forward(layer, x, *args, **kwargs)
    return _apply(((layer, adapter),), x)[0]


def _fusable(layer, adapter: Adapter, x) -> bool:
    base = adapter.base
    return not (layer.disable_adapters or layer.merged or layer.active_adapters != [adapter.name]
                or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
                or not _in_compute_dtype(layer, adapter, x))


def _apply(members, x) -> list:
    """The outputs of the (layer, adapter) pairs on x, as one `AdaptedLinears` node."""
    layer, adapter = members[0]
    p = adapter.dropout if layer.training else 0.0
    weights = [t for _, a in members for t in (a.base.weight, a.base.bias, a.a.weight, a.b.weight)]
    results = AdaptedLinears.apply(x.reshape(-1, x.shape[-1]), p, adapter.scale, adapter.kernels, *weights)
    return [result.view(*x.shape[:-1], result.shape[-1]) for result in results]


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # a module's layers that take one x, in turn


class Siblings:
    """Adapted layers of one module that it calls in turn on the same input (attention's q, k and v; the
    MLP's gate and up). The first one's call computes all their outputs as one `AdaptedLinears` node,
    and the others' calls with that same x take theirs: x's gradient is summed by their matmuls and one
    kernel, not by autograd adding one layer's to another's (3 passes over it a decoder layer)."""

    def __init__(self, members: list):
        self.members = members
        self.x, self.pending = None, {}

    def forward(self, index: int, x, *args, **kwargs):
        layer, adapter = self.members[index]
        if index and x is self.x and index in self.pending:
            result = self.pending.pop(index)
            if not self.pending:
                self.x = None
            return result
        if index or args or kwargs or any(not _fusable(m, a, x) or m.training != layer.training
                                          for m, a in self.members):
            return fused_forward(layer, adapter, x, *args, **kwargs)
        results = _apply(self.members, x)
        self.x, self.pending = x, dict(enumerate(results[1:], 1))
        return results[0]


def siblings(model, layers: dict) -> list[Siblings]:
    """The `SIBLINGS` of the model whose adapters can be one node: the same dropout, scale, rank, input
    width and kernels. `layers` maps each fusable layer to its adapter."""
    names = {module: name for name, module in model.named_modules()}
    by_parent = {}
    for layer, adapter in layers.items():
        parent, _, attribute = names[layer].rpartition(".")
        by_parent.setdefault(parent, {})[attribute] = layer, adapter
    found = []
    for children in by_parent.values():
        for group in SIBLINGS:
            members = [children.get(name) for name in group]
            if None in members:
                continue
            shared = {(a.dropout, a.scale, a.a.weight.shape, a.kernels) for _, a in members}
            if len(shared) == 1:
                found.append(Siblings(members))
    return found


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
    """While in the block, the model's LoRA linear layers run `fused_forward` (`Siblings` as one node),
    with `pigg.fast.kernels.lora` where asked and they can take the input; PEFT's forward after."""
    layers = {}
    for layer in adapted_layers(model) if on else []:
        adapter = fusable_adapter(layer, kernels)
        if adapter is not None:
            layer.forward = functools.partial(fused_forward, layer, adapter)
            layers[layer] = adapter
    groups = siblings(model, layers)
    for group in groups:
        for index, (layer, _) in enumerate(group.members):
            layer.forward = functools.partial(group.forward, index)
    if layers:
        how = "in Triton kernels on a GPU, else " if kernels and lora_kernels.triton is not None else ""
        grouped = sum(len(group.members) for group in groups)
        print(f"fused LoRA: {len(layers)} adapted layers, {grouped} of them as {len(groups)} nodes of layers that "
              f"take the same input (dropout masks drawn {how}again in the backward)")
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
