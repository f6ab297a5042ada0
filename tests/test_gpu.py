"""GPU-only checks, run on the device machine with `pytest -m gpu`."""
import pytest
import torch

from conftest import tiny_run_config

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def test_stock_processor_loads_the_saved_folder(tiny_dir):
    from transformers import AutoProcessor, Qwen3VLProcessor

    from pigg.processor import has_torchvision, load_processor

    assert has_torchvision()
    assert isinstance(AutoProcessor.from_pretrained(tiny_dir), Qwen3VLProcessor)
    processor = load_processor(str(tiny_dir), max_pixels=1280 * 28 * 28)
    assert processor.image_processor.size["longest_edge"] == 1280 * 28 * 28


def test_tiny_lora_trains_in_bf16_on_gpu(tiny_dir, synth_root, tmp_path):
    from safetensors.torch import load_file

    from pigg.train import train

    folder = train(tiny_run_config(tiny_dir, synth_root, tmp_path, dataloader_workers=2))
    adapter = load_file(folder / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
