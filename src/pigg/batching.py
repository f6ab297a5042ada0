"""How an effective batch is split: micro-batch x accumulation x processes, and checkpointing.

The seed trains 8 samples per optimizer step (batch 1, accumulation 8). pigg keeps that effective
batch and, unless told otherwise, picks the largest micro-batch the GPU's memory holds: larger
micro-batches keep the GPU busy, and pigg's loss keeps the seed's normalisation (each sample's token
mean, averaged over the optimizer step), so the mathematics do not change (tests/test_batching.py).

Activation checkpointing is chosen per decoder layer: when a micro-batch needs it, only as many layers
recompute their activations as it takes to fit, not all 36 (each recomputed layer costs ~1.2% of a
LoRA step). Measured on an H200 (8B, bench/results/train_throughput_h200_part*.json): LoRA micro-batch
8 trains at 10.01 samples/s against 7.99 for 4 x 2, but planned for an H100's 79.2 GiB micro-batch 8
needs 15 of 36 layers recomputed and then trains at 8.10 (+1%); full fine-tuning at micro-batch 8 with
10 layers recomputed trains at 8.33 against 8.51 for 4 x 2 without. So a micro-batch of at least 4
that fits without recomputation is still preferred to a larger one that needs some.

The memory model is deliberately simple and calibrated on measurements of the 8B model on an H100
(bench/results/train_throughput_h100_part*.json): weights and optimizer state from the parameters
themselves, and activations proportional to tokens x layers x hidden size.
"""
import os
from dataclasses import dataclass

GiB = 1024 ** 3
# Activation bytes per token, per layer, per hidden unit. Without checkpointing: 52.7-56.6 GiB peak
# for LoRA micro-batch 4 x 1,054 tokens (16.7 GiB of weights and adapter state), 87.5 at micro-batch 8
# (H200); with checkpointing: 17.6 GiB at micro-batch 1. Rounded up for safety.
ACTIVATION_BYTES = {False: 72, True: 8}
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


def world_size(env=os.environ) -> int:
    return int(env.get("WORLD_SIZE", "1"))


def static_bytes(model, shards: int = 1) -> int:
    """Weights, plus gradients and AdamW's two moments for every trainable parameter; FSDP keeps
    1/`shards` of each on a GPU."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if p.requires_grad:
            total += 3 * p.numel() * p.element_size()
    return total // shards


def activation_bytes(text_config, tokens: int, checkpointed_layers: int) -> int:
    kept = text_config.num_hidden_layers - checkpointed_layers
    per_unit = ACTIVATION_BYTES[False] * kept + ACTIVATION_BYTES[True] * checkpointed_layers
    return per_unit * tokens * text_config.hidden_size


def estimate_peak(model, text_config, micro_batch: int, tokens_per_sample: int, checkpointed_layers: int,
                  shards: int = 1) -> int:
    return (static_bytes(model, shards) + HEADROOM
            + activation_bytes(text_config, micro_batch * tokens_per_sample, checkpointed_layers))


def plan_batch(train_cfg, world: int, device_memory: int | None, estimate=None, layers: int = 1) -> BatchPlan:
    """Split `train_cfg.effective_batch` over `world` processes.

    `train_cfg.batch_size` / `grad_accum` / `gradient_checkpointing` left as None are chosen here:
    on a GPU (`device_memory` known) from `estimate(micro_batch, checkpointed_layers)`, the first that
    fits of: the largest micro-batch of at least 4 (or the whole per-process batch) without
    recomputation; the largest micro-batch with as few of the `layers` decoder layers recomputed as it
    needs. On CPU micro-batch 1 without checkpointing. A given `gradient_checkpointing` means all layers
    or none.
    """
    t = train_cfg
    if t.grad_accum is not None:  # the seed's way of saying it: batch x accumulation (x processes)
        micro = t.batch_size or 1
        return BatchPlan(micro, t.grad_accum, world, _checkpointed(t, micro, estimate, device_memory, layers), layers,
                         "train.grad_accum given: the effective batch is batch x accumulation x processes")
    if t.effective_batch % world:
        raise ValueError(f"train.effective_batch {t.effective_batch} is not divisible by the {world} processes")
    per_process = t.effective_batch // world
    if t.batch_size is not None:
        if per_process % t.batch_size:
            raise ValueError(f"train.batch_size {t.batch_size} does not divide the {per_process} samples each of the "
                             f"{world} process(es) takes per step (train.effective_batch {t.effective_batch})")
        recomputed = _checkpointed(t, t.batch_size, estimate, device_memory, layers)
        return BatchPlan(t.batch_size, per_process // t.batch_size, world, recomputed, layers,
                         "train.batch_size given")
    if device_memory is None:
        return BatchPlan(1, per_process, world, _checkpointed(t, 1, estimate, None, layers), layers,
                         "no GPU: micro-batch 1")
    sizes = [b for b in range(per_process, 0, -1) if per_process % b == 0]
    if t.gradient_checkpointing is None:  # prefer no recomputation at a micro-batch that fills the GPU
        candidates = [(b, [0]) for b in sizes if b >= min(4, per_process)]
        candidates += [(b, range(1, layers + 1)) for b in sizes]
    else:
        candidates = [(b, [layers if t.gradient_checkpointing else 0]) for b in sizes]
    for b, choices in candidates:
        recomputed = _fewest_that_fit(estimate, b, choices, device_memory)
        if recomputed is not None:
            need = estimate(b, recomputed) / GiB
            return BatchPlan(b, per_process // b, world, recomputed, layers,
                             f"estimated peak {need:.1f} of {device_memory / GiB:.1f} GiB")
    recomputed = 0 if t.gradient_checkpointing is False else layers
    return BatchPlan(1, per_process, world, recomputed, layers,
                     f"estimated peak {estimate(1, recomputed) / GiB:.1f} GiB exceeds {device_memory / GiB:.1f} GiB "
                     "even at micro-batch 1; trying anyway")


def _checkpointed(t, micro_batch: int, estimate, device_memory: int | None, layers: int) -> int:
    """Decoder layers to recompute at a given micro-batch: all or none when the setting says so, else as
    few as fit (none on CPU)."""
    if t.gradient_checkpointing is not None:
        return layers if t.gradient_checkpointing else 0
    if device_memory is None:
        return 0
    fewest = _fewest_that_fit(estimate, micro_batch, range(layers + 1), device_memory)
    return layers if fewest is None else fewest


def _fewest_that_fit(estimate, micro_batch: int, choices, device_memory: int) -> int | None:
    """The first count of recomputed layers in `choices` at which the micro-batch fits, or None."""
    return next((k for k in choices if estimate(micro_batch, k) <= USABLE * device_memory), None)
