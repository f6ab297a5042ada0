"""Model set-up in the order that keeps adapters out of the vision tower: load -> freeze -> adapt.

Qwen3-VL parts: the vision tower (`model.visual`: patch_embed, pos_embed, blocks), the projector
(`visual.merger` and `visual.deepstack_merger_list`) and the language model (`model.language_model`
plus `lm_head`). The vision tower and projector are always frozen; the language model is trained
fully or through LoRA on its own linear layers only.
"""
import re

import torch

from pigg.config import LoraSettings, ModelConfig

PROJECTOR_PREFIXES = ("visual.merger.", "visual.deepstack_merger_list.")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def unwrapped(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def load_model(cfg: ModelConfig, device: str):
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    dtype = pick_dtype(cfg.dtype, device)
    if cfg.random_weights:
        config = AutoConfig.from_pretrained(cfg.name_or_path)
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration._from_config(
                config, dtype=dtype, attn_implementation=cfg.attn_implementation)
    else:
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            cfg.name_or_path, dtype=dtype, attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    return model


def part_of(name: str) -> str:
    """'vision', 'projector' or 'llm' for a parameter name (PEFT's prefixes allowed)."""
    name = re.sub(r"^(base_model\.model\.)", "", name)
    name = re.sub(r"^model\.", "", name)
    if name.startswith(PROJECTOR_PREFIXES):
        return "projector"
    if name.startswith("visual."):
        return "vision"
    return "llm"


def freeze_vision(model) -> None:
    """Freeze the whole vision tower and projector (patch_embed, pos_embed, blocks, mergers)."""
    for name, p in model.named_parameters():
        if part_of(name) != "llm":
            p.requires_grad_(False)


def lora_target_regex(targets: list[str]) -> str:
    # Anchored on the language model: "all-linear" would also match the vision tower's linears.
    names = "|".join(re.escape(t) for t in targets)
    return rf"(.*\.)?language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"


def apply_lora(model, cfg: LoraSettings):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias=cfg.bias,
                      task_type="CAUSAL_LM", target_modules=lora_target_regex(cfg.target_modules))
    model = get_peft_model(model, lora)
    assert_no_adapter_in_vision(model)
    return model


def train_full_llm(model) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name) == "llm")


def assert_no_adapter_in_vision(model) -> None:
    bad = [n for n, _ in model.named_parameters() if "lora_" in n and part_of(n) != "llm"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and part_of(n) != "llm"]
    if bad or trainable:
        raise RuntimeError(f"vision tower or projector would train: adapters {bad[:5]}, trainable {trainable[:5]}")


def parameter_counts(model) -> dict[str, tuple[int, int]]:
    """{part: (trainable, total)} for vision, projector, llm and all."""
    counts = {k: [0, 0] for k in ("vision", "projector", "llm", "all")}
    for name, p in model.named_parameters():
        for key in (part_of(name), "all"):
            counts[key][1] += p.numel()
            if p.requires_grad:
                counts[key][0] += p.numel()
    return {k: tuple(v) for k, v in counts.items()}


def format_counts(counts: dict) -> str:
    lines = [f"{'part':<10} {'trainable':>15} {'total':>15} {'%':>7}"]
    for part, (trainable, total) in counts.items():
        pct = 100 * trainable / total if total else 0.0
        lines.append(f"{part:<10} {trainable:>15,} {total:>15,} {pct:>6.2f}%")
    return "\n".join(lines)


def prepare_model(model, method: str, lora: LoraSettings, vision: bool = False):
    """Freeze vision and projector, then adapt the language model (LoRA or full); with `vision` (full
    fine-tuning only) the vision tower and projector train too."""
    if method == "lora":
        model.requires_grad_(False)
        model = apply_lora(model, lora)
    elif vision:
        return model.requires_grad_(True)
    else:
        train_full_llm(model)
    assert_no_adapter_in_vision(model)
    return model


def resolve_checkpoint(model: str | None, adapter: str | None, checkpoint: str | None) -> tuple[str, str | None]:
    """(base model, adapter or None) for eval: a checkpoint folder is an adapter or a full model."""
    import json
    from pathlib import Path

    if checkpoint:
        folder = Path(checkpoint)
        if (folder / "adapter_config.json").is_file():
            if adapter:
                raise ValueError("give --checkpoint or --adapter, not both")
            adapter = str(folder)
        elif (folder / "config.json").is_file():
            return str(folder), adapter
        else:
            raise FileNotFoundError(f"{folder}: neither adapter_config.json nor config.json: not a checkpoint")
    if adapter and not model:
        model = json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
    return model or ModelConfig().name_or_path, adapter


def load_for_inference(cfg: ModelConfig, adapter: str | None, device: str):
    """Base model with the adapter merged in (merged weights generate faster than a PEFT wrapper)."""
    model = load_model(cfg, device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.config.use_cache = True
    return model.to(device).eval()
