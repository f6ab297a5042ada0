import json
import os
import pickle
import re

import pytest
from PIL import Image

from conftest import data_config as cfg
from pigg.data.samples import DataError, find_user_files, load_samples, normalize_sample
from pigg.data.pickles import UnsafePickleError, load_pickle
from pigg.data.users import format_users, parse_users, seed_users_arg


def write_user(root, user, samples, protocol=4):
    with open(root / f"user_{user}.pkl", "wb") as f:
        pickle.dump(samples, f, protocol=protocol)


def good_sample(image="shot.png", role="system"):
    return [{"role": role, "content": [{"type": "image", "image": image}, {"type": "text", "text": "tap"}]},
            {"role": "assistant", "content": "```referring\nx\n```\n```grounding\n[1, 2]\n```"}]


def test_system_becomes_user_and_paths_resolve(root):
    write_user(root, 1, [good_sample()])
    samples, sizes = load_samples(cfg(root))
    (s,) = samples
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    assert s.messages[0]["content"][0]["image"] == str(root / "shot.png")
    assert s.messages[1]["content"] == [{"type": "text", "text": "```referring\nx\n```\n```grounding\n[1, 2]\n```"}]
    assert sizes == {str(root / "shot.png"): (60, 120)}


def test_image_root_and_absolute_paths(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (10, 10)).save(other / "a.png")
    write_user(root, 1, [good_sample("a.png"), good_sample(str(root / "shot.png"))])
    samples, _ = load_samples(cfg(root, image_root=str(other)))
    assert [s.messages[0]["content"][0]["image"] for s in samples] == [str(other / "a.png"), str(root / "shot.png")]


def test_malicious_pickle_is_refused_and_nothing_runs(root):
    marker = root / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    write_user(root, 1, [Evil()])
    write_user(root, 2, [good_sample("nope.png")])
    with pytest.raises(DataError) as err:
        load_samples(cfg(root, users="1-2"))
    assert not marker.exists()
    refusal, other_file = [str(p) for p in err.value.problems]
    assert re.fullmatch(r"user_1\.pkl: refused to load '(posix|os)\.system': .*--trust-pickle .*", refusal)
    assert other_file.startswith("user_2.pkl sample 0, field messages[0].content[0].image: file not found")
    with pytest.raises(UnsafePickleError, match=r"user_1\.pkl: refused to load '(posix|os)\.system'"):
        load_pickle(root / "user_1.pkl")
    assert not marker.exists()


def test_allow_list_accepts_plain_data_in_every_protocol(tmp_path):
    data = [{"a": (1, 2.5, None, True), "b": {1, 2}, "c": frozenset([3]), "d": b"\x89PNG", "e": bytearray(b"x")}]
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        assert load_pickle(path) == data


def test_trust_pickle_opts_out(root):
    import collections

    write_user(root, 1, [good_sample()])
    assert load_pickle(root / "user_1.pkl", trust=True) == [good_sample()]
    (root / "odd.pkl").write_bytes(pickle.dumps(collections.Counter("ab")))
    with pytest.raises(UnsafePickleError):
        load_pickle(root / "odd.pkl")
    assert load_pickle(root / "odd.pkl", trust=True) == collections.Counter("ab")


def test_all_problems_are_listed_with_file_index_and_field(root):
    bad_role = good_sample()
    bad_role[0]["role"] = "robot"
    no_answer = good_sample()
    no_answer[1]["content"] = [{"type": "text", "text": "  "}]
    missing_image = good_sample("nope.png")
    (root / "broken.png").write_bytes(b"not a png")
    broken = good_sample("broken.png")
    bad_item = good_sample()
    bad_item[0]["content"].append({"type": "video", "video": "x.mp4"})
    write_user(root, 1, [good_sample(), bad_role, no_answer])
    write_user(root, 2, [missing_image, broken, bad_item, "not a sample"])
    with pytest.raises(DataError) as err:
        load_samples(cfg(root, users="1-2"))
    messages = [str(p) for p in err.value.problems]
    assert messages[0] == "user_1.pkl sample 1, field messages[0].role: unknown role 'robot'"
    assert messages[1] == "user_1.pkl sample 2, field messages[1].content: assistant answer is empty"
    assert messages[2].startswith("user_2.pkl sample 2, field messages[0].content[2]: expected")
    assert messages[3] == "user_2.pkl sample 3, field messages: expected a non-empty list of messages, got str"
    assert messages[4] == f"user_2.pkl sample 0, field messages[0].content[0].image: file not found: {root / 'nope.png'}"
    assert messages[5].startswith("user_2.pkl sample 1, field messages[0].content[0].image: cannot decode image")
    assert len(messages) == 6
    assert "6 problem(s)" in str(err.value)


def test_missing_users_are_an_error_unless_skipped(root, capsys):
    write_user(root, 1, [good_sample()])
    write_user(root, 3, [good_sample()])
    with pytest.raises(DataError, match="no user_2.pkl or user_2.jsonl"):
        find_user_files(root, "1-3")
    files = find_user_files(root, "1-3", skip_missing=True)
    assert list(files) == [1, 3]
    assert "WARNING: skipping 1 user(s) with no file" in capsys.readouterr().out


def test_jsonl_is_accepted(root):
    with open(root / "user_4.jsonl", "w") as f:
        f.write(json.dumps(good_sample()) + "\n\n" + json.dumps(good_sample(role="user")) + "\n")
    samples, _ = load_samples(cfg(root, users="4"))
    assert len(samples) == 2 and samples[1].index == 1 and samples[0].source == "user_4.jsonl"


def test_image_bytes_are_accepted(root):
    sample = good_sample()
    sample[0]["content"][0]["image"] = (root / "shot.png").read_bytes()
    write_user(root, 1, [sample])
    samples, sizes = load_samples(cfg(root))
    assert isinstance(samples[0].messages[0]["content"][0]["image"], bytes)


def test_normalize_rejects_a_sample_without_image(root):
    sample = [{"role": "user", "content": "tap"}, {"role": "assistant", "content": "ok"}]
    _, problems = normalize_sample(sample, "user_9.pkl", 5, root)
    assert [str(p) for p in problems] == ["user_9.pkl sample 5, field messages: no image in the sample"]


def test_user_selection_parsing():
    assert parse_users("11-83") == list(range(11, 84))
    assert parse_users("1,3,5-7") == [1, 3, 5, 6, 7]
    assert parse_users([3, 1, 3]) == [1, 3]
    assert seed_users_arg([11, 50]) == "11-50" and seed_users_arg([1, 4, 9]) == "1,4,9"
    assert format_users([1, 2, 3, 7, 9, 10]) == "1-3,7,9-10"
    for bad in ("a-b", "5-3", "", "1-"):
        with pytest.raises(ValueError):
            parse_users(bad)


def test_synthetic_users_pass_validation(synth_root):
    samples, _ = load_samples(cfg(synth_root, users="1-3"))
    assert len({s.user for s in samples}) == 3


def test_a_saved_processor_does_not_keep_the_collators_padding(processor, tmp_path):
    """The training collator pads to a multiple of 16, which the fast tokenizer keeps as its backend's
    setting; the processor a run saves must not pass it on (TRL's GRPO, for one, pads with it)."""
    import json

    from pigg.data.processor import load_processor, save_processor

    processor.tokenizer(["a", "a b c"], padding=True, pad_to_multiple_of=16)
    assert processor.tokenizer.backend_tokenizer.padding["pad_to_multiple_of"] == 16
    save_processor(processor, tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["padding"] is None
    assert load_processor(str(tmp_path)).tokenizer.backend_tokenizer.padding is None
