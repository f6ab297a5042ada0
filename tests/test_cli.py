import pytest

from pigg import config as C
from pigg.cli import build_parser, config_from_args, main, single_gpu_guard
from pigg.seed_cli import translate_finetune_global


@pytest.mark.parametrize("argv, env, expected", [
    (["0", "--lora"], "0", ["train", "--lora", "--gpus", "0", "--lr", "1e-6"]),
    (["0,1"], "0,1", ["train", "--full", "--gpus", "0,1", "--lr", "1e-6"]),
    (["2", "--lora", "--u", "11", "50"], "2", ["train", "--lora", "--gpus", "2", "--lr", "1e-6", "--users", "11-50"]),
    (["0", "--u", "1", "3", "9", "--data-root", "/d"], "0",
     ["train", "--full", "--gpus", "0", "--lr", "1e-6", "--users", "1,3,9", "--data-root", "/d"]),
])
def test_seed_shim_translates_its_arguments(argv, env, expected):
    assert translate_finetune_global(argv) == ({"CUDA_VISIBLE_DEVICES": env}, expected)


@pytest.mark.parametrize("method", ["--lora", "--full"])
def test_seed_shim_keeps_the_seeds_learning_rate_and_lets_a_flag_override_it(method):
    argv = translate_finetune_global(["0", method] if method == "--lora" else ["0"])[1]
    cfg = C.validate(config_from_args(build_parser().parse_args(argv)))
    assert cfg.train.learning_rate == 1e-6 and cfg.train.method == method[2:]
    argv = translate_finetune_global(["0", method, "--lr", "3e-5"] if method == "--lora" else ["0", "--lr", "3e-5"])[1]
    assert C.validate(config_from_args(build_parser().parse_args(argv))).train.learning_rate == 3e-5


def test_seed_shim_rejects_a_bad_gpu_list():
    with pytest.raises(SystemExit):
        translate_finetune_global(["gpu0"])


def test_defaults_are_the_seeds():
    cfg = config_from_args(build_parser().parse_args(["train"]))
    assert (cfg.train.learning_rate, cfg.train.epochs, cfg.train.effective_batch) == (None, 1.0, 8)
    assert (cfg.train.warmup_steps, cfg.train.weight_decay, cfg.train.save_steps, cfg.train.save_total_limit) == (50, 0.01, 500, 3)
    # micro-batch, accumulation and checkpointing are chosen from the GPU's memory (tests/test_batching.py)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.gradient_checkpointing) == (None, None, None)
    assert cfg.data.users == "11-83"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.bias) == (8, 32, 0.1, "none")
    assert cfg.model.name_or_path == "Qwen/Qwen3-VL-8B-Instruct" and cfg.model.max_pixels == 1280 * 28 * 28


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-4\n  grad_accum: 4\nlora:\n  r: 16\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--grad-accum", "2", "--full", "--batch-size", "4",
                                      "--train.gradient_checkpointing", "auto",
                                      "--lora.target_modules", "q_proj,v_proj", "--model.min_pixels", "4096"])
    cfg = config_from_args(args)
    assert (cfg.train.learning_rate, cfg.train.grad_accum, cfg.lora.r, cfg.train.method) == (1e-4, 2, 16, "full")
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.model.min_pixels == 4096
    assert cfg.train.batch_size == 4 and cfg.train.gradient_checkpointing is None


def test_yaml_numbers_without_a_dot_and_old_speed_switches(tmp_path):
    """YAML 1.1 reads 1e-4 as a string: a float field takes the number; a word is an error. A speed switch
    written under train by an older run lands in fast."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 1e-4\n  fused_lora: false\nlora:\n  dropout: 5e-2\n")
    cfg = C.load_yaml(path)
    assert (cfg.train.learning_rate, cfg.lora.dropout, cfg.fast.fused_lora) == (1e-4, 0.05, False)
    path.write_text("train:\n  learning_rate: fast\n")
    with pytest.raises(C.ConfigError, match="train.learning_rate must be a number, got 'fast'"):
        C.load_yaml(path)


def test_unknown_yaml_keys_are_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rat: 1\noptim: {}\n")
    with pytest.raises(C.ConfigError) as err:
        C.load_yaml(path)
    assert "unknown field 'train.learning_rat'" in str(err.value) and "unknown section 'optim'" in str(err.value)


def test_validation_lists_every_problem():
    cfg = C.RunConfig()
    cfg.train.method, cfg.train.grad_accum, cfg.lora.target_modules, cfg.data.users = "qlora", 0, ["conv"], "9-1"
    with pytest.raises(C.ConfigError) as err:
        C.validate(cfg)
    text = str(err.value)
    for expected in ("train.method", "train.grad_accum", "lora.target_modules", "data.users"):
        assert expected in text


@pytest.mark.parametrize("argv, lr", [
    (["train"], 1e-4), (["train", "--lora"], 1e-4), (["train", "--full"], 1e-6), (["train", "--full", "--lr", "2e-6"], 2e-6),
    (["train", "--lora", "--train.learning_rate", "none"], 1e-4),
])
def test_learning_rate_by_method(argv, lr):
    cfg = config_from_args(build_parser().parse_args(argv))
    assert C.validate(cfg).train.learning_rate == lr


@pytest.mark.parametrize("command", [["eval"], ["rl"], ["predict", "--image", "a.png", "--command", "tap"]])
def test_generation_commands_take_the_liger_switch(command):
    """eval, rl and predict answer through pigg.generation, whose prefill follows fast.liger_kernel."""
    assert config_from_args(build_parser().parse_args(command)).fast.liger_kernel is None
    cfg = config_from_args(build_parser().parse_args(command + ["--fast.liger_kernel", "false"]))
    assert cfg.fast.liger_kernel is False


def test_resolved_learning_rate_is_printed_and_recorded(tiny_dir, synth_root, tmp_path, capsys):
    """The YAML a run writes holds the learning rate it trained with, not None."""
    from conftest import tiny_run_config
    from pigg.train import train

    cfg = tiny_run_config(tiny_dir, synth_root, tmp_path, max_steps=1, learning_rate=None, method="full")
    folder = train(cfg)
    assert C.load_yaml(folder / "pigg_config.yaml").train.learning_rate == 1e-6
    assert "learning rate: 1e-06 (pigg's default for this method)" in capsys.readouterr().out


def test_yaml_round_trip(tmp_path):
    cfg = C.RunConfig()
    cfg.train.learning_rate, cfg.data.users = 3e-5, "1,4"
    C.save_yaml(cfg, tmp_path / "c.yaml")
    assert C.load_yaml(tmp_path / "c.yaml") == cfg


def test_several_gpus_fall_back_to_the_first():
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    single_gpu_guard(env)
    assert env["CUDA_VISIBLE_DEVICES"] == "2"


def test_data_commands(synth_root, tiny_dir, tmp_path, capsys):
    assert main(["data", "validate", "--data-root", str(synth_root), "--users", "1-3"]) == 0
    assert main(["data", "validate", "--data-root", str(synth_root), "--users", "1-5"]) == 2
    assert "no user_4.pkl" in capsys.readouterr().err
    assert main(["data", "stats", "--data-root", str(synth_root), "--users", "1-3", "--model", str(tiny_dir),
                 "--max-pixels", "80000"]) == 0
    out = capsys.readouterr().out
    assert "user_1.pkl" in out and "180x400" in out
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--users", "2", "--samples-per-user", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("*.pkl")) == ["user_1.pkl", "user_2.pkl"]


def test_a_command_that_succeeds_destroys_the_process_group(synth_root, tmp_path):
    """Left to the interpreter's exit, gloo's threads can abort a rank after its run is saved (SIGABRT:
    "terminate called without an active exception"); a command that failed leaves the group alone."""
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert main(["data", "validate", "--data-root", str(synth_root), "--users", "1-5"]) == 2
        assert dist.is_initialized()
        assert main(["data", "validate", "--data-root", str(synth_root), "--users", "1-3"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_train_command_end_to_end(synth_root, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--model", str(tiny_dir), "--data-root", str(synth_root), "--users", "1-2", "--lora",
               "--output-dir", str(tmp_path), "--max-steps", "1", "--workers", "0", "--max-pixels", "80000",
               "--train.gradient_checkpointing", "false", "--data.validation_workers", "1"])
    assert rc == 0
    assert (tmp_path / "global_agent_lora" / "adapter_model.safetensors").is_file()
    assert len(list((tmp_path / "logs").glob("finetune_global_lora_*.log"))) == 1


@pytest.mark.parametrize("script", ["2_finetune_global.py", "1_vanilla_eval.py", "3_eval_checkpoint.py"])
def test_seed_scripts_run_pigg(script, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    extra = ["--checkpoint", str(tmp_path)] if script.startswith("3_") else []
    run = subprocess.run([sys.executable, str(repo / script), "0", *extra, "--data-root", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    expected = "not a checkpoint" if script.startswith("3_") else "data root is not a folder"
    assert expected in run.stderr


def test_personalize_refuses_a_benchmark(capsys):
    assert main(["personalize", "--base", "global_agent_lora", "--benchmark", "screenspot-v2"]) == 2
    assert "a public benchmark is for pigg eval --benchmark" in capsys.readouterr().err


def test_every_help_example_parses_and_names_its_own_command():
    import shlex

    from pigg.cli import ABOUT, build_parser

    parser = build_parser()
    for name, (description, examples) in ABOUT.items():
        assert description and examples, name
        for line in examples:
            argv = shlex.split(line)
            assert argv[:2] == ["pigg", name], line
            assert parser.parse_args(argv[1:]).func.__name__ == f"cmd_{name}"


def test_top_level_help_says_what_pigg_is_and_shows_a_run(capsys):
    from pigg.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "GUI grounding agent" in text and "pigg demo" in text
    for command in ("pigg train", "pigg eval", "pigg personalize", "pigg export"):
        assert command in text, command
