"""How an effective batch is split: micro-batch x accumulation x processes, and checkpointing.

The seed trains 8 samples per optimizer step (batch 1, accumulation 8). pigg keeps that effective
batch and, unless told otherwise, picks the largest micro-batch the GPU's memory holds: larger
micro-batches keep the GPU busy, and pigg's loss keeps the seed's normalisation (each sample's token
mean, averaged over the optimizer step), so the mathematics do not change (tests/test_batching.py).

The memory model is deliberately simple and calibrated on measurements of the 8B model on an H100
(bench/results/train_throughput_h100_part*.json): weights and optimizer state from the parameters
themselves, and activations proportional to tokens x layers x hidden size.
"""
import os
from dataclasses import dataclass

GiB = 1024 ** 3
# Activation bytes per token, per layer, per hidden unit. Without checkpointing: 52.7-56.6 GiB peak
# for LoRA micro-batch 4 x 1,054 tokens (16.7 GiB of weights and adapter state); with checkpointing:
# 17.6 GiB at micro-batch 1. Rounded up for safety.
ACTIVATION_BYTES = {False: 72, True: 8}
HEADROOM = 2 * GiB  # CUDA context, allocator fragmentation, the frozen vision forward
USABLE = 0.92  # of the device's memory


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    grad_accum: int
    world_size: int
    gradient_checkpointing: bool
    why: str

    @property
    def effective(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def describe(self) -> str:
        return (f"batch plan: {self.effective} samples per optimizer step = micro-batch {self.micro_batch} x "
                f"accumulation {self.grad_accum} x {self.world_size} process(es); activation checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'} ({self.why})")


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


def activation_bytes(text_config, tokens: int, checkpointing: bool) -> int:
    return ACTIVATION_BYTES[checkpointing] * tokens * text_config.num_hidden_layers * text_config.hidden_size


def estimate_peak(model, text_config, micro_batch: int, tokens_per_sample: int, checkpointing: bool,
                  shards: int = 1) -> int:
    return (static_bytes(model, shards) + HEADROOM
            + activation_bytes(text_config, micro_batch * tokens_per_sample, checkpointing))


def plan_batch(train_cfg, world: int, device_memory: int | None, estimate=None) -> BatchPlan:
    """Split `train_cfg.effective_batch` over `world` processes.

    `train_cfg.batch_size` / `grad_accum` / `gradient_checkpointing` left as None are chosen here:
    on a GPU (`device_memory` known) the first of these that `estimate(micro_batch, checkpointing)`
    fits in memory: the largest micro-batch of at least 4 (or the whole per-process batch) without
    checkpointing, else the largest micro-batch with it; on CPU micro-batch 1 without checkpointing.
    """
    t = train_cfg
    if t.grad_accum is not None:  # the seed's way of saying it: batch x accumulation (x processes)
        micro = t.batch_size or 1
        return BatchPlan(micro, t.grad_accum, world, _checkpointing(t, micro, estimate, device_memory),
                         "train.grad_accum given: the effective batch is batch x accumulation x processes")
    if t.effective_batch % world:
        raise ValueError(f"train.effective_batch {t.effective_batch} is not divisible by the {world} processes")
    per_process = t.effective_batch // world
    if t.batch_size is not None:
        if per_process % t.batch_size:
            raise ValueError(f"train.batch_size {t.batch_size} does not divide the {per_process} samples each of the "
                             f"{world} process(es) takes per step (train.effective_batch {t.effective_batch})")
        ckpt = _checkpointing(t, t.batch_size, estimate, device_memory)
        why = "train.batch_size given"
        return BatchPlan(t.batch_size, per_process // t.batch_size, world, ckpt, why)
    if device_memory is None:
        return BatchPlan(1, per_process, world, _checkpointing(t, 1, estimate, None), "no GPU: micro-batch 1")
    sizes = [b for b in range(per_process, 0, -1) if per_process % b == 0]
    if t.gradient_checkpointing is None:  # prefer no recomputation at a micro-batch that fills the GPU
        candidates = [(b, False) for b in sizes if b >= min(4, per_process)] + [(b, True) for b in sizes]
    else:
        candidates = [(b, t.gradient_checkpointing) for b in sizes]
    for b, c in candidates:
        if _fits(estimate, b, c, device_memory):
            need = estimate(b, c) / GiB
            return BatchPlan(b, per_process // b, world, c,
                             f"estimated peak {need:.1f} of {device_memory / GiB:.1f} GiB")
    b, c = 1, True if t.gradient_checkpointing is None else t.gradient_checkpointing
    return BatchPlan(b, per_process, world, c,
                     f"estimated peak {estimate(b, c) / GiB:.1f} GiB exceeds {device_memory / GiB:.1f} GiB even at "
                     "micro-batch 1 with checkpointing; trying anyway")


def _checkpointing(t, micro_batch: int, estimate, device_memory: int | None) -> bool:
    if t.gradient_checkpointing is not None:
        return t.gradient_checkpointing
    return device_memory is not None and not _fits(estimate, micro_batch, False, device_memory)


def _fits(estimate, micro_batch: int, checkpointing: bool, device_memory: int) -> bool:
    return estimate(micro_batch, checkpointing) <= USABLE * device_memory
