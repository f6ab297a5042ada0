"""`pigg demo --quick --rl`: every stage of the demo runs, on the demo's own model and data, and writes
what it says it writes (the quick preset checks the pipeline, not learning)."""
import json

import pytest


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_the_grpo_comparison(tmp_path, capsys):
    from pigg.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--rl"]) == 0
    printed = capsys.readouterr().out
    runs = out / "runs"
    assert (runs / "global_agent_full" / "model.safetensors").is_file()
    assert (runs / "personal_agent_full" / "report.html").is_file()
    assert (runs / "rl_agent_lora" / "adapter_model.safetensors").is_file()
    for label, adapter in (("global", None), ("global+grpo", str(runs / "rl_agent_lora"))):
        metrics = json.loads((runs / "rl_demo_eval" / label / "metrics.json").read_text())
        assert metrics["adapter"] == adapter and metrics["micro"]["n"] == 4 * 6  # 4 held-out users, 6 samples each
        assert "point" in metrics["baselines"]["global_prior"]["baseline"]
    assert (runs / "rl_demo_eval" / "report.html").is_file()
    assert "global model:" in printed and "demo finished in" in printed
