"""The GPU benchmark's own bookkeeping, run on CPU with the tiny model: a variant that trains must come
back with its rate, plan and loss curve (a mistake here costs a whole GPU session)."""
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


class ClockEvent:
    """torch.cuda.Event's timing on the CPU's clock."""
    def __init__(self, enable_timing=False):
        self.time = None

    def record(self):
        self.time = time.perf_counter()

    def elapsed_time(self, end) -> float:
        return (end.time - self.time) * 1e3


@pytest.fixture
def train_throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "Event", ClockEvent)
    import train_throughput

    yield train_throughput
    sys.modules.pop("train_throughput", None)


def test_a_throughput_variant_reports_rate_plan_and_losses(train_throughput, tiny_dir, tmp_path, monkeypatch):
    from pigg.offline.synth import synthesize

    synthesize(tmp_path / "data", 8, samples_per_user=2, seed=0, width=180, height=400)  # users 1-8, as on the GPU
    settings = {"cudnn_attention": False, "lora.dropout": 0.0, "dataloader_workers": 0}
    monkeypatch.setitem(train_throughput.VARIANTS, "cpu", ("lora", settings, 3))
    monkeypatch.setattr(train_throughput, "CURVES", {"cpu"})  # logged every step
    result = train_throughput.pigg_variant("cpu", tiny_dir, tmp_path / "data", tmp_path, tokens=1054)
    assert (result["micro_batch"], result["grad_accum"], result["checkpointing"]) == (1, 8, 0)
    assert len(result["step_seconds"]) == 2 and result["samples_per_s"] > 0
    assert len(result["losses"]) == 3 and all(loss > 0 for loss in result["losses"])
    assert len(result["grad_norms"]) == 3 and all(norm > 0 for norm in result["grad_norms"])
    assert not (tmp_path / "cpu").exists()  # the output is removed after reading it


def test_cudnn_attention_switch_is_restored():
    from pigg.fast import cudnn_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with cudnn_attention(not before):
        assert torch.backends.cuda.cudnn_sdp_enabled() == (not before)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_compile_grads_runs_and_measures(monkeypatch, tmp_path):
    """bench/compile_grads.py end to end with the tiny model on CPU (bf16 autocast)."""
    import json

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("OUT", str(tmp_path))
    import compile_grads

    try:
        compile_grads.main()
    finally:
        sys.modules.pop("compile_grads", None)
    record = json.loads((tmp_path / "compile_grads.json").read_text())
    for case in ("B_zero", "B_random"):
        measured = record["cases"][case]
        assert measured["eager_again_vs_eager"]["max_rel_err"] == 0  # the CPU is deterministic
        assert measured["compiled_vs_eager"]["max_rel_err"] < 0.05
        assert measured["compiled_vs_eager"]["nonzero_where_eager_zero"] == 0
    # AdamW's first step, against the gradient's sign, lowers the loss in every arithmetic
    assert all(change < 0 for change in record["first_update_loss_change"].values())
    shares = record["one_layer_kept_share"]
    assert shares["B_0.005"]["eager"] == pytest.approx(1, abs=0.01)
    assert shares["B_5e-05"]["eager"] < 0.9  # bf16 rounds away part of a small adapter's contribution
