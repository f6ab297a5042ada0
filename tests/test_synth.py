import json
import pickle
import random
import re

import pytest
from PIL import Image

from pigg.offline import synth

WIDTH, HEIGHT = 180, 400
ANSWER = re.compile(r"```referring\n(.+)\n```\n```grounding\n\[(\d+), (\d+)\]\n```")
COMMAND = re.compile(r"following instruction: (.*)\n\nThink step-by-step")
EXPECTED_PROMPT = (
    "Given a GUI image, what are the relative (0-1000) pixel point coordinates for the element corresponding "
    "to the following instruction: Tap the Send button\n\nThink step-by-step, provide referring for the element "
    "first and then the grounded point coordinates."
)


def run(out_dir, seed=0, users=4):
    return synth.synthesize(out_dir, users, samples_per_user=10, seed=seed, width=WIDTH, height=HEIGHT)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    run(out)
    return out


def load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def samples_of(out):
    """{user id: samples} for every pickle in `out`."""
    return {int(p.stem.split("_")[1]): load(p) for p in sorted(out.glob("user_*.pkl"))}


def command_of(sample):
    return COMMAND.search(sample[0]["content"][1]["text"]).group(1)


def test_prompt_and_answer_text_is_exact():
    assert synth.make_prompt("Tap the Send button") == EXPECTED_PROMPT
    assert synth.format_answer("blue plus button", 311, 541) == (
        "```referring\nblue plus button\n```\n```grounding\n[311, 541]\n```"
    )


def test_run_writes_exactly_these_files(tmp_path):
    paths = synth.synthesize(tmp_path, [3, 7], samples_per_user=4, width=WIDTH, height=HEIGHT)
    assert paths == [tmp_path / "user_3.pkl", tmp_path / "user_7.pkl"]
    top = {p.name for p in tmp_path.iterdir()}
    assert top == {"user_3.pkl", "user_7.pkl", "users.json", "images"}
    assert {p.name for p in (tmp_path / "images").iterdir()} == {"user_3", "user_7"}
    for user in (3, 7):
        referenced = {s[0]["content"][0]["image"] for s in load(tmp_path / f"user_{user}.pkl")}
        on_disk = {f"images/user_{user}/{p.name}" for p in (tmp_path / "images" / f"user_{user}").iterdir()}
        assert referenced == on_disk


def test_sample_structure(data):
    for user, samples in samples_of(data).items():
        for i, sample in enumerate(samples):
            system, assistant = sample
            assert list(system) == ["role", "content"] and system["role"] == "system"
            answer = assistant["content"][0]["text"]
            assert assistant == {"role": "assistant", "content": [{"type": "text", "text": answer}]}
            image, text = system["content"]
            assert list(image) == ["type", "image"] and image["type"] == "image"
            assert re.fullmatch(rf"images/user_{user}/\d{{5}}\.png", image["image"]), (user, i)
            assert list(text) == ["type", "text"] and text["type"] == "text"
            assert text["text"] == synth.make_prompt(command_of(sample))
            assert ANSWER.fullmatch(answer), (user, i)


def test_answer_parses_back_to_element_centre():
    e = synth.Element("button", (10, 20, 110, 61), "content", label="Send", description="Send button")
    sample = synth.make_sample("images/user_1/00000.png", "Tap the Send button", e, 200, 400)
    assert sample[0]["content"][1]["text"] == EXPECTED_PROMPT
    referring, x, y = ANSWER.fullmatch(sample[1]["content"][0]["text"]).groups()
    # centre (60, 40.5): 60 / 200 -> 300, 40.5 / 400 -> 101.25 -> 101
    assert (referring, int(x), int(y)) == ("Send button", 300, 101)


def test_answers_name_an_element_of_their_screen_and_its_centre(tmp_path, monkeypatch):
    screens = []

    def recording_build_screen(*args, **kwargs):
        screens.append(build_screen(*args, **kwargs))
        return screens[-1]

    build_screen = synth.build_screen
    monkeypatch.setattr(synth, "build_screen", recording_build_screen)
    synth.synthesize(tmp_path, [1], samples_per_user=30, width=WIDTH, height=HEIGHT, habit_fraction=1)
    samples = load(tmp_path / "user_1.pkl")
    assert len({s[0]["content"][0]["image"] for s in samples}) == len(screens)
    for sample in samples:
        screen = screens[int(sample[0]["content"][0]["image"][-9:-4])]
        referring, x, y = ANSWER.fullmatch(sample[1]["content"][0]["text"]).groups()
        (e,) = [e for e in screen.elements if e.description == referring]
        x0, y0, x1, y1 = e.box
        assert (int(x), int(y)) == (round((x0 + x1) / 2 / WIDTH * 1000), round((y0 + y1) / 2 / HEIGHT * 1000))


def test_points_within_range_and_counts_vary(data):
    info = json.loads((data / "users.json").read_text())
    counts = []
    for user, samples in samples_of(data).items():
        assert len(samples) == info[str(user)]["samples"]
        counts.append(len(samples))
        for sample in samples:
            _, x, y = ANSWER.fullmatch(sample[1]["content"][0]["text"]).groups()
            assert 0 <= int(x) <= 1000 and 0 <= int(y) <= 1000
    assert all(8 <= n <= 12 for n in counts)  # 10 +- 25%


def test_images_open_with_requested_size(data):
    for samples in samples_of(data).values():
        for path in {s[0]["content"][0]["image"] for s in samples}:
            with Image.open(data / path) as img:
                assert img.format == "PNG" and img.mode == "RGB" and img.size == (WIDTH, HEIGHT)


def test_same_seed_gives_identical_bytes(data, tmp_path):
    run(tmp_path)
    for name in ["users.json"] + [f"user_{u}.pkl" for u in range(1, 5)]:
        assert (data / name).read_bytes() == (tmp_path / name).read_bytes(), name
    for user in range(1, 5):
        for png in sorted((data / "images" / f"user_{user}").iterdir())[:3]:
            assert png.read_bytes() == (tmp_path / "images" / f"user_{user}" / png.name).read_bytes()


def test_different_seed_differs(data, tmp_path):
    run(tmp_path, seed=1)
    assert (data / "user_1.pkl").read_bytes() != (tmp_path / "user_1.pkl").read_bytes()
    png = "images/user_1/00000.png"
    assert (data / png).read_bytes() != (tmp_path / png).read_bytes()


class OnlyBuiltins(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"pickle refers to {module}.{name}")


def test_pickles_hold_only_builtin_types(data):
    def walk(x):
        assert type(x) in (list, dict, str, int), type(x)
        if isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for path in sorted(data.glob("user_*.pkl")):
        with open(path, "rb") as f:
            walk(OnlyBuiltins(f).load())


def test_habit_users_aliases_collide_and_appear_in_commands(data):
    info = json.loads((data / "users.json").read_text())
    habit = {int(u) for u, v in info.items() if v["habits"]}
    assert len(habit) == 2  # half of 4
    meanings = {}
    for u in habit:
        for word, kind in info[str(u)]["aliases"].items():
            meanings.setdefault(word, set()).add(kind)
    assert any(len(kinds) > 1 for kinds in meanings.values())

    for user, samples in samples_of(data).items():
        aliases = info[str(user)]["aliases"]
        used = 0
        for sample in samples:
            command = command_of(sample)
            words = [w for w in synth.ALIAS_WORDS if w in command]
            if user not in habit:
                assert not words, command
            elif words:
                used += 1
                referring = ANSWER.fullmatch(sample[1]["content"][0]["text"]).group(1)
                assert re.search(rf"\b{aliases[words[0]]} (icon|button)\b", referring), (command, referring)
        assert used > 0 or user not in habit


def test_aliases_collide_between_any_two_habit_users():
    a, b = synth.make_profile(0, 3, True), synth.make_profile(0, 5, True)
    shared = set(a.aliases) & set(b.aliases)
    assert len(shared) >= 2
    assert all(a.aliases[w] != b.aliases[w] for w in shared)
    assert synth.make_profile(0, 4, False).aliases == {}


def test_favourite_apps_dominate(data):
    profile = synth.make_profile(0, 3, True)
    rng = random.Random(0)
    picks = [synth.pick_app(rng, profile).name for _ in range(2000)]
    assert sum(p in profile.favourite_apps for p in picks) / len(picks) > 0.7
    plain = synth.make_profile(0, 3, False)
    picks = [synth.pick_app(rng, plain).name for _ in range(2000)]
    assert sum(p in profile.favourite_apps for p in picks) / len(picks) < 0.4

    info = json.loads((data / "users.json").read_text())
    for user, v in info.items():
        n_screens = len(list((data / "images" / f"user_{user}").iterdir()))
        assert sum(v["app_counts"].values()) == n_screens
        if v["habits"]:
            assert sum(v["app_counts"].get(a, 0) for a in v["favourite_apps"]) / n_screens >= 0.5


def test_habit_fraction_extremes(tmp_path):
    synth.synthesize(tmp_path / "none", 3, samples_per_user=2, width=WIDTH, height=HEIGHT, habit_fraction=0)
    synth.synthesize(tmp_path / "all", 3, samples_per_user=2, width=WIDTH, height=HEIGHT, habit_fraction=1)
    assert not any(v["habits"] for v in json.loads((tmp_path / "none" / "users.json").read_text()).values())
    assert all(v["habits"] for v in json.loads((tmp_path / "all" / "users.json").read_text()).values())


def random_screens(n=150):
    rng = random.Random(1)
    for i in range(n):
        width, height = [(360, 800), (180, 400), (412, 915)][i % 3]
        yield synth.build_screen(rng, synth.APPS[i % len(synth.APPS)], width, height, rng.choice(synth.ALIAS_KINDS))


def test_screens_have_non_overlapping_uniquely_named_elements():
    for screen in random_screens():
        boxes = [e.box for e in screen.elements]
        assert 5 <= len(boxes) <= 12
        status = synth.Frame.of(screen.width, screen.height).status
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= screen.width and status <= y0 < y1 <= screen.height
            for a0, b0, a1, b1 in boxes[i + 1:]:
                assert x1 <= a0 or a1 <= x0 or y1 <= b0 or b1 <= y0, (screen.app.name, boxes)
        names = [e.description for e in screen.elements]
        assert len(set(names)) == len(names) and all(names)


def test_plain_commands_fit_one_element():
    rng = random.Random(2)
    for screen in random_screens(60):
        meant = {}
        for e in screen.elements:
            for _ in range(12):
                meant.setdefault(synth.plain_command(rng, screen, e), set()).add(e.description)
        assert all(len(v) == 1 for v in meant.values()), meant


def test_ambiguous_command_goes_to_favourite_region():
    app = synth.APPS[0]
    top = synth.Element("star", (300, 30, 340, 70), "top bar", colour="red")
    bottom = synth.Element("star", (40, 740, 80, 780), "bottom bar", colour="red")
    row = synth.Element("row", (16, 100, 344, 150), "content", label="Alice")
    synth.name_elements([top, bottom, row])
    assert (top.description, bottom.description) == ("red star icon in top bar", "red star icon in bottom bar")
    screen = synth.Screen(app, 360, 800, True, [top, bottom, row])
    regions = ["bottom bar", "toolbar", "top bar", "floating"]
    profile = synth.Profile(1, True, {"the usual": "star"}, ["Messages"], regions)
    rng = random.Random(0)
    picks = [synth.pick_command(rng, screen, profile, []) for _ in range(200)]
    # Only a command that names the top bar reaches the top star; every vaguer one means the bottom one.
    assert all("in top bar" in command for command, target in picks if target is top)
    assert any(target is bottom and "bottom bar" not in command for command, target in picks)
    assert any("the usual" in command for command, _ in picks)


def test_bad_users_are_rejected(tmp_path):
    for users in (0, [1, 1], ["a"], [True]):
        with pytest.raises(ValueError):
            synth.synthesize(tmp_path, users)


def test_counts_per_user(tmp_path):
    synth.synthesize(tmp_path, [1, 2], samples_per_user={1: 4, 2: 40}, width=WIDTH, height=HEIGHT)
    info = json.loads((tmp_path / "users.json").read_text())
    assert 3 <= info["1"]["samples"] <= 5 and 30 <= info["2"]["samples"] <= 50
    assert len(load(tmp_path / "user_2.pkl")) == info["2"]["samples"]
    with pytest.raises(ValueError, match="names users"):
        synth.synthesize(tmp_path, [1, 2], samples_per_user={1: 4})
