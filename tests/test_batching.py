"""Micro-batch / accumulation / process arithmetic, the memory model, and that a larger micro-batch
is the same mathematics as the seed's batch 1 x accumulation 8."""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import losses, tiny_run_config
from pigg import config as C
from pigg.model.batch_plan import GiB, estimator, plan_batch
from pigg.train import train


def settings(**kw):
    t = C.TrainConfig()  # LoRA unless method= says otherwise
    for k, v in kw.items():
        setattr(t, k, v)
    return t


LAYERS = 36


def linear_estimate(static_gib, per_sample_gib, ckpt_per_sample_gib, grads_gib=0.0):
    """Peak for micro-batch b with k of the 36 layers recomputed and accumulation a, in the estimator's form."""
    def estimate(b, k, a):
        activations = b * (per_sample_gib * (LAYERS - k) + ckpt_per_sample_gib * k) / LAYERS
        return (static_gib + activations if a > 1 else static_gib - grads_gib + max(grads_gib, activations)) * GiB
    return estimate


H100 = 79.2 * GiB
# the memory model's numbers for the 8B at ~1,054 tokens (pigg.model.batch_plan.estimator)
LORA_8B = linear_estimate(18.7, 9.3, 0.6)
FULL_8B = linear_estimate(64.1, 6.95, 0.6, 15.3)


def plan(t, world, memory, estimate=LORA_8B):
    made = plan_batch(t, world, memory, estimate, LAYERS)
    return made.micro_batch, made.grad_accum, made.checkpointed_layers


@pytest.mark.parametrize("world, expected", [(1, (8, 1, 11)), (2, (4, 1, 0)), (4, (2, 1, 0)), (8, (1, 1, 0))])
def test_effective_batch_stays_8_whatever_the_process_count(world, expected):
    made = plan_batch(settings(), world, H100, LORA_8B, LAYERS)
    assert (made.micro_batch, made.grad_accum, made.checkpointed_layers) == expected and made.effective == 8
    assert ("checkpointing off" in made.describe()) == (expected[2] == 0)


def test_lora_recomputes_up_to_a_third_of_the_layers_for_a_larger_micro_batch():
    # an H100: micro-batch 8 fits with 11 of the 36 layers recomputed
    assert plan(settings(), 1, H100) == (8, 1, 11)
    assert LORA_8B(8, 11, 1) <= 0.92 * H100 < LORA_8B(8, 10, 1)
    # a 74 GiB GPU: micro-batch 8 would need 13, more than a third, so 4 x 2 without recomputation
    assert plan(settings(), 1, 74 * GiB) == (4, 2, 0)
    assert LORA_8B(8, 13, 1) <= 0.92 * 74 * GiB < LORA_8B(8, 12, 1)
    # full fine-tuning recomputes no layer for a larger micro-batch: 4 x 2 without, where that fits
    assert plan(settings(method="full"), 1, 108 * GiB, FULL_8B) == (4, 2, 0)
    assert FULL_8B(8, 4, 1) <= 0.92 * 108 * GiB


def test_as_few_layers_recomputed_as_the_micro_batch_needs():
    # 8B full fine-tuning on an H100: weights and AdamW's moments leave ~24 GiB for a micro-batch 8's
    # activations (its gradients are made as they are freed); it fits with 23 of the 36 layers recomputed
    assert plan(settings(method="full"), 1, H100, FULL_8B) == (8, 1, 23)
    assert FULL_8B(8, 23, 1) <= 0.92 * H100 < FULL_8B(8, 22, 1)
    assert FULL_8B(4, 0, 2) > 0.92 * H100  # no micro-batch of at least 4 fits without recomputation
    assert plan(settings(method="full"), 1, 141 * GiB, FULL_8B) == (8, 1, 0)  # an H200
    assert plan(settings(), 1, 40 * GiB) == (8, 1, 30)  # a 40 GB card: LoRA micro-batch 4 needs ~56 GiB without
    assert plan(settings(), 1, 200 * GiB) == (8, 1, 0)
    made = plan_batch(settings(), 1, 40 * GiB, LORA_8B, LAYERS)
    assert made.gradient_checkpointing and "on 30 of 36 decoder layers" in made.describe()
    assert "on all 36" in plan_batch(settings(gradient_checkpointing=True), 1, H100, LORA_8B, LAYERS).describe()


def test_given_values_win():
    assert plan(settings(batch_size=2), 1, H100) == (2, 4, 0)
    assert plan(settings(batch_size=4), 1, H100) == (4, 2, 0)
    assert plan(settings(batch_size=8), 1, H100) == (8, 1, 11)  # as few layers recomputed as fit
    assert plan(settings(batch_size=1, grad_accum=8, gradient_checkpointing=True), 1, H100) == (1, 8, 36)
    assert plan(settings(grad_accum=4), 2, H100) == (1, 4, 0)  # the seed's spelling: 1 x 4 x 2 processes
    assert plan(settings(gradient_checkpointing=True), 1, H100) == (8, 1, 36)
    assert plan(settings(gradient_checkpointing=False), 1, H100) == (4, 2, 0)


def test_cpu_runs_micro_batch_1():
    assert plan(settings(), 1, None, None) == (1, 8, 0)


def test_impossible_splits_are_errors():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        plan_batch(settings(), 3, H100, LORA_8B, LAYERS)
    with pytest.raises(ValueError, match="batch_size 3 does not divide"):
        plan_batch(settings(batch_size=3), 1, H100, LORA_8B, LAYERS)


def test_memory_model_matches_the_measured_8b_runs():
    """Peaks of the 8B at ~1,054 tokens a sample, effective batch 8 (bench/train_throughput.py's runs of
    2026-11-27 to 12-02, docs/log.md; their bench/results/ files are in git's history):
    on an H100 (part1/2/5) LoRA micro-batch 4 without recomputation 52.7 GiB (42.6 without dropout),
    micro-batch 1 with all 36 layers recomputed 17.6, full FT micro-batch 4 with all 36 64.8; on an H200
    (part6/8/9/10/11) LoRA micro-batch 8 with 0, 11, 15 and 36 layers recomputed 87.5, 67.0, 59.5 and
    21.6, full FT micro-batch 4 with none 89.0, micro-batch 8 with 0, 10 and 34 98.9, 85.6 and 62.8. With
    Liger's SwiGLU (part12/14/15) LoRA micro-batch 8 with 0 and 11 layers recomputed 80.5 and 62.2, and with
    pigg.fast.lora's fused adapters 60.8 and, with 2, 58.6; full FT micro-batch 8 with 21 (part13) 67.9. The
    model must cover them without wasting much."""
    from pigg.model.architectures import qwen3_vl_8b_config
    from pigg.config import LoraSettings
    from pigg.model.loading import prepare_model
    from transformers import Qwen3VLForConditionalGeneration

    config = qwen3_vl_8b_config()
    measured = {  # (method, LoRA dropout, PEFT's adapters, Liger's SwiGLU): {(micro-batch, recomputed): peak GiB}
        ("lora", 0.1, True, False): {(4, 0): 52.7, (1, 36): 17.6, (8, 0): 87.5, (8, 11): 67.0, (8, 15): 59.5,
                                     (8, 36): 21.6},
        ("lora", 0.0, True, False): {(4, 0): 42.6},
        ("full", 0.1, True, False): {(4, 36): 64.8, (4, 0): 89.0, (8, 0): 98.9, (8, 10): 85.6, (8, 34): 62.8},
        ("lora", 0.1, True, True): {(8, 0): 80.5, (8, 11): 62.2},
        ("lora", 0.1, False, True): {(8, 0): 60.8, (8, 2): 58.6},
        ("full", 0.1, True, True): {(8, 21): 67.9},
    }
    for (method, dropout, peft, swiglu), peaks in measured.items():
        with torch.device("meta"):
            model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        estimate = estimator(prepare_model(model, method, LoraSettings(dropout=dropout)), config.text_config, 1054,
                             keeps_dropped_inputs=peft, liger_swiglu=swiglu)
        for (b, recomputed), peak in peaks.items():
            got = estimate(b, recomputed, 8 // b) / GiB
            assert peak <= got <= 1.1 * peak + 2, (method, dropout, peft, swiglu, b, recomputed, got)


def test_micro_batches_give_the_seed_recipes_losses_and_weights(tiny_dir, synth_root, tmp_path):
    """Same samples, seed and effective batch 8: batch 1 x 8 (the seed), 4 x 2 and 8 x 1 give the same
    loss at every step (right padding and token-count normalisation) and the same adapter."""
    from safetensors.torch import load_file

    runs = {}
    for micro in (1, 4, 8):
        cfg = tiny_run_config(tiny_dir, synth_root, tmp_path / f"mb{micro}", batch_size=micro, grad_accum=None,
                              max_steps=3, save_steps=3, learning_rate=1e-3)
        cfg.lora.dropout = 0.0  # dropout masks are drawn per micro-batch, so they differ between layouts
        folder = train(cfg)
        runs[micro] = (losses(folder), load_file(folder / "adapter_model.safetensors"))
    seed_losses, seed_weights = runs[1]
    assert len(seed_losses) == 3
    for micro in (4, 8):
        curve, weights = runs[micro]
        assert curve == pytest.approx(seed_losses, rel=1e-4), micro
        for key, value in seed_weights.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-3, atol=1e-5)


def test_plan_is_printed_and_recorded(tiny_dir, synth_root, tmp_path, capsys):
    folder = train(tiny_run_config(tiny_dir, synth_root, tmp_path, grad_accum=None, effective_batch=4, max_steps=1))
    assert "batch plan: 4 samples per optimizer step = micro-batch 1 x accumulation 4 x 1 process(es)" in capsys.readouterr().out
    plan = json.loads((folder / "provenance.json").read_text())["batch_plan"]
    assert (plan["micro_batch"], plan["grad_accum"], plan["world_size"]) == (1, 4, 1)


def test_estimate_scales_with_the_model(tiny_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir)
    fake = SimpleNamespace(parameters=lambda: [torch.zeros(10, requires_grad=True)], named_modules=lambda: [])
    layers = config.text_config.num_hidden_layers
    estimate = estimator(fake, config.text_config, 100)
    peaks = [estimate(2, k, 4) for k in range(layers + 1)]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[-1]


def test_adapter_inputs_stay_bf16_only_under_bf16_autocast(tiny_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import Qwen3VLForConditionalGeneration

    from pigg.config import LoraSettings
    from pigg.model.loading import prepare_model
    from pigg.fast import adapter_input_casts

    model = prepare_model(Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir), "lora", LoraSettings())
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    def casting():
        return {getattr(m, "cast_input_dtype_enabled", True) for m in layers}

    with adapter_input_casts(model, SimpleNamespace(bf16=True), fp32=False):
        assert casting() == {False}
    assert casting() == {True}
    for args, fp32 in ((SimpleNamespace(bf16=True), True), (SimpleNamespace(bf16=False), False)):
        with adapter_input_casts(model, args, fp32):
            assert casting() == {True}
