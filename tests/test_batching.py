"""Micro-batch / accumulation / process arithmetic, the memory model, and that a larger micro-batch
is the same mathematics as the seed's batch 1 x accumulation 8."""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import losses, tiny_run_config
from pigg import config as C
from pigg.batching import GiB, estimate_peak, plan_batch
from pigg.train import train


def settings(**kw):
    t = C.TrainConfig()
    for k, v in kw.items():
        setattr(t, k, v)
    return t


LAYERS = 36


def linear_estimate(static_gib, per_sample_gib, ckpt_per_sample_gib):
    """Peak for micro-batch b with k of the 36 layers recomputed."""
    return lambda b, k: (static_gib + b * (per_sample_gib * (LAYERS - k) + ckpt_per_sample_gib * k) / LAYERS) * GiB


H100 = 79.2 * GiB
LORA_8B = linear_estimate(18.7, 10.0, 1.0)  # the calibrated model's numbers for the 8B at ~1,054 tokens


def plan(t, world, memory, estimate=LORA_8B):
    made = plan_batch(t, world, memory, estimate, LAYERS)
    return made.micro_batch, made.grad_accum, made.checkpointed_layers


@pytest.mark.parametrize("world, expected", [(1, (4, 2, 0)), (2, (4, 1, 0)), (4, (2, 1, 0)), (8, (1, 1, 0))])
def test_effective_batch_stays_8_whatever_the_process_count(world, expected):
    made = plan_batch(settings(), world, H100, LORA_8B, LAYERS)
    assert (made.micro_batch, made.grad_accum, made.checkpointed_layers) == expected and made.effective == 8
    assert "checkpointing off" in made.describe()


def test_as_few_layers_recomputed_as_the_micro_batch_needs():
    # 8B full fine-tuning on an H100: optimizer state leaves ~9 GiB; micro-batch 4 fits with 32 of the 36
    # layers recomputed (not all 36)
    full = linear_estimate(64.0, 10.0, 1.2)
    assert plan(settings(), 1, H100, full) == (4, 2, 32)
    assert full(4, 32) <= 0.92 * H100 < full(4, 31)
    assert plan(settings(), 1, 40 * GiB) == (8, 1, 31)  # a 40 GB card: LoRA micro-batch 4 needs ~59 GiB without
    assert plan(settings(), 1, 200 * GiB) == (8, 1, 0)
    made = plan_batch(settings(), 1, 40 * GiB, LORA_8B, LAYERS)
    assert made.gradient_checkpointing and "on 31 of 36 decoder layers" in made.describe()
    assert "on all 36" in plan_batch(settings(gradient_checkpointing=True), 1, H100, LORA_8B, LAYERS).describe()


def test_given_values_win():
    assert plan(settings(batch_size=2), 1, H100) == (2, 4, 0)
    assert plan(settings(batch_size=8), 1, H100) == (8, 1, 13)  # as few layers recomputed as fit
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
    """bench/results/train_throughput_h100_part*.json, H100: pigg's default LoRA (micro-batch 4, no ckpt)
    peaked at 52.7 GiB, LoRA micro-batch 1 with ckpt at 17.6, pigg's default full FT (micro-batch 4 with
    ckpt) at 64.8; _h200_part6/8.json, H200: LoRA micro-batch 8 at 87.5 without ckpt and 21.6 with, full
    FT micro-batch 4 without at 89.0. The model must cover them without wasting much."""
    from pigg.architectures import qwen3_vl_8b_config
    from pigg.config import LoraSettings
    from pigg.model import prepare_model
    from transformers import Qwen3VLForConditionalGeneration

    config = qwen3_vl_8b_config()
    for method, b, ckpt, measured in (("lora", 4, False, 52.7), ("lora", 1, True, 17.6), ("full", 4, True, 64.8),
                                      ("lora", 8, False, 87.5), ("lora", 8, True, 21.6), ("full", 4, False, 89.0)):
        with torch.device("meta"):
            model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        model = prepare_model(model, method, LoraSettings())
        estimate = estimate_peak(model, config.text_config, b, 1054, LAYERS if ckpt else 0) / GiB
        assert measured <= estimate <= 1.2 * measured + 2, (method, b, ckpt, estimate)


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
    fake = SimpleNamespace(parameters=lambda: [torch.zeros(10, requires_grad=True)])
    layers = config.text_config.num_hidden_layers
    peaks = [estimate_peak(fake, config.text_config, 2, 100, k) for k in range(layers + 1)]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[-1]


def test_adapter_inputs_stay_bf16_only_under_bf16_autocast(tiny_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import Qwen3VLForConditionalGeneration

    from pigg.config import LoraSettings
    from pigg.model import prepare_model
    from pigg.train import adapter_input_casts

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
