"""A tiny random Qwen3-VL checkpoint folder with the real tokenizer, for tests and the demo."""
from pathlib import Path

import torch

from pigg.model.architectures import tiny_qwen3_vl_config
from pigg.data.processor import make_processor, save_processor


def make_tiny_checkpoint(path, seed: int = 0, position_scale: float = 1.0, config=None) -> Path:
    """Write a loadable tiny Qwen3-VL (random weights, fp32) plus its processor to `path`.

    `position_scale` multiplies the vision tower's random position embeddings. At 1 (the initialiser's
    0.02) they are about 40 times weaker than a patch's pixels, so the frozen tower's output hardly tells
    one place from another; the demo, which must find where things are, raises them to the pixels' size.
    `config`: another architecture than `tiny_qwen3_vl_config()` (the demo's)."""
    from transformers import Qwen3VLForConditionalGeneration

    path = Path(path)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config or tiny_qwen3_vl_config())
    with torch.no_grad():
        model.model.visual.pos_embed.weight.mul_(position_scale)
    model.generation_config.eos_token_id = [151645, 151643]
    model.generation_config.pad_token_id = 151643
    model.save_pretrained(path)
    save_processor(make_processor(), path)
    return path


def make_config_folder(path, config) -> Path:
    """A folder with an architecture's config.json and the processor but no weights: with
    `model.random_weights` pigg builds it with random weights (benchmarks of the 8B model)."""
    path = Path(path)
    config.save_pretrained(path)
    save_processor(make_processor(), path)
    return path
