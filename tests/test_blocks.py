"""The demo's users: coloured blocks named by colour, private words for habit users; and the demo's table."""
import json
import pickle
import re

import pytest
from PIL import Image

from pigg.offline import blocks
from pigg.offline.demo import comparison_rows

ANSWER = re.compile(r"```referring\n(\w+) block\n```\n```grounding\n\[(\d+), (\d+)\]\n```")
COMMAND = re.compile(r"following instruction: (.*)\n\nThink step-by-step")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("blocks")
    blocks.synthesize_blocks(out, {1: 30, 2: 30}, habit_users={1}, seed=0, size=96)
    return out


def samples(out, user):
    with open(out / f"user_{user}.pkl", "rb") as f:
        return pickle.load(f)


def test_every_answer_is_the_centre_of_the_named_colours_block(data):
    centres = {round((i + 0.5) * 1000 / 3) for i in range(3)}
    for user in (1, 2):
        for sample in samples(data, user):
            colour, x, y = ANSWER.fullmatch(sample[1]["content"][0]["text"]).groups()
            assert int(x) in centres and int(y) in centres  # 167, 500 or 833
            image = Image.open(data / sample[0]["content"][0]["image"])
            pixel = image.getpixel((int(x) * image.width // 1000, int(y) * image.height // 1000))
            assert pixel == blocks.COLOURS[colour]


def test_only_habit_users_use_private_words_and_each_word_keeps_its_colour(data):
    users = json.loads((data / "users.json").read_text())
    assert users["1"]["habits"] and not users["2"]["habits"] and users["2"]["aliases"] == {}
    aliases = users["1"]["aliases"]
    assert sorted(aliases) == sorted(blocks.ALIAS_WORDS) and len(set(aliases.values())) == 2
    used = 0
    for sample in samples(data, 1):
        command, colour = COMMAND.search(sample[0]["content"][1]["text"]).group(1), ANSWER.fullmatch(
            sample[1]["content"][0]["text"]).group(1)
        words = [w for w in aliases if w in command]
        if words:
            used += 1
            assert aliases[words[0]] == colour and colour not in command
        else:
            assert colour in command
    assert 5 <= used <= 25  # about half of 30
    assert not any(w in COMMAND.search(s[0]["content"][1]["text"]).group(1) for s in samples(data, 2)
                   for w in blocks.ALIAS_WORDS)


def test_same_arguments_same_files(data, tmp_path):
    blocks.synthesize_blocks(tmp_path, {1: 30, 2: 30}, habit_users={1}, seed=0, size=96)
    assert (tmp_path / "user_1.pkl").read_bytes() == (data / "user_1.pkl").read_bytes()
    assert (tmp_path / "images/user_1/00007.png").read_bytes() == (data / "images/user_1/00007.png").read_bytes()


def test_bad_arguments_are_errors(tmp_path):
    with pytest.raises(ValueError, match="habit users among the users"):
        blocks.synthesize_blocks(tmp_path, {1: 3}, habit_users={2})


def test_comparison_rows_pool_users_by_habit():
    def acc(*values):
        return {"users": {str(u): {"n": n, "click_acc_140": a} for u, (n, a) in enumerate(values, 1)}}

    summary = {"vanilla": acc((10, 0.0), (30, 0.0)), "global": acc((10, 0.5), (30, 0.9)),
               "personalized": acc((10, 0.8), (30, 0.9)), "global_prior": acc((10, 0.1), (30, 0.2)),
               "user_prior": acc((10, 0.3), (30, 0.1))}
    users = {"1": {"habits": True}, "2": {"habits": False}}
    rows = {r[0]: r for r in comparison_rows(users, summary)}
    assert list(rows) == ["1", "2", "habits", "none", "all"]
    assert rows["1"][1:3] == ("yes", 10) and rows["none"][1:3] == ("no", 30)
    assert rows["all"][2] == 40
    assert rows["all"][3] == pytest.approx({"vanilla": 0.0, "global": 0.8, "personalized": 0.875,
                                            "global_prior": 0.175, "user_prior": 0.15})
