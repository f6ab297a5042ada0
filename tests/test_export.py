"""Export on CPU with the tiny model: merged logits, exact files, provenance, refusals, kill -9."""
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen3VLForConditionalGeneration

from conftest import tiny_run_config
from pigg import config as C
from pigg.export import export
from pigg.train import train

PROCESSOR_FILES = {"chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "video_preprocessor_config.json"}
EXPORT_FILES = PROCESSOR_FILES | {"config.json", "generation_config.json", "model.safetensors", "pigg_export.json",
                                  "training_configs"}


@pytest.fixture(scope="module")
def lora_a(tiny_dir, synth_root, tmp_path_factory):
    return train(tiny_run_config(tiny_dir, synth_root, tmp_path_factory.mktemp("a"), max_steps=2))


@pytest.fixture(scope="module")
def lora_b(tiny_dir, synth_root, tmp_path_factory):
    # another seed: other initial A matrices and data order, so a different adapter on the same base
    return train(tiny_run_config(tiny_dir, synth_root, tmp_path_factory.mktemp("b"), max_steps=2, seed=1))


@pytest.fixture(scope="module")
def batch(processor, synth_root):
    from pigg.data.collate import TrainCollator
    from pigg.data.samples import load_samples

    samples, _ = load_samples(C.DataConfig(data_root=str(synth_root), users="1", validation_workers=1))
    inputs = TrainCollator(processor, 4096)(samples[:2])
    inputs.pop("labels")
    return inputs


@torch.no_grad()
def logits(model, batch):
    return model.eval()(**batch).logits.float()


def base_model(path):
    return Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)


def assert_changed(a, b, tol):
    """Guard against a vacuous comparison: the weights must move the logits far beyond the tolerance."""
    assert (a - b).abs().max() > 10 * tol


def test_lora_export_gives_the_adapters_logits(lora_a, tiny_dir, batch, tmp_path):
    out = export(None, [str(lora_a)], tmp_path / "merged", dtype="float32", max_shard_size="30MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and {p.name for p in out.glob("model*.safetensors")} == shards

    exported = Qwen3VLForConditionalGeneration.from_pretrained(out)
    assert {p.dtype for p in exported.parameters()} == {torch.float32}
    reference = logits(PeftModel.from_pretrained(base_model(tiny_dir), lora_a), batch)
    torch.testing.assert_close(logits(exported, batch), reference, rtol=1e-5, atol=1e-5)
    assert_changed(reference, logits(base_model(tiny_dir), batch), 1e-5)


def test_bf16_export_files_and_provenance_are_exact(lora_a, tiny_dir, batch, tmp_path):
    out = export(None, [str(lora_a)], tmp_path / "merged")
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert [p.name for p in (out / "training_configs").iterdir()] == ["adapter_1_pigg_config.yaml"]
    assert (out / "training_configs" / "adapter_1_pigg_config.yaml").read_bytes() == \
        (lora_a / "pigg_config.yaml").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == "bfloat16" and config["use_cache"] is True

    record = json.loads((out / "pigg_export.json").read_text())
    assert record["base"] == {"name_or_path": str(tiny_dir)} and record["dtype"] == "bfloat16"
    (adapter,) = record["adapters"]
    assert adapter["index"] == 1 and adapter["path"] == str(lora_a.resolve())
    assert adapter["adapter_model_sha256"] == hashlib.sha256(
        (lora_a / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert adapter["pigg_config"]["train"]["method"] == "lora"
    assert adapter["provenance"]["base_model"] == str(tiny_dir) and adapter["provenance"]["optimizer_steps"] == 2
    assert record["packages"]["peft"] and record["processor_from"] == str(lora_a)
    assert record["training_configs"] == {"adapter_1": "training_configs/adapter_1_pigg_config.yaml"}

    # Weights are the fp32 merge rounded once to bf16; logits agree at bf16 precision (measured: 0.008).
    merged = PeftModel.from_pretrained(base_model(tiny_dir), lora_a).merge_and_unload()
    saved = load_file(out / "model.safetensors")
    for name, value in merged.state_dict().items():
        assert torch.equal(saved[name], value.to(torch.bfloat16)), name
    exported = Qwen3VLForConditionalGeneration.from_pretrained(out)
    assert {p.dtype for p in exported.parameters()} == {torch.bfloat16}
    reference = logits(merged, batch)
    torch.testing.assert_close(logits(exported, batch), reference, rtol=0.02, atol=0.02)
    assert_changed(reference, logits(base_model(tiny_dir), batch), 0.04)


def test_two_adapters_are_merged_in_order(lora_a, lora_b, tiny_dir, batch, tmp_path):
    out = export(str(tiny_dir), [str(lora_a), str(lora_b)], tmp_path / "merged", dtype="float32")
    model = base_model(tiny_dir)
    for adapter in (lora_a, lora_b):
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    reference = logits(model, batch)
    torch.testing.assert_close(logits(Qwen3VLForConditionalGeneration.from_pretrained(out), batch), reference,
                               rtol=1e-5, atol=1e-5)
    only_a = logits(PeftModel.from_pretrained(base_model(tiny_dir), lora_a).merge_and_unload(), batch)
    assert_changed(reference, only_a, 1e-5)

    record = json.loads((out / "pigg_export.json").read_text())
    assert [(a["index"], a["path"]) for a in record["adapters"]] == [(1, str(lora_a.resolve())),
                                                                      (2, str(lora_b.resolve()))]
    assert record["processor_from"] == str(lora_b)
    for i, adapter in enumerate((lora_a, lora_b), 1):
        assert (out / "training_configs" / f"adapter_{i}_pigg_config.yaml").read_bytes() == \
            (adapter / "pigg_config.yaml").read_bytes()


def test_full_fine_tuning_output_exports_with_the_same_logits(tiny_dir, synth_root, batch, tmp_path):
    full = train(tiny_run_config(tiny_dir, synth_root, tmp_path / "run", method="full", max_steps=2))
    out = export(str(full), [], tmp_path / "merged", dtype="float32")
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert [p.name for p in (out / "training_configs").iterdir()] == ["base_pigg_config.yaml"]
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    record = json.loads((out / "pigg_export.json").read_text())
    assert record["adapters"] == [] and record["base"]["provenance"]["method"] == "full"

    reference = logits(base_model(full), batch)
    torch.testing.assert_close(logits(Qwen3VLForConditionalGeneration.from_pretrained(out), batch), reference,
                               rtol=0, atol=0)
    assert_changed(reference, logits(base_model(tiny_dir), batch), 1e-5)


def other_architecture(folder, **text):
    from pigg.model.architectures import tiny_qwen3_vl_config
    from pigg.offline.tiny import make_config_folder

    config = tiny_qwen3_vl_config()
    for key, value in text.items():
        setattr(config.text_config, key, value)
    config.vision_config.out_hidden_size = config.text_config.hidden_size
    return make_config_folder(folder, config)  # config and processor only: a refusal must not need weights


@pytest.mark.parametrize("text, message", [
    (dict(hidden_size=32), "does not fit base"),  # the adapter's A matrices are 64 wide, the base's layers 32
    (dict(num_hidden_layers=3), "another architecture"),  # every adapter weight fits; its recorded base differs
])
def test_adapter_for_another_architecture_is_refused_before_writing(lora_a, tiny_dir, tmp_path, text, message):
    other = other_architecture(tmp_path / "other", **text)
    with pytest.raises(ValueError, match=message) as refused:
        export(str(other), [str(lora_a)], tmp_path / "merged")
    assert str(other) in str(refused.value) and str(lora_a) in str(refused.value)
    if "num_hidden_layers" in text:
        assert str(tiny_dir) in str(refused.value)
    assert [p.name for p in tmp_path.iterdir()] == ["other"]


def test_same_architecture_at_another_path_is_merged_with_a_note(lora_a, tiny_dir, tmp_path, capsys):
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    out = export(str(copy), [str(lora_a)], tmp_path / "merged", dtype="float32")
    assert f"was trained on {tiny_dir}; {copy} has the same architecture" in capsys.readouterr().out
    assert json.loads((out / "pigg_export.json").read_text())["base"]["name_or_path"] == str(copy)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from transformers import PreTrainedModel
    from pigg.export import export

    save = PreTrainedModel.save_pretrained

    def save_then_die(self, *args, **kwargs):  # weights written, processor and record not yet
        save(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    PreTrainedModel.save_pretrained = save_then_die
    export(None, [sys.argv[1]], sys.argv[2])
""")


def test_export_killed_mid_write_leaves_no_output_and_is_cleaned_next_time(lora_a, tmp_path, capsys):
    script, out = tmp_path / "kill.py", tmp_path / "merged"
    script.write_text(KILLER)
    killed = subprocess.run([sys.executable, str(script), str(lora_a), str(out)], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()
    (stale,) = tmp_path.glob(".tmp-merged-*")
    assert {"config.json", "model.safetensors"} <= {p.name for p in stale.iterdir()}
    assert not (stale / "pigg_export.json").exists()

    export(None, [str(lora_a)], out)
    assert f"removing {stale}: left by an interrupted export" in capsys.readouterr().out
    assert not stale.exists() and (out / "pigg_export.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kill.py", "merged"]


def test_existing_output_is_refused_without_force_and_replaced_with_it(lora_a, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="(?s)dtype must be one of.*exists: pass force=True"):
        export(None, [str(lora_a)], out, dtype="int8")
    with pytest.raises(ValueError, match="exists: pass force=True"):
        export(None, [str(lora_a)], out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]

    export(None, [str(lora_a)], out, force=True)
    assert not (out / "mine.txt").exists() and (out / "pigg_export.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_export_command(tiny_dir, synth_root, tmp_path, monkeypatch):
    from pigg.cli import main
    from pigg.train import train

    monkeypatch.chdir(tmp_path)
    folder = train(tiny_run_config(tiny_dir, synth_root, tmp_path, max_steps=1))
    assert main(["export", "--adapter", str(folder), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "pigg_export.json").is_file()
    assert main(["export", "--adapter", str(folder), "--out", str(tmp_path / "merged")]) == 2  # exists, no --force
