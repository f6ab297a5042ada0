import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from pigg.model.architectures import qwen3_vl_8b_config
from pigg.config import LoraSettings
from pigg.model.loading import parameter_counts, part_of, prepare_model


@pytest.mark.parametrize("method, trainable", [("lora", 21_823_488), ("full", 8_190_735_360)])
def test_trainable_counts_on_the_real_8b_architecture(method, trainable):
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(qwen3_vl_8b_config())
    counts = parameter_counts(prepare_model(model, method, LoraSettings()))
    assert counts["all"][0] == counts["llm"][0] == trainable
    assert counts["vision"][0] == counts["projector"][0] == 0
    base_total = 8_767_123_696
    assert counts["all"][1] == base_total + (trainable if method == "lora" else 0)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_vision_and_projector_are_frozen_and_adapter_free(tiny_dir, method):
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    model = prepare_model(model, method, LoraSettings())
    names = dict(model.named_parameters())
    visual = {n: p for n, p in names.items() if ".visual." in n or n.startswith("model.visual.")}
    assert any("pos_embed" in n for n in visual) and any("deepstack_merger_list" in n for n in visual)
    assert any("patch_embed" in n for n in visual) and any(".merger." in n for n in visual)
    assert not any(p.requires_grad for p in visual.values())
    assert not any("lora_" in n for n in visual)
    if method == "lora":
        lora = [n for n in names if "lora_" in n]
        assert len(lora) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
        assert all(names[n].requires_grad for n in lora)
        assert not any(p.requires_grad for n, p in names.items() if "lora_" not in n)
    else:
        llm = [p for n, p in names.items() if part_of(n) == "llm"]
        assert all(p.requires_grad for p in llm)


def test_parts():
    assert part_of("model.visual.pos_embed.weight") == "vision"
    assert part_of("base_model.model.model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert part_of("model.visual.merger.linear_fc1.weight") == "projector"
    assert part_of("model.visual.deepstack_merger_list.0.norm.weight") == "projector"
    assert part_of("lm_head.weight") == "llm"
    assert part_of("model.language_model.layers.0.mlp.up_proj.weight") == "llm"


def test_position_scale_raises_only_the_vision_position_embeddings(tiny_dir, tmp_path):
    """The demo's tiny model: the same random weights, its vision position embeddings 40 times larger."""
    from safetensors.torch import load_file

    from pigg.offline.tiny import make_tiny_checkpoint

    plain, scaled = load_file(tiny_dir / "model.safetensors"), load_file(
        make_tiny_checkpoint(tmp_path / "scaled", position_scale=40.0) / "model.safetensors")
    key = next(k for k in plain if k.endswith("visual.pos_embed.weight"))
    assert torch.allclose(scaled[key], 40 * plain[key])
    assert all(torch.equal(plain[k], scaled[k]) for k in plain if k != key)


def test_demo_architecture_is_consistent_and_builds():
    from pigg.model.architectures import demo_qwen3_vl_config

    config = demo_qwen3_vl_config()
    text = config.text_config
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert text.num_attention_heads * text.head_dim == text.hidden_size == config.vision_config.out_hidden_size
    # rows 0 and 5 of the demo's 6x6 image tokens turn the height section's fastest pair by more than a radian
    # (Qwen's base of 5,000,000 with head size 16 turned it by 0.7)
    theta, pairs = text.rope_parameters["rope_theta"], text.head_dim // 2
    assert 5 * theta ** (-2 * 1 / (2 * pairs)) > 1
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    assert parameter_counts(model)["all"][1] == 39_932_096
