"""The GPU benchmarks' own bookkeeping, run on CPU: a variant that trains (tiny model) must come back with
its rate, plan and loss curve, bench/run_1gpu.sh must call scripts and variants that exist, and the results
table must read their files (a mistake here costs a whole GPU session)."""
import importlib
import json
import os
import re
import shutil
import subprocess
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
    settings = {"fast.cudnn_attention": False, "lora.dropout": 0.0, "dataloader_workers": 0}
    monkeypatch.setitem(train_throughput.PIGG, "cpu", ("lora", settings, 3))
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
        compile_grads.main([])
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


def test_every_pigg_variant_is_a_valid_config(train_throughput):
    """A setting renamed or moved in pigg.config must fail here, not an hour into a GPU session."""
    from pigg import config as C

    for name, (method, settings, steps) in train_throughput.PIGG.items():
        sections = {}
        for key, value in settings.items():
            section, _, field = key.rpartition(".")
            sections.setdefault(section or "train", {})[field] = value
        C.validate(C.from_dict(sections, C.RunConfig(), source=name))  # raises on an unknown or bad setting
        assert method in ("lora", "full") and steps >= 2, name
    assert set(train_throughput.VARIANTS) == {*train_throughput.PIGG, *train_throughput.TRL, "input_pipeline"}


def test_unknown_variant_is_an_error_not_every_variant(train_throughput, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_throughput.parse_args(["seed_lora", "pigg_defualt_lora"])
    assert exit_.value.code == 2 and "pigg_defualt_lora" in capsys.readouterr().err
    assert train_throughput.parse_args(["seed_lora", "trl_sft_best"]).variants == ["seed_lora", "trl_sft_best"]


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("*.py") if "def main(" in p.read_text()))
def test_every_bench_script_has_a_help(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    try:
        module = importlib.import_module(script)
        with pytest.raises(SystemExit) as exit_:
            module.main(["--help"])
    finally:
        sys.modules.pop(script, None)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def fake_tools(folder: Path) -> Path:
    """nvidia-smi that names an H200, and python3 that logs its arguments, OUT and PYTHONPATH as one JSON line
    to $LOG and writes the file --json names, as the real scripts do: what bench/run_1gpu.sh runs, without
    running it."""
    folder.mkdir()
    (folder / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'NVIDIA H200, 143771 MiB, 580.1'\n")
    (folder / "python3").write_text(f"""#!/usr/bin/env bash
exec {sys.executable} -c '
import json, os, sys
args = sys.argv[1:]
with open(os.environ["LOG"], "a") as log:
    log.write(json.dumps(dict(args=args, out=os.environ.get("OUT"), path=os.environ.get("PYTHONPATH", ""))) + "\\n")
if "--json" in args:
    open(os.path.join(os.environ["OUT"], args[args.index("--json") + 1]), "w").write("[]")
' "$@"
""")
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


def run_script(tmp_path: Path, *args: str, wheels: bool = False) -> list[dict]:
    """bench/run_1gpu.sh copied into a bare repository under tmp_path and run there with the fake tools."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(BENCH / "run_1gpu.sh", repo / "bench")
    if wheels:
        (repo / ".whl").mkdir()
        (repo / ".whl" / "trl-1.0-py3-none-any.whl").write_text("")
    tools, log, out = fake_tools(tmp_path / "tools"), tmp_path / "log.jsonl", tmp_path / "out"
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "LOG": str(log), "OUT": str(out)}
    env.pop("PYTHONPATH", None)
    subprocess.run(["bash", str(repo / "bench" / "run_1gpu.sh"), *args], env=env, check=True, capture_output=True)
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_run_1gpu_sh_is_valid_bash_and_calls_scripts_and_variants_that_exist(train_throughput, tmp_path):
    script = BENCH / "run_1gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    for named in re.findall(r"bench/[\w/]+\.(?:py|sh)", script.read_text()):
        assert (BENCH.parent / named).is_file(), named

    calls = run_script(tmp_path)
    out = str(tmp_path / "out")
    training = [c["args"] for c in calls if c["args"][0] == "bench/train_throughput.py"]
    variants = [args[1] for args in training]
    assert variants == ["seed_lora", "trl_sft_best", "trl_sft_whole_gpu", "pigg_default_lora_80gb", "seed_full",
                        "pigg_default_full"]
    assert all(v in train_throughput.VARIANTS for v in variants)
    assert training == [["bench/train_throughput.py", v, "--json", f"train_throughput_{v}_h200.json"] for v in variants]
    evaluation = [c["args"] for c in calls if c["args"][0] == "bench/eval_gpu.py"]
    assert evaluation == [["bench/eval_gpu.py", "128", "--seed-samples", "4", "--parts", "seed,current,pigg,noliger",
                           "--json", "eval_gpu_h200.json"]]
    rl = [c["args"] for c in calls if c["args"][0] == "bench/rl_gpu.py"]
    assert rl == [["bench/rl_gpu.py", "--steps", "3", "--json", "rl_gpu_h200.json"]]
    table = calls[-1]["args"]
    assert table[0] == "bench/results_table.py"
    assert sorted(table[1:]) == sorted([f"{out}/train_throughput_{v}_h200.json" for v in variants]
                                       + [f"{out}/eval_gpu_h200.json", f"{out}/rl_gpu_h200.json"])
    assert all(c["out"] == out for c in calls)
    for c in calls:
        assert (BENCH.parent / c["args"][0]).is_file(), c["args"][0]
        assert c["path"].split(":")[0].endswith("/repo/src")  # pigg from the checkout, no wheels here
        assert "/tmp/site" not in c["path"]
    # each script takes the arguments it is given (an unknown option or variant exits with an error)
    train_throughput.parse_args(training[0][1:])
    eval_gpu = importlib.import_module("eval_gpu")
    try:
        args = eval_gpu.parse_args(evaluation[0][1:])
    finally:
        sys.modules.pop("eval_gpu", None)
    assert (args.batch_sizes, args.parts, args.json) == ([128], "seed,current,pigg,noliger", "eval_gpu_h200.json")
    rl_gpu = importlib.import_module("rl_gpu")
    try:
        assert rl_gpu.parse_args(rl[0][1:]).json == "rl_gpu_h200.json"
    finally:
        sys.modules.pop("rl_gpu", None)


def test_run_1gpu_sh_runs_the_steps_named_and_installs_wheels_when_present(tmp_path):
    calls = run_script(tmp_path, "pigg_default_full", "eval", wheels=True)
    install, *runs = calls
    assert install["args"][:3] == ["-m", "pip", "install"] and "/tmp/site" in install["args"]
    assert install["args"][-1].endswith(".whl/trl-1.0-py3-none-any.whl")
    out = tmp_path / "out"
    assert [c["args"] for c in runs] == [
        ["bench/train_throughput.py", "pigg_default_full", "--json", "train_throughput_pigg_default_full_h200.json"],
        ["bench/eval_gpu.py", "128", "--seed-samples", "4", "--parts", "seed,current,pigg,noliger", "--json",
         "eval_gpu_h200.json"],
        ["bench/results_table.py", f"{out}/train_throughput_pigg_default_full_h200.json", f"{out}/eval_gpu_h200.json"]]
    assert all("/tmp/site" in c["path"].split(":") for c in runs)


def test_results_table_reads_the_files_in_the_readme_order(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import results_table

    def row(name, method, mb, acc, ckpt, rate, peak, mfu):
        return dict(name=name, method=method, micro_batch=mb, grad_accum=acc, checkpointing=ckpt,
                    samples_per_s=rate, peak_gib=peak, mfu_pct=mfu)

    (tmp_path / "a.json").write_text(json.dumps([row("pigg_default_full", "full", 8, 1, 0, 10.45, 88.2, 54.2),
                                                 row("lever_liger", "lora", 1, 8, 36, 1.11, 18.0, 4.0),
                                                 dict(name="seed_full", error="CUDA out of memory")]))
    (tmp_path / "b.json").write_text(json.dumps([row("seed_lora", "lora", 1, 8, 36, 1.0, 18.9, 3.6)]))
    def answers(end_to_end, steady, peak):
        return dict(batch_size=0, samples_per_s=end_to_end, steady_samples_per_s=steady, peak_gib=peak)

    (tmp_path / "eval.json").write_text(json.dumps({
        "device": "NVIDIA H200", "new_tokens": 40, "pigg_bs128": answers(7.7, 10.68, 55.0),
        "pigg_bs32": answers(7.0, 7.44, 20.0), "current_bs128": answers(6.0, 9.0, 56.0),
        "seed_bs1": answers(0.4, 0.53, 17.1), "agreement_current_fast": dict(samples=384), "levers": {}}))
    run = dict(answers_per_forward=8, timed_steps=2, prompts_per_second=0.52, step_seconds=7.7, sampling_seconds=5.1,
               update_and_scoring_seconds=2.6, sampling_share=0.66, answer_length=64.0, peak_gib=70.3)
    (tmp_path / "rl.json").write_text(json.dumps({
        "device": "NVIDIA H200", "generations": 8, "prompts_per_step": 4, "max_new_tokens": 64, "beta": 0.04,
        "runs": [dict(run, sampler="pigg"), dict(run, sampler="transformers", prompts_per_second=0.25)]}))
    try:
        results_table.main([str(tmp_path / name) for name in ("a.json", "b.json", "eval.json", "rl.json")])
    finally:
        sys.modules.pop("results_table", None)
    assert capsys.readouterr().out.splitlines() == [
        "| run | mb x acc | ckpt layers | samples/s | peak GiB | MFU | LoRA epoch of 90,727 |",
        "|---|---|---|---|---|---|---|",
        "| seed recipe LoRA | 1x8 | 36 | 1.00 | 18.9 | 3.6% | 25.2 h |",
        "| seed recipe full FT | error: CUDA out of memory | | | | | |",
        "| pigg default full FT | 8x1 | 0 | 10.45 | 88.2 | 54.2% |  |",
        "| lever_liger | 1x8 | 36 | 1.11 | 18.0 | 4.0% | 22.7 h |",
        "",
        "| evaluation batch | samples/s end to end | steady | peak GiB |",
        "|---|---|---|---|",
        "| 1 (the seed's loop) | 0.40 | 0.53 | 17.1 |",
        "| 128 (transformers' generate()) | 6.00 | 9.00 | 56.0 |",
        "| 32 | 7.00 | 7.44 | 20.0 |",
        "| 128 | 7.70 | 10.68 | 55.0 |",
        "",
        "| GRPO sampler | G x prompts, tokens | prompts/s | step s | sampling s | update s | peak GiB |",
        "|---|---|---|---|---|---|---|",
        "| pigg's generator | 8x4, 64 | 0.52 | 7.7 | 5.1 | 2.6 | 70.3 |",
        "| TRL's generate() | 8x4, 64 | 0.25 | 7.7 | 5.1 | 2.6 | 70.3 |"]


def test_input_pipeline_times_the_training_collator(train_throughput, tiny_dir, tmp_path, monkeypatch):
    from pigg.offline.synth import synthesize

    synthesize(tmp_path / "data", 8, samples_per_user=1, seed=0, width=180, height=400)
    monkeypatch.setattr(train_throughput, "WORKERS", (1,))
    result = train_throughput.input_pipeline(tiny_dir, tmp_path / "data")
    assert result["name"] == "input_pipeline" and list(result["samples_per_s_by_workers"]) == ["1"]
    assert result["samples_per_s_by_workers"]["1"] > 0
