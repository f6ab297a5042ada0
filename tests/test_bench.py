"""The GPU benchmark's own bookkeeping, run on CPU with the tiny model: a variant that trains must come
back with its rate, plan and loss curve (a mistake here costs a whole GPU session)."""
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def train_throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    import train_throughput

    yield train_throughput
    sys.modules.pop("train_throughput", None)


def test_a_throughput_variant_reports_rate_plan_and_losses(train_throughput, tiny_dir, tmp_path, monkeypatch):
    from pigg.synth import synthesize

    synthesize(tmp_path / "data", 8, samples_per_user=2, seed=0, width=180, height=400)  # users 1-8, as on the GPU
    settings = {"cudnn_attention": False, "lora.dropout": 0.0, "dataloader_workers": 0}
    monkeypatch.setitem(train_throughput.VARIANTS, "cpu", ("lora", settings, 3))
    result = train_throughput.pigg_variant("cpu", tiny_dir, tmp_path / "data", tmp_path, tokens=1054)
    assert (result["micro_batch"], result["grad_accum"], result["checkpointing"]) == (1, 8, False)
    assert len(result["step_seconds"]) == 2 and result["samples_per_s"] > 0
    assert len(result["losses"]) == 3 and all(loss > 0 for loss in result["losses"])
    assert not (tmp_path / "cpu").exists()  # the output is removed after reading it


def test_cudnn_attention_switch_is_restored():
    from pigg.train import cudnn_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with cudnn_attention(not before):
        assert torch.backends.cuda.cudnn_sdp_enabled() == (not before)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
