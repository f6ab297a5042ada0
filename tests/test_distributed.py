"""Several processes on the CPU (gloo): DDP and FSDP train to one process's weights at the same
effective batch, checkpoints resume on another process count, `--gpus` builds the right launcher
command, and data-parallel evaluation writes one process's metrics."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import losses, tiny_run_config
from pigg import config as C
from pigg.distributed import Launch, launch_environment, launcher_command, strategy, trainer_arguments
from test_train import FULL_FILES, LORA_FILES

FSDP_ON_CPU = Path(__file__).parent / "fsdp_on_cpu.py"
SRC = Path(__file__).resolve().parent.parent / "src"


def environment(**changes) -> dict:
    """This environment for a subprocess that runs elsewhere than the repository (pigg importable)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), **changes}


def run_config(tiny_dir, synth_root, out, method="lora", steps=4):
    """4 samples a step (2 processes: micro-batch 1 x accumulation 2 each); a constant learning rate, so
    that a run stopped at step 2 and resumed to step 4 is the same run as one of 4 steps."""
    cfg = tiny_run_config(tiny_dir, synth_root, out, method=method, grad_accum=None, effective_batch=4,
                          max_steps=steps, save_steps=2, learning_rate=1e-3, lr_scheduler="constant")
    cfg.lora.dropout = 0.0  # dropout masks are drawn per process, so they differ between layouts
    return cfg


def pigg(args, cwd, nproc=1, fsdp_on_cpu=False):
    """`pigg <args>` in fresh CPU processes: through pigg's own launcher (`--nproc`), or through torchrun
    and tests/fsdp_on_cpu.py, which lets accelerate apply FSDP to CPU processes."""
    env = environment(CUDA_VISIBLE_DEVICES="")
    if fsdp_on_cpu:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(FSDP_ON_CPU), *args]
    else:
        cmd = [sys.executable, "-m", "pigg.cli", *args, "--nproc", str(nproc)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run


def train_in_processes(cfg, tmp_path, nproc, resume=False, fsdp_on_cpu=False):
    cfg.train.resume = resume
    path = tmp_path / f"{Path(cfg.train.output_dir).name}_{cfg.train.max_steps}.yaml"
    C.save_yaml(cfg, path)
    run = pigg(["train", "--config", str(path)], tmp_path, nproc, fsdp_on_cpu)
    return C.output_folder(cfg), run


def weights(folder: Path) -> dict:
    name = "adapter_model.safetensors" if (folder / "adapter_config.json").is_file() else "model.safetensors"
    return load_file(folder / name)


def assert_same_weights(a: dict, b: dict, changed_from: dict | None = None):
    """Equal within float32 summation order: processes sum gradients in another order than one process,
    and AdamW turns that noise in a gradient entry near zero into up to a learning rate's (1e-3) change.
    On one CPU (AMD EPYC, 2026-12-02) a single lm_head entry of 9.7M differed by 3.4e-6 after 4 steps."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    if changed_from is not None:  # the comparison is only worth something if training moved the weights
        assert max((a[k] - changed_from[k]).abs().max() for k in a if k in changed_from) > 1e-3


@pytest.fixture(scope="module")
def one_process(tiny_dir, synth_root, tmp_path_factory):
    """The reference runs: 4 steps of 4 samples in this process, LoRA and full fine-tuning."""
    from pigg.train import train

    root = tmp_path_factory.mktemp("one_process")
    return {method: train(run_config(tiny_dir, synth_root, root / method, method)) for method in ("lora", "full")}


# ---- the launcher -------------------------------------------------------------------------------

def test_gpus_flag_builds_a_torchrun_command():
    cmd = launcher_command(["train", "--lora"], Launch(gpus="0,1,2,3"), python="py", env={})
    assert cmd == ["py", "-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
                   "-m", "pigg.cli", "train", "--lora"]
    assert launch_environment(Launch(gpus="2, 3"), env={}, cpu_count=16) == {
        "CUDA_VISIBLE_DEVICES": "2,3", "OMP_NUM_THREADS": "8"}
    assert launch_environment(Launch(nproc=2), env={"OMP_NUM_THREADS": "1"}) == {"CUDA_VISIBLE_DEVICES": ""}

    multi = launcher_command(["eval"], Launch(gpus="0,1", nnodes=2, rdzv_endpoint="node1:29400", rdzv_id="job7"),
                             python="py", env={})
    assert multi[3:13] == ["--nproc-per-node", "2", "--nnodes", "2", "--rdzv-backend", "c10d",
                           "--rdzv-endpoint", "node1:29400", "--rdzv-id", "job7"]
    # one process, or already under a launcher (torchrun sets WORLD_SIZE): this process does the work itself
    assert launcher_command(["train"], Launch(gpus="3"), env={}) is None
    assert launcher_command(["train"], Launch(gpus="0,1"), env={"WORLD_SIZE": "2"}) is None


@pytest.mark.parametrize("launch, message", [
    (Launch(gpus="0,a"), "GPU indices"),
    (Launch(gpus="1,1"), "names a GPU twice"),
    (Launch(gpus="0,1", nproc=2), "not both"),
    (Launch(gpus="0,1", nnodes=2), "--rdzv-endpoint"),
])
def test_bad_launch_flags_are_errors(launch, message):
    with pytest.raises(ValueError, match=message):
        launcher_command(["train"], launch, env={})


def test_train_and_seed_shim_relaunch_through_torchrun(monkeypatch):
    import pigg.distributed
    from pigg.cli import main, without_launch_flags
    from pigg.seed_cli import finetune_global_main

    class Launched(Exception):
        pass

    def capture(cmd, env):
        raise Launched(cmd, env)

    monkeypatch.setattr(pigg.distributed, "relaunch", capture)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored afterwards: the shim sets it
    with pytest.raises(Launched) as launched:
        main(["train", "--gpus", "0,1", "--lora", "--data-root", "/d"])
    cmd, env = launched.value.args
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    assert cmd[6:] == ["-m", "pigg.cli", "train", "--lora", "--data-root", "/d"]
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"

    with pytest.raises(Launched) as launched:
        finetune_global_main(["0,1", "--data-root", "/d"])  # the seed's full fine-tuning on two GPUs
    cmd, env = launched.value.args
    assert cmd[cmd.index("pigg.cli") + 1:] == ["train", "--full", "--lr", "1e-6", "--data-root", "/d"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and env["CUDA_VISIBLE_DEVICES"] == "0,1"

    assert without_launch_flags(["eval", "--gpus=0,1", "--users", "1-3", "--nproc", "2", "--nnodes", "1"]) == [
        "eval", "--users", "1-3"]


def test_strategy_and_trainer_arguments(tiny_dir):
    from transformers import Qwen3VLForConditionalGeneration

    from pigg.model.batch_plan import static_bytes

    lora, full = C.TrainConfig(method="lora"), C.TrainConfig(method="full")
    assert (strategy(lora, 1), strategy(lora, 2), strategy(full, 1), strategy(full, 4)) == (
        "single", "ddp", "single", "fsdp")
    assert strategy(C.TrainConfig(method="full", distributed="ddp"), 2) == "ddp"
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    assert trainer_arguments("ddp", model) == {"ddp_find_unused_parameters": False}
    fsdp = trainer_arguments("fsdp", model)
    assert fsdp["fsdp_config"]["version"] == 2 and fsdp["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"]
    assert trainer_arguments("single", model) == {}
    assert static_bytes(model, shards=4) == static_bytes(model) // 4
    bad = C.RunConfig()
    bad.train.distributed = "zero3"
    with pytest.raises(C.ConfigError, match="train.distributed"):
        C.validate(bad)


# ---- training -----------------------------------------------------------------------------------

def supervised_tokens(log: str) -> list[str]:
    key = "'supervised_tokens_per_step': "
    return [line.split(key)[1][:8] for line in log.splitlines() if key in line]


def test_ddp_trains_like_one_process(one_process, tiny_dir, synth_root, tmp_path):
    """2 processes x micro-batch 1 x accumulation 2 = 1 process x accumulation 4: the same losses at
    every step and the same adapter; rank 0 alone writes the shared files."""
    folder, run = train_in_processes(run_config(tiny_dir, synth_root, tmp_path / "ddp"), tmp_path, nproc=2)
    assert "DDP over 2 processes" in run.stdout and "pigg: launching the processes" in run.stdout
    assert {p.name for p in folder.iterdir()} == LORA_FILES
    assert losses(folder) == pytest.approx(losses(one_process["lora"]), rel=1e-5) and len(losses(folder)) == 4
    assert_same_weights(weights(folder), weights(one_process["lora"]))
    assert any(v.abs().sum() > 0 for k, v in weights(folder).items() if "lora_B" in k)  # B starts at 0: it trained
    plan = json.loads((folder / "provenance.json").read_text())["batch_plan"]
    assert (plan["micro_batch"], plan["grad_accum"], plan["world_size"]) == (1, 2, 2)
    assert len(list((folder / "tensorboard").iterdir())) == 1
    assert len(list((tmp_path / "ddp" / "logs").iterdir())) == 1
    log = next((tmp_path / "ddp" / "logs").iterdir()).read_text()
    reference = next((one_process["lora"].parent / "logs").iterdir()).read_text()
    assert supervised_tokens(log) and supervised_tokens(log) == supervised_tokens(reference)  # summed over ranks


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_lora_resumes_on_another_process_count(first, then, one_process, tiny_dir, synth_root, tmp_path):
    folder, _ = train_in_processes(run_config(tiny_dir, synth_root, tmp_path / "run", steps=2), tmp_path, first)
    _, run = train_in_processes(run_config(tiny_dir, synth_root, tmp_path / "run", steps=4), tmp_path, then,
                                resume=True)
    assert "checkpoint-2" in run.stdout.split("resuming from", 1)[1].splitlines()[0]
    state = json.loads((folder / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and json.loads((folder / "provenance.json").read_text())["optimizer_steps"] == 4
    assert losses(folder) == pytest.approx(losses(one_process["lora"]), rel=1e-5)
    assert_same_weights(weights(folder), weights(one_process["lora"]))


def test_fsdp_full_fine_tuning_matches_one_process(one_process, tiny_dir, synth_root, tmp_path):
    """FSDP2 over 2 processes: the same losses and weights as one process, saved as one consolidated
    model.safetensors in the single-process layout."""
    folder, run = train_in_processes(run_config(tiny_dir, synth_root, tmp_path / "fsdp", "full"), tmp_path, 2,
                                     fsdp_on_cpu=True)
    assert "FSDP2 over 2 processes" in run.stdout
    assert {p.name for p in folder.iterdir()} == FULL_FILES
    assert losses(folder) == pytest.approx(losses(one_process["full"]), rel=1e-5)
    assert_same_weights(weights(folder), weights(one_process["full"]),
                        changed_from=load_file(tiny_dir / "model.safetensors"))


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2), (2, 4)])
def test_full_fine_tuning_resumes_on_another_process_count(first, then, one_process, tiny_dir, synth_root, tmp_path):
    """FSDP -> one process and back (the checkpoint layouts differ: pigg converts), and FSDP over 2 -> 4."""
    folder, _ = train_in_processes(run_config(tiny_dir, synth_root, tmp_path / "run", "full", steps=2), tmp_path,
                                   first, fsdp_on_cpu=first > 1)
    assert (folder / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file() == (first > 1)
    _, run = train_in_processes(run_config(tiny_dir, synth_root, tmp_path / "run", "full", steps=4), tmp_path,
                                then, resume=True, fsdp_on_cpu=then > 1)
    assert ("converting weights and optimizer state" in run.stdout) == ((first > 1) != (then > 1))
    assert json.loads((folder / "provenance.json").read_text())["optimizer_steps"] == 4
    assert losses(folder) == pytest.approx(losses(one_process["full"]), rel=1e-5)
    assert_same_weights(weights(folder), weights(one_process["full"]))


# ---- evaluation ---------------------------------------------------------------------------------

def test_data_parallel_eval_writes_one_process_metrics(one_process, synth_root, tmp_path):
    def evaluate(out, nproc):
        pigg(["eval", "--checkpoint", str(one_process["lora"]), "--data-root", str(synth_root), "--users", "1-3",
              "--out", str(out), "--batch-size", "3", "--max-new-tokens", "6", "--workers", "0",
              "--max-pixels", str(200 * 400), "--data.validation_workers", "1"], tmp_path, nproc)
        records = {}
        for path in (out / "predictions").iterdir():
            assert path.is_file(), f"{path}: ranks' folders must be gathered"
            if path.name == "answered_by.json":
                continue
            for line in path.read_text().splitlines():
                r = json.loads(line)
                assert (r["user"], r["index"]) not in records, "a sample predicted twice"
                records[r["user"], r["index"]] = r["raw"]
        return (out / "metrics.json").read_text(), records

    one_metrics, one_records = evaluate(tmp_path / "one", 1)
    two_metrics, two_records = evaluate(tmp_path / "two", 2)
    assert len(one_records) == json.loads(one_metrics)["micro"]["n"] == 22
    assert two_records == one_records and two_metrics == one_metrics

    # An interrupted data-parallel run left rank 1's file with a finished answer and a line cut in half:
    # the rerun keeps the answer, redoes the rest and writes the same metrics as an uninterrupted run.
    pred = tmp_path / "cut" / "predictions"
    (pred / "rank1").mkdir(parents=True)
    user, index = sorted(one_records)[0]
    record = next(json.loads(line) for line in (tmp_path / "one" / "predictions" / f"user_{user}.jsonl")
                  .read_text().splitlines() if json.loads(line)["index"] == index)
    cut = '{"user": 1, "ind'
    (pred / "rank1" / f"user_{user}.jsonl").write_text(json.dumps({**record, "command": "kept"}) + "\n" + cut)
    cut_metrics, cut_records = evaluate(tmp_path / "cut", 2)
    assert cut_records == one_records and cut_metrics == one_metrics
    kept = [json.loads(line) for line in (pred / f"user_{user}.jsonl").read_text().splitlines()]
    assert [r["command"] for r in kept if r["index"] == index] == ["kept"]


# ---- reinforcement fine-tuning -------------------------------------------------------------------

@pytest.mark.slow
def test_rl_runs_in_two_processes_through_the_same_launcher(tiny_dir, synth_root, tmp_path):
    """`pigg rl --nproc 2`: TRL's GRPOTrainer under pigg's launcher, each process sampling and scoring its
    share of a step's answers; the main process writes the adapter and provenance once."""
    cfg = tiny_run_config(tiny_dir, synth_root, tmp_path / "rl", max_steps=2, batch_size=2, grad_accum=None,
                          learning_rate=5e-2)
    cfg.data.users = "1"
    cfg.rl.generations, cfg.rl.prompts_per_step, cfg.rl.max_new_tokens, cfg.rl.temperature = 4, 1, 8, 1.5
    path = tmp_path / "rl.yaml"
    C.save_yaml(cfg, path)
    run = pigg(["rl", "--config", str(path)], tmp_path, nproc=2)
    from pigg.rl import output_folder

    out = output_folder(cfg)
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["method"] == "grpo" and provenance["optimizer_steps"] == 2
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()
    assert run.stdout.count("saved the GRPO adapter") == 1  # the other process is quiet
    assert "rl: 2 process(es); a step samples 4 answers to each of 1 prompt(s), 2 answers on each process" in run.stdout


# ---- on GPUs ------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpus_flag_trains_with_ddp_and_fsdp_on_two_gpus(tiny_dir, synth_root, tmp_path):
    """The real path on a machine with 2+ GPUs: NCCL, bf16, FSDP without the CPU shim."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    for method in ("lora", "full"):
        cfg = run_config(tiny_dir, synth_root, tmp_path / method, method)
        C.save_yaml(cfg, tmp_path / f"{method}.yaml")
        run = subprocess.run([sys.executable, "-m", "pigg.cli", "train", "--config", str(tmp_path / f"{method}.yaml"),
                              "--gpus", "0,1"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                             env=environment())
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        assert ("DDP over 2" if method == "lora" else "FSDP2 over 2") in run.stdout
        folder = C.output_folder(cfg)
        # With torchvision (GPU machines) the stock processor keeps its video settings in processor_config.json
        expected = LORA_FILES if method == "lora" else FULL_FILES
        assert expected - {"video_preprocessor_config.json"} <= {p.name for p in folder.iterdir()} <= expected
        assert len(losses(folder)) == 4
