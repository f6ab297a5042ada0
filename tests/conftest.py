import importlib.util
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if importlib.util.find_spec("triton") and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton's kernels run on numpy (tests/test_lora_kernels.py)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from pigg.offline.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def lora_model(tiny_dir):
    """The tiny model with the seed's LoRA (dropout 0.1) and non-zero B, so the adapters change the output
    (tests/test_lora.py, tests/test_lora_kernels.py)."""
    from pigg.config import LoraSettings, ModelConfig
    from pigg.fast.lora import adapted_layers
    from pigg.model.loading import load_model, prepare_model

    model = prepare_model(load_model(ModelConfig(name_or_path=str(tiny_dir)), "cpu"), "lora", LoraSettings())
    torch.manual_seed(1)
    for layer in adapted_layers(model):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    return model.train()


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from pigg.data.processor import load_processor

    return load_processor(str(tiny_dir), max_pixels=200 * 400)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from pigg.offline.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, 3, samples_per_user=8, seed=0, width=180, height=400)
    return root


def losses(folder):
    """The training losses a run's newest checkpoint recorded, step by step."""
    from pigg.offline.demo import loss_curve

    return [loss for _, loss in loss_curve(folder)]


def tiny_run_config(tiny_dir, data_root, out, **train):
    """A fast, deterministic CPU run of the tiny model."""
    from pigg import config as C

    cfg = C.RunConfig()
    cfg.model.name_or_path, cfg.model.max_pixels = str(tiny_dir), 200 * 400
    cfg.data.data_root, cfg.data.users, cfg.data.validation_workers = str(data_root), "1-3", 1
    t = cfg.train
    t.output_dir, t.log_dir = str(out), str(out / "logs")
    t.learning_rate, t.warmup_steps, t.grad_accum, t.max_steps = 1e-2, 0, 2, 4
    t.gradient_checkpointing, t.dataloader_workers, t.save_steps, t.logging_steps = False, 0, 2, 1
    for key, value in train.items():  # a speed switch goes to `fast`, the rest to `train`
        setattr(cfg.fast if key in C.MOVED_TO_FAST else t, key, value)
    return cfg


@pytest.fixture
def root(tmp_path):
    """A data root holding one 60x120 screenshot, shot.png (tests/test_data*.py)."""
    from PIL import Image

    Image.new("RGB", (60, 120), "white").save(tmp_path / "shot.png")
    return tmp_path


def data_config(root, users="1", **kw):
    """The data settings of a small validation run on `root`."""
    from pigg.config import DataConfig

    return DataConfig(data_root=str(root), users=users, validation_workers=1, **kw)
