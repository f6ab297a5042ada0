"""How an effective batch is split: micro-batch x accumulation x processes, and checkpointing.

The seed trains 8 samples per optimizer step (batch 1, accumulation 8). pigg keeps that effective
batch and, unless told otherwise, picks the largest micro-batch the GPU's memory holds: larger
micro-batches keep the GPU busy, and pigg's loss keeps the seed's normalisation (each sample's token
mean, averaged over the optimizer step), so the mathematics do not change (tests/test_batching.py).

Activation checkpointing is chosen per decoder layer: when a micro-batch needs it, only as many layers
recompute their activations as it takes to fit, not all 36. A LoRA step's small kernels leave the GPU
waiting on the CPU at small micro-batches, and recomputing a layer costs about a percent of a step, so
doubling the micro-batch pays for some recomputation: LoRA takes the largest micro-batch that fits with
at most a third of the layers recomputed. Full fine-tuning's larger matmuls keep the GPU busy from
micro-batch 4, so it recomputes only where no micro-batch of 4 or more fits without. The measurements
behind both rules are in docs/log.md (2026-12-02); bench/train_throughput.py's `pigg_default_lora_mb4`
and `pigg_default_lora_mb8_checkpointing` rerun them.

The memory model is fitted to the 8B's measured peaks (tests/test_batching.py lists them): weights and
optimizer state from the parameters themselves, and activations proportional to tokens x layers x
hidden size.
"""
from dataclasses import dataclass

import torch

from pigg import config as C
from pigg.model.loading import device, unwrapped

GiB = 1024 ** 3
# Activation bytes kept per token, per decoder layer, per hidden unit, fitted to the 8B's peaks
# (tests/test_batching.py lists them): 44 for a layer that keeps its activations (full FT; 42 for LoRA
# without dropout), 60 for LoRA with PEFT's dropout (the dropped inputs and masks the adapters keep for
# the backward; pigg.fast.lora's fused adapters keep neither), 3 for a recomputed layer (its input), and
# 1.4 GiB besides. Rounded up for safety: 48, 48 + 16, 4 and HEADROOM. Liger's SwiGLU keeps the MLP's
# gate and up projections only, not also the SiLU of the gate: 6 bytes less (12,288 bf16 values a token,
# over 4,096 hidden units). With it LoRA measured 54 with PEFT's dropout and 37 with the fused adapters.
KEPT_BYTES = 48
DROPOUT_BYTES = 16
SWIGLU_BYTES = 6
RECOMPUTED_BYTES = 4
# How many of the decoder layers a larger micro-batch may recompute, by method (see above).
RECOMPUTE_FOR_LARGER_MICRO_BATCH = {"lora": 1 / 3, "full": 0}
HEADROOM = 2 * GiB  # CUDA context, allocator fragmentation, the frozen vision forward
USABLE = 0.92  # of the device's memory


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    grad_accum: int
    world_size: int
    checkpointed_layers: int  # decoder layers whose activations are recomputed in the backward pass
    layers: int  # decoder layers of the language model
    why: str

    @property
    def effective(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def gradient_checkpointing(self) -> bool:
        return self.checkpointed_layers > 0

    def describe(self) -> str:
        if not self.checkpointed_layers:
            checkpointing = "off"
        elif self.checkpointed_layers == self.layers:
            checkpointing = f"on all {self.layers} decoder layers"
        else:
            checkpointing = f"on {self.checkpointed_layers} of {self.layers} decoder layers"
        return (f"batch plan: {self.effective} samples per optimizer step = micro-batch {self.micro_batch} x "
                f"accumulation {self.grad_accum} x {self.world_size} process(es); activation checkpointing "
                f"{checkpointing} ({self.why})")


def static_bytes(model, shards: int = 1) -> int:
    """Weights, plus gradients and AdamW's two moments for every trainable parameter; FSDP keeps
    1/`shards` of each on a GPU."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (weights + 3 * gradient_bytes(model)) // shards


def gradient_bytes(model, shards: int = 1) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) // shards


def estimator(model, text_config, tokens_per_sample: int, shards: int = 1, keeps_dropped_inputs: bool = True,
              liger_swiglu: bool = False):
    """`estimate(micro_batch, checkpointed_layers, accumulation)`: the peak bytes a training step needs
    on one GPU. `keeps_dropped_inputs`: LoRA's adapters keep their dropped-out inputs for the backward
    (PEFT's forward; pigg.fast.lora's fused one draws the masks again instead). `liger_swiglu`: the MLP runs
    Liger's SiLU-and-product kernel."""
    static, grads = static_bytes(model, shards) + HEADROOM, gradient_bytes(model, shards)
    dropout = any(getattr(m, "p", 0) > 0 for name, m in model.named_modules() if name.endswith("lora_dropout.default"))
    kept = (KEPT_BYTES + (DROPOUT_BYTES if dropout and keeps_dropped_inputs else 0)
            - (SWIGLU_BYTES if liger_swiglu else 0))
    layers = text_config.num_hidden_layers
    units = tokens_per_sample * text_config.hidden_size  # of one sample in one layer

    def estimate(micro_batch: int, checkpointed_layers: int, accumulation: int) -> int:
        per_unit = kept * (layers - checkpointed_layers) + RECOMPUTED_BYTES * checkpointed_layers
        activations = per_unit * micro_batch * units
        if accumulation > 1:  # the earlier micro-batches' gradients are held through each backward
            return static + activations
        # one micro-batch a step: its backward makes the gradients as it frees the activations, and
        # the optimizer step holds them all
        return static - grads + max(grads, activations)

    return estimate


def plan_batch(train_cfg, world: int, device_memory: int | None, estimate=None, layers: int = 1) -> BatchPlan:
    """Split `train_cfg.effective_batch` over `world` processes.

    `train_cfg.batch_size` / `grad_accum` / `gradient_checkpointing` left as None are chosen here:
    on a GPU (`device_memory` known) from `estimate(micro_batch, checkpointed_layers, accumulation)`,
    the first that fits of: the largest micro-batch of at least 4 (or the whole per-process batch)
    with no more of the `layers` decoder layers recomputed than the method allows for it
    (RECOMPUTE_FOR_LARGER_MICRO_BATCH); the largest micro-batch with as few layers recomputed as it
    needs. On CPU micro-batch 1 without checkpointing. A given `gradient_checkpointing` means all
    layers or none.
    """
    t = train_cfg
    if t.grad_accum is not None:  # the seed's way of saying it: batch x accumulation (x processes)
        micro = t.batch_size or 1
        recomputed = _checkpointed(t, micro, t.grad_accum, estimate, device_memory, layers)
        return BatchPlan(micro, t.grad_accum, world, recomputed, layers,
                         "train.grad_accum given: the effective batch is batch x accumulation x processes")
    if t.effective_batch % world:
        raise ValueError(f"train.effective_batch {t.effective_batch} is not divisible by the {world} processes")
    per_process = t.effective_batch // world
    if t.batch_size is not None:
        if per_process % t.batch_size:
            raise ValueError(f"train.batch_size {t.batch_size} does not divide the {per_process} samples each of the "
                             f"{world} process(es) takes per step (train.effective_batch {t.effective_batch})")
        accumulation = per_process // t.batch_size
        recomputed = _checkpointed(t, t.batch_size, accumulation, estimate, device_memory, layers)
        return BatchPlan(t.batch_size, accumulation, world, recomputed, layers,
                         "train.batch_size given")
    if device_memory is None:
        return BatchPlan(1, per_process, world, _checkpointed(t, 1, per_process, estimate, None, layers), layers,
                         "no GPU: micro-batch 1")
    sizes = [b for b in range(per_process, 0, -1) if per_process % b == 0]
    if t.gradient_checkpointing is None:  # a micro-batch that fills the GPU, with little or no recomputation
        allowed = int(layers * RECOMPUTE_FOR_LARGER_MICRO_BATCH[t.method])
        candidates = [(b, range(allowed + 1)) for b in sizes if b >= min(4, per_process)]
        candidates += [(b, range(1, layers + 1)) for b in sizes]
    else:
        candidates = [(b, [layers if t.gradient_checkpointing else 0]) for b in sizes]
    for b, choices in candidates:
        recomputed = _fewest_that_fit(estimate, b, per_process // b, choices, device_memory)
        if recomputed is not None:
            need = estimate(b, recomputed, per_process // b) / GiB
            return BatchPlan(b, per_process // b, world, recomputed, layers,
                             f"estimated peak {need:.1f} of {device_memory / GiB:.1f} GiB")
    recomputed = 0 if t.gradient_checkpointing is False else layers
    need = estimate(1, recomputed, per_process) / GiB
    return BatchPlan(1, per_process, world, recomputed, layers,
                     f"estimated peak {need:.1f} GiB exceeds {device_memory / GiB:.1f} GiB even at micro-batch 1; "
                     "trying anyway")


def _checkpointed(t, micro_batch: int, accumulation: int, estimate, device_memory: int | None, layers: int) -> int:
    """Decoder layers to recompute at a given micro-batch: all or none when the setting says so, else as
    few as fit (none on CPU)."""
    if t.gradient_checkpointing is not None:
        return layers if t.gradient_checkpointing else 0
    if device_memory is None:
        return 0
    fewest = _fewest_that_fit(estimate, micro_batch, accumulation, range(layers + 1), device_memory)
    return layers if fewest is None else fewest


def _fewest_that_fit(estimate, micro_batch: int, accumulation: int, choices, device_memory: int) -> int | None:
    """The first count of recomputed layers in `choices` at which the micro-batch fits, or None."""
    return next((k for k in choices if estimate(micro_batch, k, accumulation) <= USABLE * device_memory), None)


def batch_plan(cfg, model, tokens_per_sample: int) -> BatchPlan:
    """Micro-batch, accumulation and checkpointing for this run (chosen from GPU memory where not given)."""
    from pigg.distributed import strategy, world_size
    from pigg.fast import fuse_adapters
    from pigg.fast.liger import liger_swiglu, use_liger

    train_cfg, fast = cfg.train, cfg.fast
    text_config = model.config.get_text_config()
    shards = world_size() if strategy(train_cfg, world_size()) == "fsdp" else 1
    swiglu = use_liger(fast.liger_kernel, fast.torch_compile) and liger_swiglu(text_config)
    padded = -(-tokens_per_sample // fast.pad_to_multiple) * fast.pad_to_multiple  # the longest row
    estimate = estimator(model, text_config, padded, shards,
                         keeps_dropped_inputs=not fuse_adapters(fast), liger_swiglu=swiglu)
    return plan_batch(train_cfg, world_size(), gpu_memory(train_cfg), estimate, text_config.num_hidden_layers)


def gpu_memory(train_cfg) -> int | None:
    """Bytes of the GPU this process may use (None on CPU). With `train.gpu_memory_gib` PyTorch's
    allocator is capped there too, so that a run planned for less memory cannot use more."""
    if device() != "cuda":
        return None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if train_cfg.gpu_memory_gib is None:
        return total
    cap = int(train_cfg.gpu_memory_gib * GiB)
    if cap > total:
        raise C.ConfigError(f"train.gpu_memory_gib {train_cfg.gpu_memory_gib} exceeds this GPU's {total / GiB:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap / total)
    return cap


def checkpoint_layers(model, count: int) -> None:
    """Recompute the activations of the first `count` decoder layers in the backward pass (all of them
    when `count` is the number of layers); the other layers keep theirs."""
    # transformers 5.24 renamed it (the old name still works there, with a warning)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    for i, layer in enumerate(unwrapped(model).model.language_model.layers):
        layer.gradient_checkpointing = i < count
