"""`pigg rl` (GRPO with a click reward) on the tiny model: the files a run writes, that only the
language model's adapters train, resumption after a kill, starts, the CLI and the bench script's
arguments."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import tiny_run_config
from pigg import config as C
from pigg.rl import answer_text, find_start, reward_functions

BENCH = Path(__file__).resolve().parents[1] / "bench"


def rl_config(tiny_dir, data_root, out, **train):
    cfg = tiny_run_config(tiny_dir, data_root, out, **train)
    cfg.data.users = "1"
    cfg.train.learning_rate, cfg.train.save_steps = 5e-2, 1
    r = cfg.rl
    r.generations, r.prompts_per_step, r.max_new_tokens, r.temperature = 4, 1, 8, 1.5
    return cfg


class Killed(Exception):
    pass


class KillAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed


def adapter(folder: Path) -> dict:
    return load_file(folder / "adapter_model.safetensors")


def varied_rewards(mode):
    """The click reward and, in the format reward's place, one that differs between any two answers: a
    random model never writes a point, so pigg's rewards alone would give every answer 0 and nothing
    to learn from."""
    click, _ = reward_functions(mode)

    def distinct_characters(completions, **_):
        return [len(set(answer_text(c))) / 40 for c in completions]

    return [click, distinct_characters]


@pytest.mark.slow
def test_run_writes_an_adapter_and_resumes_after_a_kill_to_the_same_weights(tiny_dir, synth_root, tmp_path,
                                                                            monkeypatch):
    import pigg.rl
    from pigg.rl import rl

    monkeypatch.setattr(pigg.rl, "reward_functions", varied_rewards)

    straight, trainer = rl(rl_config(tiny_dir, synth_root, tmp_path / "a", max_steps=2))
    assert {p.name for p in straight.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                    "pigg_config.yaml", "provenance.json", "tensorboard",
                                                    "checkpoints", "tokenizer.json", "chat_template.jinja"}
    assert not (straight / "ref").exists()
    weights = adapter(straight)
    assert weights and all("lora_" in k and "language_model" in k for k in weights)
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # the adapters moved
    logged = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logged) == 2 and {"hit_rate", "rewards/distinct_characters/mean", "kl", "completions/mean_length"} <= set(logged[0])
    assert json.loads((straight / "provenance.json").read_text())["optimizer_steps"] == 2
    assert list((straight / "tensorboard").glob("events.*"))

    cfg = rl_config(tiny_dir, synth_root, tmp_path / "b", max_steps=2)
    with pytest.raises(Killed):
        rl(cfg, callbacks=[KillAfterSave(1)])
    cfg.train.resume = True
    resumed, _ = rl(cfg)
    again = adapter(resumed)
    assert again.keys() == weights.keys()
    for key in weights:
        torch.testing.assert_close(again[key], weights[key], rtol=0, atol=1e-6, msg=key)

    # the finished run resumed once more: nothing is trained (the Trainer alone would take a third step)
    finished, _ = rl(cfg)
    assert sorted(p.name for p in (finished / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert all(torch.equal(adapter(finished)[key], again[key]) for key in again)


def test_rewards_in_trl_form_and_their_logged_rates():
    truth = "```referring\nOK\n```\n```grounding\n[500, 500]\n```"
    completions = [[{"role": "assistant", "content": "```referring\nOK\n```\n```grounding\n[600, 500]\n```"}],
                   [{"role": "assistant", "content": "[900, 900]"}]]
    logged = {}
    click, format_ = reward_functions("hit")
    assert click.__name__ == "click" and format_.__name__ == "format"
    assert click(completions, [truth, truth], log_metric=logged.__setitem__) == [1.0, 0.0]
    assert format_(completions, log_metric=logged.__setitem__) == [1.0, 0.0]
    assert logged == {"hit_rate": 0.5, "format_rate": 0.5}
    assert answer_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == "ab"


def test_start_points(tmp_path):
    assert find_start(None, "base").weights == "base" and find_start(None, "base").adapter is None
    full = tmp_path / "global_agent_full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    assert (find_start(str(full), "base").weights, find_start(str(full), "base").adapter) == (str(full), None)
    lora = tmp_path / "global_agent_lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "the/base"}))
    s = find_start(str(lora), "ignored")
    assert (s.weights, s.merged, s.adapter) == ("the/base", [], str(lora))
    fold = tmp_path / "fold_1"
    fold.mkdir()
    (fold / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "the/base"}))
    (fold / "provenance.json").write_text(json.dumps({"base": str(lora)}))
    s = find_start(str(fold), "ignored")
    assert (s.weights, s.merged, s.adapter) == ("the/base", [str(lora)], str(fold))
    with pytest.raises(FileNotFoundError, match="not a pigg output"):
        find_start(str(tmp_path), "base")


def test_cli_maps_rl_flags_and_validates():
    from pigg.cli import build_parser, config_from_args
    from pigg.rl import RL_DEFAULTS

    args = build_parser().parse_args(["rl", "--data-root", "d", "--rl.generations", "6", "--rl.beta", "0",
                                      "--rl.click_reward", "distance", "--rl.start", "g/global_agent_lora"])
    cfg = config_from_args(args, RL_DEFAULTS)
    assert (cfg.rl.generations, cfg.rl.beta, cfg.rl.click_reward, cfg.rl.start) == (6, 0.0, "distance",
                                                                                   "g/global_agent_lora")
    assert cfg.train.learning_rate == 1e-5
    C.validate(cfg)
    cfg.rl.generations, cfg.rl.click_reward, cfg.rl.top_p = 1, "box", 0.0
    with pytest.raises(C.ConfigError) as e:
        C.validate(cfg)
    assert "generations >= 2" in str(e.value) and "click_reward" in str(e.value) and "top_p" in str(e.value)


def test_train_vision_is_refused(tiny_dir, synth_root, tmp_path):
    from pigg.rl import rl

    cfg = rl_config(tiny_dir, synth_root, tmp_path, method="full", vision=True)
    with pytest.raises(C.ConfigError, match="train.vision is for global full fine-tuning"):
        rl(cfg)


@pytest.fixture
def rl_gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import rl_gpu

    yield rl_gpu
    sys.modules.pop("rl_gpu", None)


def test_bench_arguments(rl_gpu):
    args = rl_gpu.parse_args(["--steps", "3", "--generations", "4", "--beta", "0", "--json", "x.json"])
    assert (args.steps, args.generations, args.prompts_per_step, args.beta, args.json) == (3, 4, 4, 0.0, "x.json")
    assert args.samplers == ["pigg", "transformers"]
    for bad in (["--steps", "1"], ["--samplers", "vllm"]):
        with pytest.raises(SystemExit):
            rl_gpu.parse_args(bad)


@pytest.mark.slow
def test_bench_times_each_sampler_on_the_tiny_model(rl_gpu, tiny_dir, synth_root, tmp_path, monkeypatch):
    """The bench's timing of a run, on the CPU (memory figures stubbed: there is no GPU to ask)."""
    from pigg.data.processor import load_processor
    from pigg.data.samples import load_samples
    from pigg.rl import find_start, grpo_trainer, left_padded, load_start

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    cfg = rl_config(tiny_dir, synth_root, tmp_path, max_steps=2, save_steps=100)
    samples, _ = load_samples(cfg.data, scored=True)
    processor = left_padded(load_processor(str(tiny_dir), cfg.model.min_pixels, cfg.model.max_pixels))
    model = load_start(cfg, find_start(None, str(tiny_dir)))
    args = rl_gpu.parse_args(["--steps", "2", "--prompts-per-step", "1"])
    for sampler in args.samplers:
        cfg.rl.sampler = sampler
        run = rl_gpu.timed_run(grpo_trainer(model, processor, samples, cfg, tmp_path / sampler), args, sampler)
        rl_gpu.drop_reference(model)
        assert run["sampler"] == sampler and run["timed_steps"] == 1 and 0 < run["sampling_share"] < 1
        assert 0 < run["answer_length"] <= cfg.rl.max_new_tokens


def test_prompts_are_tokenized_left_padded_as_trl_pads_them(tiny_dir):
    from PIL import Image

    from pigg.data.processor import load_processor
    from pigg.rl import left_padded

    processor = load_processor(str(tiny_dir), 64 * 64, 64 * 64)
    processor.tokenizer.pad_to_multiple_of = 16  # what a processor saved by pigg train carries
    processor = left_padded(processor)
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                                           tokenize=False, add_generation_prompt=True) for t in ("Tap.", "Tap the button.")]
    batch = processor(images=[[image], [image]], text=texts, padding=True, return_tensors="pt")
    alone = [processor(images=[image], text=[t], return_tensors="pt")["input_ids"][0] for t in texts]
    assert batch["input_ids"].shape[1] == max(len(a) for a in alone)  # to the longest prompt, no multiple of 16
    short = alone[0]
    assert batch["input_ids"][0, -len(short):].tolist() == short.tolist()  # padding in front
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == image_pad)


SIDES = {"left": (250, 500), "right": (750, 500)}


def write_side_users(folder: Path, users, samples: int, seed: int = 0) -> Path:
    """Users whose command names the left or the right button of a blank screen: the point depends on
    one word of the command only, which the tiny model can learn in seconds."""
    import random

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 200, 200)).save(folder / "screen.png")
    rng = random.Random(seed)
    for user in users:
        rows = []
        for _ in range(samples):
            side = rng.choice(sorted(SIDES))
            x, y = SIDES[side]
            rows.append([{"role": "user", "content": [{"type": "image", "image": "screen.png"},
                                                      {"type": "text", "text": f"Tap the {side} button."}]},
                         {"role": "assistant", "content": [{"type": "text", "text":
                          f"```referring\n{side} button\n```\n```grounding\n[{x}, {y}]\n```"}]}])
        (folder / f"user_{user}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def held_out_scores(cfg, weights: str, adapter, out: Path) -> tuple[float, float]:
    """(Click Acc@140, mean reward) of greedy answers on the held-out user, through `evaluate()`."""
    from pigg.data.processor import load_processor
    from pigg.data.samples import load_samples
    from pigg.evaluate import evaluate
    from pigg.grounding.rewards import click_reward, format_reward
    from pigg.model.loading import load_for_inference

    data = C.DataConfig(data_root=cfg.data.data_root, users="1", validation_workers=1)
    samples, sizes = load_samples(data, scored=True)
    processor = load_processor(weights, cfg.model.min_pixels, cfg.model.max_pixels)
    model = load_for_inference(C.ModelConfig(name_or_path=weights), adapter, "cpu")
    metrics = evaluate(model, processor, samples, sizes, out, batch_size=16, max_new_tokens=32, workers=0, fast=False)
    records = [json.loads(line) for line in (out / "predictions" / "user_1.jsonl").read_text().splitlines()]
    truths = {s.index: s.messages[-1]["content"][0]["text"] for s in samples}
    rewards = [click_reward(r["raw"], truths[r["index"]]) + 0.5 * format_reward(r["raw"]) for r in records]
    return metrics["micro"]["click_acc_140"], sum(rewards) / len(rewards)


@pytest.mark.slow
def test_grpo_raises_the_held_out_hit_rate_and_reward_of_a_partly_trained_model(tiny_dir, tmp_path):
    from pigg.rl import rl
    from pigg.train import train

    data = write_side_users(tmp_path / "data", [1, 2, 3], 16)
    # supervised fine-tuning, stopped early: the format is learned, the side only partly
    sft = tiny_run_config(tiny_dir, data, tmp_path / "sft", method="full", learning_rate=1e-2, max_steps=40,
                          save_steps=1000, batch_size=8, grad_accum=1, lr_scheduler="constant")
    sft.model.min_pixels = sft.model.max_pixels = 64 * 64
    sft.data.users = "2-3"
    start = train(sft)
    hit_before, reward_before = held_out_scores(sft, str(start), None, tmp_path / "before")
    assert 0 < hit_before < 1

    cfg = tiny_run_config(tiny_dir, data, tmp_path / "rl", learning_rate=3e-3, max_steps=12, save_steps=1000,
                          lr_scheduler="constant")
    cfg.model.min_pixels = cfg.model.max_pixels = 64 * 64
    cfg.data.users, cfg.lora.dropout = "2-3", 0.0
    cfg.rl.start = str(start)
    cfg.rl.generations, cfg.rl.prompts_per_step, cfg.rl.max_new_tokens = 4, 2, 25
    folder, trainer = rl(cfg)
    hit_after, reward_after = held_out_scores(cfg, str(start), str(folder), tmp_path / "after")
    print(f"held-out Click Acc@140 {hit_before:.3f} -> {hit_after:.3f}, mean reward {reward_before:.3f} -> "
          f"{reward_after:.3f}")
    assert hit_after > hit_before and reward_after > reward_before
    assert json.loads((folder / "provenance.json").read_text())["base_model"] == str(start)


@pytest.mark.slow
def test_a_global_lora_output_trains_on_as_one_adapter_on_the_base(tiny_dir, synth_root, tmp_path, monkeypatch):
    import pigg.rl
    from pigg.data.processor import load_processor, save_processor
    from pigg.fast.lora import adapted_layers
    from pigg.model.loading import load_model, prepare_model

    monkeypatch.setattr(pigg.rl, "reward_functions", varied_rewards)
    start = tmp_path / "global_agent_lora"
    model = prepare_model(load_model(C.ModelConfig(name_or_path=str(tiny_dir)), "cpu"), "lora", C.LoraSettings())
    torch.manual_seed(1)
    for layer in adapted_layers(model):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    model.save_pretrained(start)
    save_processor(load_processor(str(tiny_dir)), start)
    base_cfg = C.RunConfig()
    base_cfg.model.name_or_path = str(tiny_dir)
    C.save_yaml(base_cfg, start / "pigg_config.yaml")

    cfg = rl_config(tiny_dir, synth_root, tmp_path / "out", max_steps=1)
    cfg.rl.start, cfg.lora.dropout = str(start), 0.0
    out, trainer = pigg.rl.rl(cfg)
    assert adapter(out).keys() == adapter(start).keys()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)
    assert not (out / "ref").exists()
    first = next(h for h in trainer.state.log_history if "kl" in h)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the starting adapter, not the base
    assert first["grad_norm"] > 0


@pytest.mark.slow
def test_pigg_sampler_gives_trl_generates_answers_when_only_the_likeliest_token_is_left(tiny_dir, synth_root, tmp_path):
    """With top_p so small that one token is left at each step, both samplers answer greedily: pigg's
    generator (each prompt prefilled once for its group) must return the ids TRL's generate() path
    returns, each answer up to and including its end token."""
    from trl.data_utils import prepare_multimodal_messages

    from pigg.data.processor import load_processor
    from pigg.data.samples import load_samples
    from pigg.rl import find_start, grpo_trainer, left_padded, load_start, prompt_dataset

    cfg = rl_config(tiny_dir, synth_root, tmp_path)
    cfg.rl.top_p, cfg.rl.max_new_tokens = 1e-6, 12
    samples, _ = load_samples(cfg.data, scored=True)
    rows = prompt_dataset(samples[:2])
    prompts = [prepare_multimodal_messages(row["prompt"], [row["image"]]) for row in rows for _ in range(3)]
    processor = left_padded(load_processor(str(tiny_dir), cfg.model.min_pixels, cfg.model.max_pixels))
    answers = {}
    for sampler in ("pigg", "transformers"):
        cfg.rl.sampler = sampler
        torch.manual_seed(0)
        model = load_start(cfg, find_start(None, str(tiny_dir)))
        trainer = grpo_trainer(model, processor, samples, cfg, tmp_path / sampler)
        assert trainer.pigg_samples() == (sampler == "pigg")
        prompt_ids, images, fields = trainer._tokenize_prompts(prompts)
        answers[sampler], _ = trainer._generate_single_turn(prompt_ids, images, fields, 3)
    assert answers["pigg"] == answers["transformers"]
    assert len({tuple(a) for a in answers["pigg"]}) == 2  # the two prompts, three times each
    assert all(0 < len(a) <= 12 for a in answers["pigg"])


def test_sampler_setting_is_checked():
    cfg = C.RunConfig()
    cfg.rl.sampler = "vllm"
    with pytest.raises(C.ConfigError, match="rl.sampler must be pigg or transformers"):
        C.validate(cfg)
