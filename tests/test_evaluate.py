"""Evaluation on the tiny model: batched == one-at-a-time, resume, outputs, checkpoints, shims."""
import json

import pytest

from conftest import tiny_run_config
from pigg import config as C
from pigg.data.samples import load_samples
from pigg.evaluate import (PromptCollator, evaluate, generate_batch, join, joined, length_batches, prompt_and_truth,
                           read_done, split)
from pigg.seed_cli import translate_eval


@pytest.fixture(scope="module")
def setup(tiny_dir, synth_root, processor):
    from transformers import Qwen3VLForConditionalGeneration

    cfg = C.DataConfig(data_root=str(synth_root), users="1-2", validation_workers=1)
    samples, sizes = load_samples(cfg)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir).eval()
    return model, samples, sizes


def test_left_padded_batches_answer_like_single_prompts(setup, processor):
    model, samples, _ = setup
    items = [prompt_and_truth(s) for s in samples[:6]]
    collate = PromptCollator(processor)
    batch, _ = collate(items)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "the test needs prompts of different lengths"
    assert (batch["attention_mask"][:, -1] == 1).all(), "padding must be on the left"
    batched = generate_batch(model, processor, batch, 12)
    single = [generate_batch(model, processor, collate([item])[0], 12)[0] for item in items]
    assert batched == single


def test_prompt_excludes_the_answer(setup):
    _, samples, _ = setup
    prompt, truth = prompt_and_truth(samples[0])
    assert [m["role"] for m in prompt.messages] == ["user"]
    assert truth.startswith("```referring\n") and "```grounding\n[" in truth


def test_length_batches_group_by_length():
    items = list("abcdef")
    batches = length_batches(items, [5, 1, 9, 3, 7, 2], 2)
    assert batches == [["c", "e"], ["a", "d"], ["f", "b"]]


def test_split_cuts_every_batch_into_pieces_and_counts_them():
    batches = [list("abcdefg"), list("hij"), list("k")]
    assert split(batches, 3) == ([list("abc"), list("def"), list("g"), list("h"), list("i"), list("j"), list("k")],
                                 [3, 3, 1])
    assert split(batches, 1) == (batches, [1, 1, 1])
    assert split([], 4) == ([], [])


def test_joined_pieces_equal_the_batch_collated_whole(setup, processor):
    _, samples, _ = setup
    items = sorted((prompt_and_truth(s) for s in samples[:7]), key=lambda p: -len(p[0].messages[0]["content"][1]["text"]))
    collate = PromptCollator(processor, fast=True)
    whole, whole_items = collate(items)
    parts = [collate(items[k:k + 3]) for k in range(0, 7, 3)]
    assert len({batch["input_ids"].shape[1] for batch, _ in parts}) > 1, "the test needs pieces of different widths"
    one, one_items = join(parts, processor.tokenizer.pad_token_id)
    assert one_items == whole_items
    assert one.keys() == whole.keys()
    for key in whole:
        assert one[key].equal(whole[key]), key
    # the loader's pieces are joined back into their batches, a batch of one piece passes as it is
    out = list(joined([parts[0], parts[1], parts[2]], [2, 1], processor.tokenizer.pad_token_id))
    assert [batch["input_ids"].shape[0] for batch, _ in out] == [6, 1] and out[1] == parts[2]
    assert out[0][1] == whole_items[:6]
    assert list(joined([], [], 0)) == []


def test_outputs_and_resume_after_interruption(setup, processor, tmp_path, monkeypatch):
    model, samples, sizes = setup
    straight = evaluate(model, processor, samples, sizes, tmp_path / "a", batch_size=4, max_new_tokens=8, workers=0)
    assert straight["micro"]["n"] == len(samples)
    assert set(straight["users"]) == {"1", "2"}
    files = sorted(p.name for p in (tmp_path / "a" / "predictions").iterdir())
    assert files == ["answered_by.json", "user_1.jsonl", "user_2.jsonl"]
    record = json.loads((tmp_path / "a" / "predictions" / "user_1.jsonl").read_text().splitlines()[0])
    for key in ("user", "index", "image", "command", "raw", "pred_point", "gt_point", "distance", "hit", "parse_ok"):
        assert key in record

    # Interrupt: keep 3 finished records of user 1, none of user 2, and a line cut in half.
    interrupted = tmp_path / "b" / "predictions"
    interrupted.mkdir(parents=True)
    lines = (tmp_path / "a" / "predictions" / "user_1.jsonl").read_text().splitlines()
    (interrupted / "user_1.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    calls = []
    real = generate_batch

    def counting(model, processor, batch, *args):
        calls.append(batch["input_ids"].shape[0])
        return real(model, processor, batch, *args)

    monkeypatch.setattr("pigg.evaluate.generate_batch", counting)
    resumed = evaluate(model, processor, samples, sizes, tmp_path / "b", batch_size=4, max_new_tokens=8, workers=0)
    assert sum(calls) == len(samples) - 3
    assert resumed == straight
    assert sum(len(v) for v in read_done(interrupted).values()) == len(samples)


def test_fingerprints_read_large_files_in_blocks(tmp_path, monkeypatch):
    from pigg import evaluate as E

    monkeypatch.setattr(E, "WHOLE_FILE", 2**20)
    path = tmp_path / "model.safetensors"
    data = bytearray(5 * 2**20)
    path.write_bytes(data)
    before = E.fingerprint(path)
    data[-1] = 1  # the last byte lies in the last block read
    path.write_bytes(data)
    assert E.fingerprint(path) != before and before.startswith(f"{5 * 2**20}:")
    assert E.is_weights(path) and not E.is_weights(tmp_path / "training_args.bin")


def test_predictions_of_another_model_or_weights_are_not_continued(setup, processor, tmp_path):
    import os

    model, samples, sizes = setup
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"0" * 8)
    meta = {"label": "global", "model": "base", "adapter": str(adapter)}
    out = tmp_path / "run"
    first = evaluate(model, processor, samples[:2], sizes, out, batch_size=2, max_new_tokens=4, workers=0, meta=meta)
    # the same model and weights, saved again: the finished samples are kept, the rest answered
    (adapter / "adapter_model.safetensors").write_bytes(b"0" * 8)
    os.utime(adapter / "adapter_model.safetensors", ns=(1, 1))
    more = evaluate(model, processor, samples[:4], sizes, out, batch_size=2, max_new_tokens=4, workers=0,
                    meta={**meta, "label": "renamed"})
    assert more["micro"]["n"] == 4 and first["micro"]["n"] == 2
    for changed, match in (({"adapter": str(tmp_path / "other")}, "adapter: "), ({}, "weight_files: "),
                           ({"max_new": 5}, "max_new_tokens: ")):
        if not changed:  # the adapter trained again in place: its file differs
            (adapter / "adapter_model.safetensors").write_bytes(b"1" * 8)
        limit = changed.pop("max_new", 4)
        with pytest.raises(ValueError, match=f"holds predictions of another model or settings(.|\n)*{match}"):
            evaluate(model, processor, samples, sizes, out, batch_size=2, max_new_tokens=limit, workers=0,
                     meta={**meta, **changed})
    assert sum(len(v) for v in read_done(out / "predictions").values()) == 4  # nothing written was lost


def test_eval_command_on_a_trained_adapter(tiny_dir, synth_root, tmp_path, monkeypatch):
    from pigg.cli import main
    from pigg.train import train

    monkeypatch.chdir(tmp_path)
    folder = train(tiny_run_config(tiny_dir, synth_root, tmp_path, max_steps=1))
    rc = main(["eval", "--checkpoint", str(folder), "--data-root", str(synth_root), "--users", "3",
               "--out", str(tmp_path / "ev"), "--batch-size", "8", "--max-new-tokens", "8", "--workers", "0",
               "--max-pixels", str(200 * 400), "--data.validation_workers", "1"])
    assert rc == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["adapter"] == str(folder) and metrics["model"] == str(tiny_dir)
    assert list(metrics["users"]) == ["3"] and metrics["label"] == "global_agent_lora"
    assert (tmp_path / "ev" / "eval_config.yaml").is_file()


@pytest.mark.parametrize("argv, checkpoint, expected", [
    (["0", "--u", "1", "10"], False, ["eval", "--gpus", "0", "--users", "1-10"]),
    (["1"], False, ["eval", "--gpus", "1", "--users", "1-10"]),
    (["0", "--checkpoint", "/ck", "--u", "2", "4", "7"], True,
     ["eval", "--gpus", "0", "--users", "2,4,7", "--checkpoint", "/ck"]),
])
def test_seed_eval_shims(argv, checkpoint, expected):
    env, out = translate_eval(argv, with_checkpoint=checkpoint)
    assert out == expected and env == {"CUDA_VISIBLE_DEVICES": argv[0]}


def test_seed_eval_shim_checks_lora_flag(tmp_path):
    with pytest.raises(SystemExit):
        translate_eval(["0", "--checkpoint", str(tmp_path), "--lora"], with_checkpoint=True)


def test_fast_and_former_generation_write_the_same_predictions(setup, processor, tmp_path):
    """The fast path with two workers (each batch prepared in two pieces, joined) writes what generate() does."""
    model, samples, sizes = setup
    fast = evaluate(model, processor, samples, sizes, tmp_path / "fast", batch_size=4, max_new_tokens=8, workers=2)
    former = evaluate(model, processor, samples, sizes, tmp_path / "former", batch_size=4, max_new_tokens=8, workers=0,
                      fast=False)
    assert fast == former
    for name in ("user_1.jsonl", "user_2.jsonl"):
        assert (tmp_path / "fast" / "predictions" / name).read_text() == \
               (tmp_path / "former" / "predictions" / name).read_text()
