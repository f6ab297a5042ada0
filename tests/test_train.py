"""End-to-end global fine-tuning of the tiny model on CPU: weights, files, resume after kill -9."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3VLForConditionalGeneration

from conftest import losses, tiny_run_config
from pigg import config as C
from pigg.train import train

LORA_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "checkpoints",
    "pigg_config.yaml", "processor_config.json", "provenance.json", "tensorboard", "tokenizer.json",
    "tokenizer_config.json", "training_args.bin", "video_preprocessor_config.json",
}
FULL_FILES = LORA_FILES - {"README.md", "adapter_config.json", "adapter_model.safetensors"} | {
    "config.json", "generation_config.json", "model.safetensors"}


@pytest.fixture(scope="module")
def lora_run(tiny_dir, synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return train(tiny_run_config(tiny_dir, synth_root, out, gradient_checkpointing=True)), out


def test_lora_output_folder_is_exact(lora_run):
    folder, out = lora_run
    assert folder == out / "global_agent_lora"
    assert {p.name for p in folder.iterdir()} == LORA_FILES
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert any(p.name.startswith("events.out.tfevents") for p in (folder / "tensorboard").iterdir())
    logs = list((out / "logs").glob("finetune_global_lora_*.log"))
    assert len(logs) == 1 and "supervised_tokens_per_step" in logs[0].read_text()


def test_lora_changes_adapters_only_and_loads_with_stock_peft(lora_run, tiny_dir):
    from peft import PeftModel

    folder, _ = lora_run
    adapter = load_file(folder / "adapter_model.safetensors")
    assert adapter and all(".language_model." in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0

    base = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, folder)
    merged = model.merge_and_unload().state_dict()
    changed = {k for k, v in merged.items() if not torch.equal(v, reference[k])}
    assert changed and all(".language_model.layers." in k for k in changed)
    assert not any(".visual." in k for k in changed)


def test_config_and_provenance_are_written(lora_run, synth_root):
    import json

    folder, _ = lora_run
    cfg = C.load_yaml(folder / "pigg_config.yaml")
    assert cfg.train.method == "lora" and cfg.data.data_root == str(synth_root)
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["users"] == "1-3" and prov["optimizer_steps"] == 4 and prov["packages"]["transformers"]
    assert sum(prov["samples_per_user"].values()) == prov["samples"]


def test_existing_checkpoints_are_not_overwritten_without_resume(lora_run, tiny_dir, synth_root):
    _, out = lora_run
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(tiny_run_config(tiny_dir, synth_root, out))


def test_full_fine_tuning_trains_the_llm_and_keeps_vision(tiny_dir, synth_root, tmp_path):
    folder = train(tiny_run_config(tiny_dir, synth_root, tmp_path, method="full", max_steps=2))
    assert {p.name for p in folder.iterdir()} == FULL_FILES
    before = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir).state_dict()
    after = Qwen3VLForConditionalGeneration.from_pretrained(folder).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("language_model.layers" in k for k in changed) and "lm_head.weight" in changed
    assert not any(".visual." in k for k in changed)


def test_train_vision_trains_the_tower_and_projector_too(tiny_dir, synth_root, tmp_path, capsys):
    folder = train(tiny_run_config(tiny_dir, synth_root, tmp_path, method="full", max_steps=2, vision=True))
    before = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir).state_dict()
    after = Qwen3VLForConditionalGeneration.from_pretrained(folder).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".visual.blocks." in k for k in changed) and any(".visual.merger." in k for k in changed)
    assert any("language_model.layers" in k for k in changed)
    assert "fast.batched_vision_attention and fast.vision_without_autocast are off" in capsys.readouterr().out
    with pytest.raises(C.ConfigError, match="train.vision trains the vision tower with full fine-tuning only"):
        C.validate(tiny_run_config(tiny_dir, synth_root, tmp_path, method="lora", vision=True))


KILLER = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from pigg import config as C
    from pigg.train import train

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = C.load_yaml(sys.argv[1])
    train(cfg, callbacks=[KillAt()] if len(sys.argv) > 2 else [])
""")


def test_resume_after_kill_gives_the_same_weights(tiny_dir, synth_root, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILLER)

    def run(name, *extra, resume=False):
        cfg = tiny_run_config(tiny_dir, synth_root, tmp_path / name, max_steps=6, resume=resume)
        C.save_yaml(cfg, tmp_path / f"{name}.yaml")
        return subprocess.run([sys.executable, str(script), str(tmp_path / f"{name}.yaml"), *extra],
                              capture_output=True, text=True, timeout=600)

    straight = run("straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run("killed", "5")  # after checkpoint-4, before checkpoint-6
    assert killed.returncode == -9
    ckpts = tmp_path / "killed" / "global_agent_lora" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    resumed = run("killed", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "checkpoint-4" in resumed.stdout

    a = load_file(tmp_path / "straight" / "global_agent_lora" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "global_agent_lora" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


def test_a_finished_run_resumed_trains_no_further(tiny_dir, synth_root, tmp_path, capsys):
    """The Trainer, resumed from a checkpoint that holds all --max-steps, would take one more step."""
    from pigg.train import train

    cfg = tiny_run_config(tiny_dir, synth_root, tmp_path, max_steps=2, save_steps=1)
    folder = train(cfg)
    before = load_file(folder / "adapter_model.safetensors")
    cfg.train.resume = True
    train(cfg)
    assert "holds all 2 optimizer steps of this run" in capsys.readouterr().out
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    after = load_file(folder / "adapter_model.safetensors")
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert json.loads((folder / "provenance.json").read_text())["optimizer_steps"] == 2


def test_supervised_positions_loss_equals_the_models_own(tiny_dir, synth_root, processor):
    """At micro-batch 1 the loss and gradients are the model's own; over a micro-batch they are the mean
    of the samples' own losses (the seed's batch 1 x accumulation), with or without the logits shortcut."""
    from pigg.data.collate import TrainCollator
    from pigg.data.samples import load_samples
    from pigg.trainer import supervised_loss

    samples, _ = load_samples(C.DataConfig(data_root=str(synth_root), users="1", validation_workers=1))
    collate = TrainCollator(processor, 4096)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    reference = model(**collate(samples[:1])).loss
    reference.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss, _ = supervised_loss(model, collate(samples[:1]))
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-7)

    with torch.no_grad():
        own = [model(**collate([s])).loss for s in samples[:3]]
        batch = collate(samples[:3])
        assert batch["attention_mask"].min() == 0  # padded: the rows differ in length
        for labels_only in (True, False):
            loss, _ = supervised_loss(model, batch, 8, labels_only)  # 3 of a step's 8 samples
            torch.testing.assert_close(loss, sum(own) / 8, rtol=1e-5, atol=1e-6)
        # where the collator (in a DataLoader worker) says the supervised tokens are: logits there only
        found = TrainCollator(processor, 4096, supervised_index=True)(samples[:3])
        assert torch.equal(found["labels"], batch["labels"])
        rows, length = len(found["labels"]), found["labels"].shape[1]
        index = found["supervised_index"]
        assert len(index) == (batch["labels"] != -100).sum() and (index // length < rows).all()
        loss, outputs = supervised_loss(model, found, 8)
        torch.testing.assert_close(loss, sum(own) / 8, rtol=1e-5, atol=1e-6)
        assert outputs.logits.shape == (len(index), model.config.get_text_config().vocab_size)


def test_batches_without_padding_mask_give_the_same_loss_and_gradients(tiny_dir, synth_root, processor):
    """`fast.padding_mask` off: right-padded rows without the mask, with positions from the collator,
    give the loss and gradients of the masked batch; the positions are the model's own. Padding to a
    multiple of 64 tokens changes nothing either; pixels cast by the collator are the model's cast."""
    from pigg.data.collate import TrainCollator
    from pigg.data.samples import load_samples
    from pigg.trainer import supervised_loss

    samples, _ = load_samples(C.DataConfig(data_root=str(synth_root), users="1", validation_workers=1))
    masked = TrainCollator(processor, 4096)(samples[:4])
    causal = TrainCollator(processor, 4096, padding_mask=False, pad_to_multiple=64)(samples[:4])
    length = masked["input_ids"].shape[1]
    assert causal["input_ids"].shape[1] % 64 == 0 and causal["input_ids"].shape[1] > length
    real = masked["attention_mask"].bool()
    assert not real.all() and "attention_mask" not in causal  # padded rows, and no mask given
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    rope_index = model.model.get_rope_index
    own, _ = rope_index(causal["input_ids"], causal["mm_token_type_ids"], causal["image_grid_thw"])
    assert torch.equal(causal["position_ids"], own)
    own, _ = rope_index(masked["input_ids"], masked["mm_token_type_ids"], masked["image_grid_thw"],
                        attention_mask=masked["attention_mask"])
    assert torch.equal(causal["position_ids"][:, :, :length][:, real], own[:, real])
    half = TrainCollator(processor, 4096, pixel_dtype=torch.bfloat16)(samples[:4])["pixel_values"]
    assert half.dtype == torch.bfloat16 and torch.equal(half, masked["pixel_values"].to(torch.bfloat16))

    results = []
    for batch in (masked, causal):
        model.zero_grad()
        loss, _ = supervised_loss(model, batch, 8)
        loss.backward()
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6)


def test_flop_estimate_is_the_stock_one(tiny_dir, processor, synth_root, tmp_path):
    """GlobalTrainer counts the parameters once; total_flos is what the stock Trainer computes."""
    from transformers import Trainer, TrainingArguments

    from pigg.data.collate import TrainCollator
    from pigg.data.samples import load_samples
    from pigg.trainer import GlobalTrainer

    samples, _ = load_samples(C.DataConfig(data_root=str(synth_root), users="1", validation_workers=1))
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    trainer = GlobalTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"))
    collate = TrainCollator(processor, 4096)
    for batch in (collate(samples[:1]), collate(samples[:3])):
        assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0


def test_a_step_counts_its_samples_without_the_device(tiny_dir, tmp_path):
    """On one process the step's sample count is a plain number (a tensor made on the GPU would wait for
    it); the losses it divides are tested against the stock Trainer's below."""
    from transformers import TrainingArguments

    from pigg.model.batch_plan import BatchPlan
    from pigg.trainer import GlobalTrainer, training_arguments

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    trainer = GlobalTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"))
    batches = [{"labels": torch.zeros(3, 5)}, {"labels": torch.zeros(2, 5)}, {"labels": torch.zeros(1, 5)}]
    taken, samples = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
    assert taken == batches[:2] and samples == 5 and isinstance(samples, int)
    # nor does the Trainer read each micro-batch's loss back to test it for NaN
    args = training_arguments(tiny_run_config(tiny_dir, tmp_path, tmp_path), tmp_path, BatchPlan(1, 8, 1, 0, 2, ""))
    assert not args.logging_nan_inf_filter
    assert not args.accelerator_config.non_blocking  # on the CPU; pinned batches on a GPU copy without waiting


def test_the_images_grid_reaches_the_model_on_the_cpu(tiny_dir, processor, synth_root, tmp_path):
    """With `grid_on_cpu` the collator gives the grid as numbers too (without a padding mask only), which
    the DataLoader and accelerate leave alone, and GlobalTrainer hands it to the model as a CPU tensor."""
    from transformers import TrainingArguments

    from pigg.data.collate import TrainCollator
    from pigg.data.samples import load_samples
    from pigg.trainer import GlobalTrainer

    samples, _ = load_samples(C.DataConfig(data_root=str(synth_root), users="1", validation_workers=1))
    batch = TrainCollator(processor, 4096, padding_mask=False, grid_on_cpu=True)(samples[:3])
    assert batch["image_grid_rows"] == batch["image_grid_thw"].tolist()
    assert "image_grid_rows" not in TrainCollator(processor, 4096, grid_on_cpu=True)(samples[:3])  # masked
    trainer = GlobalTrainer(model=Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir),
                            args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"))
    grid = batch["image_grid_thw"]
    inputs = trainer._prepare_inputs(batch)
    assert "image_grid_rows" not in inputs and inputs["image_grid_thw"].device.type == "cpu"
    assert torch.equal(inputs["image_grid_thw"], grid)


def test_rope_positions_refuse_a_run_that_is_not_the_next_image():
    from pigg.data.collate import rope_positions

    types = torch.tensor([[0, 0, 1, 1, 1, 1, 0]])
    assert rope_positions(types, torch.tensor([[1, 4, 4]]), 2)[:, 0].tolist() == \
        [[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]]
    with pytest.raises(ValueError, match="row 0: a run of 4 tokens of type 1 at 2"):
        rope_positions(types, torch.tensor([[1, 4, 6]]), 2)
    with pytest.raises(ValueError, match="type 2"):
        rope_positions(torch.tensor([[0, 2, 2, 2, 2]]), torch.tensor([[1, 4, 4]]), 2)


def test_fast_path_trains_like_the_stock_trainer(tiny_dir, synth_root, tmp_path, monkeypatch):
    """pigg's default path (micro-batch 4 x accumulation 2, logits at supervised positions only, its own
    loss normalisation) against the stock Trainer with the model's own loss at batch 1 x accumulation 8:
    the same losses step by step on the same samples and seed."""
    from transformers import Trainer

    import pigg.train

    class StockTrainer(Trainer):
        def __init__(self, *args, logits_on_labels_only=None, **kwargs):
            super().__init__(*args, **kwargs)

    curves = []
    for name, micro in (("stock", 1), ("pigg", 4)):
        if name == "stock":
            monkeypatch.setattr(pigg.train, "GlobalTrainer", StockTrainer)
        else:
            monkeypatch.undo()
        cfg = tiny_run_config(tiny_dir, synth_root, tmp_path / name, batch_size=micro, grad_accum=None,
                              max_steps=2, learning_rate=1e-3)
        cfg.lora.dropout = 0.0  # dropout masks are drawn per micro-batch, so they differ between layouts
        curves.append(losses(train(cfg)))
    assert len(curves[0]) == 2
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)


def test_compiled_decoder_layers_train_like_eager(tiny_dir, synth_root, tmp_path):
    """`fast.torch_compile` (each decoder layer compiled in place, with checkpointing): the same losses
    and adapters as eager, under the same parameter names."""
    from torch._dynamo.utils import counters

    runs, graphs = {}, []
    for compiled in (False, True):
        cfg = tiny_run_config(tiny_dir, synth_root, tmp_path / str(compiled), torch_compile=compiled,
                              gradient_checkpointing=True, batch_size=2, max_steps=2, learning_rate=1e-3)
        cfg.lora.dropout = 0.0  # compiled dropout draws its masks from another generator
        graphs.append(counters["stats"]["unique_graphs"])
        folder = train(cfg)
        graphs[-1] = counters["stats"]["unique_graphs"] - graphs[-1]
        runs[compiled] = (losses(folder), load_file(folder / "adapter_model.safetensors"))
    (eager, eager_weights), (compiled, compiled_weights) = runs[False], runs[True]
    assert graphs[0] == 0 and graphs[1] > 0  # the compiled run did run compiled graphs
    assert len(eager) == 2 and compiled == pytest.approx(eager, rel=1e-5)
    assert compiled_weights.keys() == eager_weights.keys()
    for k in eager_weights:
        torch.testing.assert_close(compiled_weights[k], eager_weights[k], rtol=1e-4, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in compiled_weights.items() if "lora_B" in k)


def test_compile_is_refused_with_several_processes():
    from pigg.fast.compile import check_compile

    fast = C.FastConfig(torch_compile=True)
    check_compile(fast, 1)
    with pytest.raises(C.ConfigError, match="one process only"):
        check_compile(fast, 2)
    fast.torch_compile = False
    check_compile(fast, 2)


def test_checkpointing_some_layers_recomputes_only_those_and_changes_no_gradient(tiny_dir):
    from pigg.config import LoraSettings, ModelConfig
    from pigg.model.loading import load_model, prepare_model
    from pigg.model.batch_plan import checkpoint_layers
    from pigg.model.loading import unwrapped

    model = prepare_model(load_model(ModelConfig(name_or_path=str(tiny_dir)), "cpu"), "lora", LoraSettings(dropout=0.0))
    model.train()
    layers = unwrapped(model).model.language_model.layers
    assert len(layers) == 2
    # Each layer's MLP starts once forward, and again in the backward pass if recomputed (a pre-hook: the
    # recomputation stops as soon as it has what the backward pass needs, before the MLP returns).
    runs = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda module, args, i=i: runs.__setitem__(i, runs[i] + 1))
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))

    def gradients():
        model.zero_grad(set_to_none=True)
        runs[:] = [0] * len(layers)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    assert runs == [1, 1]
    checkpoint_layers(model, 1)
    partial = gradients()
    assert runs == [2, 1]  # the first layer recomputed, the second kept its activations
    checkpoint_layers(model, 2)
    everywhere = gradients()
    assert runs == [2, 2]
    assert plain.keys() == partial.keys() == everywhere.keys() and plain
    for name in plain:
        torch.testing.assert_close(partial[name], plain[name])
        torch.testing.assert_close(everywhere[name], plain[name])


def test_gpu_memory_setting_is_checked():
    t = C.TrainConfig(gpu_memory_gib=0)
    cfg = C.RunConfig(train=t)
    with pytest.raises(C.ConfigError, match="gpu_memory_gib must be > 0"):
        C.validate(cfg)
