"""Personalization: fold splits, starting weights, output layout, resume, the command and its shim."""
import json
import math

import pytest
import torch

from conftest import tiny_run_config
from pigg import config as C
from pigg.personalize import folds_of, personalize
from pigg.train import train

FOLD_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "eval", "fold.json",
    "processor_config.json", "provenance.json", "tensorboard", "tokenizer.json", "tokenizer_config.json",
    "training_args.bin", "video_preprocessor_config.json",
}


@pytest.mark.parametrize("n, k", [(8, 3), (10, 3), (268, 3), (5, 5)])
def test_kfold_splits_are_fixed_disjoint_and_cover_every_sample(n, k):
    folds = folds_of(n, k, "kfold", 42, user=1)
    assert folds == folds_of(n, k, "kfold", 42, user=1)
    assert sorted(folds) == list(range(1, k + 1))
    tests = [set(te) for _, te in folds.values()]
    assert sorted(i for t in tests for i in t) == list(range(n))  # every sample held out exactly once
    for tr, te in folds.values():
        assert not set(tr) & set(te) and sorted(tr + te) == list(range(n))
        assert len(te) in (n // k, -(-n // k))
    assert folds_of(n, k, "kfold", 42, user=2) != folds or n == k  # users are shuffled independently
    assert folds_of(n, k, "kfold", 7, user=1) != folds or n == k


def test_time_split_trains_on_earlier_samples_only():
    folds = folds_of(9, 3, "time", 42, user=1)
    assert folds == {2: ([0, 1, 2], [3, 4, 5]), 3: ([0, 1, 2, 3, 4, 5], [6, 7, 8])}
    assert folds_of(9, 3, "time", 1, user=5) == folds  # no randomness


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="user 3 has 2 samples, fewer than the 3 folds"):
        folds_of(2, 3, "kfold", 42, user=3)


def test_train_vision_is_refused(tiny_dir, synth_root, tmp_path):
    cfg = personal_config(tiny_dir, synth_root, tmp_path, tmp_path / "global", method="full", vision=True)
    with pytest.raises(C.ConfigError, match="train.vision is for global fine-tuning"):
        personalize(cfg)


@pytest.fixture(scope="module")
def global_lora(tiny_dir, synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("global")
    cfg = tiny_run_config(tiny_dir, synth_root, out, max_steps=2)
    cfg.data.users = "2-3"
    return train(cfg)


def personal_config(tiny_dir, synth_root, out, base, **train):
    cfg = tiny_run_config(tiny_dir, synth_root, out, grad_accum=None, effective_batch=4, max_steps=-1, epochs=1.0,
                          learning_rate=1e-2, **train)
    cfg.data.users, cfg.personalize.base = "1", str(base)
    e = cfg.eval
    e.max_new_tokens, e.workers, e.batch_size = 8, 0, 4
    return cfg


def test_layout_summaries_and_report(global_lora, tiny_dir, synth_root, tmp_path):
    out = personalize(personal_config(tiny_dir, synth_root, tmp_path, global_lora))
    assert out == tmp_path / "personal_agent_lora"
    assert {p.name for p in out.iterdir()} == {"pigg_config.yaml", "splits.json", "vanilla", "global", "user_1",
                                              "personalized", "summary.json", "report.html"}
    assert {p.name for p in (out / "user_1").iterdir()} == {"fold_1", "fold_2", "fold_3", "summary.json"}
    for k in (1, 2, 3):
        fold = out / "user_1" / f"fold_{k}"
        assert {p.name for p in fold.iterdir()} == FOLD_FILES  # the fold's checkpoints are gone once it finished
        record = json.loads((fold / "fold.json").read_text())
        assert record["user"] == 1 and record["fold"] == k and record["optimizer_steps"] == 2
        assert json.loads((fold / "adapter_config.json").read_text())["r"] == 8
    splits = json.loads((out / "splits.json").read_text())
    held_out = sorted(i for f in splits["users"]["1"].values() for i in f["test"])
    assert held_out == list(range(8))  # user 1's 8 samples, each held out once
    for model in ("vanilla", "global", "personalized"):
        records = [json.loads(line) for line in (out / model / "predictions" / "user_1.jsonl").read_text().splitlines()]
        assert sorted(r["index"] for r in records) == held_out, model
    summary = json.loads((out / "user_1" / "summary.json").read_text())
    assert set(summary["folds"]) == {"1", "2", "3"} and summary["pooled"]["personalized"]["n"] == 8
    assert sum(f["global"]["n"] for f in summary["folds"].values()) == 8
    overall = json.loads((out / "summary.json").read_text())
    assert overall["vanilla"]["micro"]["n"] == overall["personalized"]["micro"]["n"] == 8
    # each run names what answered, as pigg eval's metrics.json does (the report's "Runs compared")
    named = {m: json.loads((out / m / "metrics.json").read_text()) for m in ("vanilla", "global", "personalized")}
    assert named["vanilla"]["model"] == named["global"]["model"] == str(tiny_dir) and "adapter" not in named["vanilla"]
    assert named["global"]["adapter"] == str(global_lora)
    assert named["personalized"]["model"] == "each fold's own: user_*/fold_*/"
    html = (out / "report.html").read_text()
    assert "vanilla" in html and "global" in html and "personalized" in html
    check_baselines(out, splits, summary, overall, html)


def check_baselines(out, splits, summary, overall, html):
    """The global prior of the global run's users 2-3 and the user prior of each fold's training part,
    on exactly the held-out samples of the models."""
    from pigg.grounding.priors import fit

    records = [json.loads(line) for line in (out / "personalized" / "predictions" / "user_1.jsonl").open()]
    truth = {r["index"]: r["gt_point"] for r in records}  # every sample is held out once: all 8 targets

    def acc(point, indices):
        return sum(math.dist(point, truth[i]) <= 140 for i in indices) / len(indices)

    global_prior = overall["global_prior"]
    assert global_prior["label"] == "global prior" and global_prior["baseline"]["fitted_on"]["users"] == "2-3"
    point = global_prior["baseline"]["point"]
    assert global_prior["micro"]["n"] == 8 and global_prior["micro"]["click_acc_140"] == acc(point, truth)
    user_prior = overall["user_prior"]
    hits = 0
    for k, fold in splits["users"]["1"].items():
        fitted = fit([truth[i] for i in fold["train"]])  # the user's own training folds only
        entry = summary["folds"][k]["user_prior"]
        assert entry["point"] == fitted["point"] and user_prior["baseline"]["folds"]["1"][k] == fitted
        assert entry["n"] == len(fold["test"]) and entry["click_acc_140"] == acc(fitted["point"], fold["test"])
        assert summary["folds"][k]["global_prior"]["point"] == point
        hits += acc(fitted["point"], fold["test"]) * len(fold["test"])
    assert user_prior["micro"]["click_acc_140"] == pytest.approx(hits / 8)
    assert summary["pooled"]["user_prior"]["n"] == 8
    for model in ("vanilla", "global", "personalized"):
        metrics = json.loads((out / model / "metrics.json").read_text())
        assert metrics["baselines"]["user_prior"]["micro"] == user_prior["micro"], model
        assert metrics["baselines"]["global_prior"]["folder"] == "baselines/global_prior"
    # one column each in the report, although all three models list them
    assert html.count('<polyline class="cdf" data-run="global prior"') == 1
    assert html.count('<polyline class="cdf" data-run="user prior"') == 1


def test_every_fold_starts_from_the_global_weights(global_lora, tiny_dir, synth_root, tmp_path, monkeypatch):
    """Each fold's LoRA is fresh and sits on base + global adapter, merged; the previous fold leaves no trace."""
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration

    import pigg.personalize
    import pigg.train

    expected = PeftModel.from_pretrained(Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir),
                                         global_lora).merge_and_unload().state_dict()
    starts, real_fit = [], pigg.train.fit

    def spy(model, *args, **kwargs):
        state = model.state_dict()
        starts.append({k.replace("base_model.model.", "").replace(".base_layer", ""): v.clone()
                       for k, v in state.items() if "lora_" not in k})
        assert all(v.abs().sum() == 0 for k, v in state.items() if "lora_B" in k)  # a fresh adapter
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(pigg.train, "fit", spy)
    personalize(personal_config(tiny_dir, synth_root, tmp_path, global_lora))
    assert len(starts) == 3
    for start in starts:
        assert start.keys() == expected.keys()
        assert all(torch.equal(start[k], expected[k]) for k in expected)


def test_full_personalization_restores_the_global_weights(global_lora, tiny_dir, synth_root, tmp_path, monkeypatch):
    import pigg.train

    starts, real_fit = [], pigg.train.fit

    def spy(model, *args, **kwargs):
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(pigg.train, "fit", spy)
    cfg = personal_config(tiny_dir, synth_root, tmp_path, global_lora, method="full")
    cfg.personalize.fold = 2
    out = personalize(cfg)
    cfg.personalize.fold = 3
    personalize(cfg)  # a second process: the global weights are rebuilt, the finished fold 2 kept
    assert len(starts) == 2 and all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])
    assert {p.name for p in (out / "user_1").iterdir()} == {"fold_2", "fold_3", "summary.json"}
    assert (out / "user_1" / "fold_2" / "model.safetensors").is_file()


def test_an_interrupted_run_continues_where_it_stopped(global_lora, tiny_dir, synth_root, tmp_path, monkeypatch):
    import pigg.train

    calls, real_fit = [], pigg.train.fit

    def dies_in_fold_2(model, processor, samples, *args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the second fold
        return real_fit(model, processor, samples, *args, **kwargs)

    monkeypatch.setattr(pigg.train, "fit", dies_in_fold_2)
    cfg = personal_config(tiny_dir, synth_root, tmp_path, global_lora)
    with pytest.raises(KeyboardInterrupt):
        personalize(cfg)
    out = tmp_path / "personal_agent_lora"
    first = (out / "user_1" / "fold_1" / "fold.json").read_text()
    assert not (out / "user_1" / "fold_2" / "fold.json").exists()
    vanilla = (out / "vanilla" / "predictions" / "user_1.jsonl").read_text()

    calls.clear()
    monkeypatch.setattr(pigg.train, "fit", real_fit)
    personalize(cfg)
    assert (out / "user_1" / "fold_1" / "fold.json").read_text() == first  # not redone
    assert (out / "vanilla" / "predictions" / "user_1.jsonl").read_text() == vanilla
    assert all((out / "user_1" / f"fold_{k}" / "fold.json").is_file() for k in (2, 3))

    cfg.train.learning_rate = 1e-3
    with pytest.raises(C.ConfigError, match="train.learning_rate: 0.01 -> 0.001"):
        personalize(cfg)


def test_personalize_command_and_seed_shim(global_lora, tiny_dir, synth_root, tmp_path, monkeypatch):
    from pigg.cli import main
    from pigg.seed_cli import translate_personalize

    env, argv = translate_personalize(["0", "--lora", "--users", "1", "2"])
    assert env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert argv == ["personalize", "--lora", "--users", "1,2", "--base", "global_agent_lora"]
    assert translate_personalize(["1"])[1][:2] == ["personalize", "--full"]

    monkeypatch.chdir(tmp_path)
    rc = main(["personalize", "--base", str(global_lora), "--data-root", str(synth_root), "--users", "1", "--lora",
               "--fold", "1", "--output-dir", str(tmp_path), "--workers", "0", "--eval.workers", "0",
               "--max-new-tokens", "4", "--data.validation_workers", "1", "--epochs", "1"])
    assert rc == 0
    out = tmp_path / "personal_agent_lora"
    cfg = C.load_yaml(out / "pigg_config.yaml")
    # the seed's personalization defaults, and the global run's model settings (its max_pixels)
    assert (cfg.train.learning_rate, cfg.train.effective_batch, cfg.train.warmup_steps) == (2e-5, 4, 5)
    assert cfg.model.max_pixels == 200 * 400 and cfg.personalize.folds == 3
    assert [p.name for p in (out / "user_1").glob("fold_*")] == ["fold_1"]
    assert len(list((tmp_path / "logs").glob("personalize_lora_*.log"))) == 1
    assert main(["personalize", "--data-root", str(synth_root)]) == 2  # no --base: a clear error
