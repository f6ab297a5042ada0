"""User files that cannot be read, and answers that cannot be scored: each is one clear problem that
names the file (and sample and field), never a traceback, and the other files are still checked."""
import json
import pickle
import random
import subprocess
import sys

import pytest

import pigg.grounding.metrics as M
from pigg.cli import main
from conftest import data_config as cfg
from pigg.data.samples import DataError, load_samples, read_user_file

CUT = "(the file may be cut short; copy it again)"


def sample(answer="```referring\nx\n```\n```grounding\n[1, 2]\n```"):
    return [{"role": "system", "content": [{"type": "image", "image": "shot.png"}, {"type": "text", "text": "tap"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def problems(root, users="1", **kw) -> list[str]:
    with pytest.raises(DataError) as err:
        load_samples(cfg(root, users, **kw), log=lambda *_: None)
    return [str(p) for p in err.value.problems]


# Python 2's pickle of ["café"] as a byte string (protocol 2): Python 3 reads such strings as ASCII.
PY2_PICKLE = b"\x80\x02]q\x00U\x05caf\xc3\xa9q\x01a."


@pytest.mark.parametrize("name, content, expected", [
    ("user_1.pkl", pickle.dumps([sample()] * 3, protocol=4)[:150],
     f"user_1.pkl: cannot be read: pickle data was truncated {CUT}"),
    ("user_1.pkl", pickle.dumps([sample()], protocol=0)[:-1],  # even a cut that only loses the last byte
     f"user_1.pkl: cannot be read: pickle data was truncated {CUT}"),
    ("user_1.pkl", b"", "user_1.pkl: cannot be read: the file is empty (0 bytes; copy it again)"),
    ("user_1.pkl", b"hello, this is text", "user_1.pkl: cannot be read: not a pickle (it starts with b'hello, this ')"),
    ("user_1.pkl", json.dumps(sample()).encode() + b"\n",
     "user_1.pkl: cannot be read: not a pickle (it starts with b'[{\"role\": \"s'); JSON lines go in a .jsonl file"),
    ("user_1.pkl", b"\x80\x09rest",
     "user_1.pkl: cannot be read: unsupported pickle protocol: 9 (written by a newer Python? save it again with "
     "protocol 4 or 5)"),
    ("user_1.pkl", b"\x80\x04]\xff.",
     "user_1.pkl: cannot be read: UnpicklingError: invalid load key, '\\xff'. (the file looks damaged; copy it again)"),
    ("user_1.pkl", pickle.dumps({"samples": [sample()]}), "user_1.pkl: holds a dict, expected a list of samples"),
    ("user_1.jsonl", b'[{"role": "user", "content": "caf\xe9"}]\n',
     "user_1.jsonl: cannot be read: not UTF-8 text (byte 0xe9 on line 1); save it as UTF-8"),
    ("user_1.jsonl", b"", "user_1.jsonl: cannot be read: the file is empty (0 bytes; copy it again)"),
])
def test_an_unreadable_file_is_one_problem(root, name, content, expected):
    (root / name).write_bytes(content)
    assert problems(root) == [expected]


def test_a_python2_pickle_with_accents_says_so(root):
    (root / "user_1.pkl").write_bytes(PY2_PICKLE)
    (problem,) = problems(root)
    assert problem.startswith("user_1.pkl: cannot be read: text in the pickle is not ASCII ('ascii' codec")
    assert problem.endswith("a Python 2 pickle? Load it there and save it again from Python 3")


def test_bad_jsonl_lines_are_one_problem_and_a_cut_last_line_says_so(root):
    good = json.dumps(sample())
    (root / "user_1.jsonl").write_text(f"{good}\n{{oops\n{good}\n[1,\n\n{good[:-5]}")
    (problem,) = problems(root)
    assert problem == ("user_1.jsonl: cannot be read: line 2 is not JSON (Expecting property name enclosed in "
                       "double quotes: line 1 column 2 (char 1)); lines 4, 6 are not JSON either " + CUT)
    (root / "user_1.jsonl").write_text(f"{good}\n{{oops\n{good}\n")
    assert problems(root) == ["user_1.jsonl: cannot be read: line 2 is not JSON (Expecting property name "
                              "enclosed in double quotes: line 1 column 2 (char 1))"]


def test_jsonl_keeps_unicode_line_separators_and_a_byte_order_mark(root):
    text = "\u2028tap\u2029"  # str.splitlines would cut the line here
    raw = sample()
    raw[0]["content"][1]["text"] = text
    line = json.dumps(raw, ensure_ascii=False)
    (root / "user_1.jsonl").write_bytes(b"\xef\xbb\xbf" + (line + "\r\n").encode())
    (s,) = load_samples(cfg(root), log=lambda *_: None)[0]
    assert s.messages[0]["content"][1]["text"] == text


def test_the_full_unpickler_failing_is_one_problem_too(root):
    (root / "user_1.pkl").write_bytes(b"cpigg_no_such_module\nThing\n)R.")
    (problem,) = problems(root, trust_pickle=True)
    assert problem == ("user_1.pkl: cannot be read: ModuleNotFoundError: No module named 'pigg_no_such_module' "
                       "(the pickle needs a class or module that this Python cannot find)")
    assert problems(root)[0].startswith("user_1.pkl: refused to load 'pigg_no_such_module.Thing'")


def test_every_file_is_checked_in_one_run(root):
    (root / "user_1.pkl").write_bytes(pickle.dumps([sample()] * 4)[:100])
    (root / "user_2.pkl").write_bytes(b"")
    (root / "user_3.pkl").write_bytes(pickle.dumps([sample(), sample("[3, 4]"), sample("click the gear")]))
    (root / "user_4.jsonl").write_bytes(b"\xff\xfe[]\n")
    assert problems(root, "1-4") == [
        f"user_1.pkl: cannot be read: pickle data was truncated {CUT}",
        "user_2.pkl: cannot be read: the file is empty (0 bytes; copy it again)",
        "user_3.pkl sample 2, field messages[1].content[0].text: no point in the ground-truth answer: 'click the gear'",
        "user_4.jsonl: cannot be read: not UTF-8 text (byte 0xff on line 1); save it as UTF-8",
    ]


ANSWERS = [
    ("```referring\nx\n```\n```grounding\n[1, 2]\n```", True),
    ('{"point_2d": [500, 300], "label": "gear"}', True),
    ("[10, 20, 30, 40]", True),
    ("click the gear", False),
    ("```referring\nbutton 2, 3\n```\n```grounding\nthe gear\n```", False),  # numbers outside the block
    ("```grounding\n[1, 2, 3]\n```", False),
]


@pytest.mark.parametrize("answer, scorable", ANSWERS)
def test_validation_reads_answers_as_evaluation_does(root, answer, scorable):
    try:
        M.score_sample(answer, answer)
        assert scorable
    except ValueError:
        assert not scorable
    (root / "user_1.pkl").write_bytes(pickle.dumps([sample(answer)]))
    if scorable:
        assert len(load_samples(cfg(root), log=lambda *_: None)[0]) == 1
    else:
        assert problems(root) == [f"user_1.pkl sample 0, field messages[1].content[0].text: no point in the "
                                  f"ground-truth answer: {answer!r}"]


def test_the_field_names_the_whole_content_when_the_answer_is_a_string_or_several_items(root):
    plain, split = sample("tap it"), sample("[1,")
    plain[1]["content"] = "tap it"
    split[1]["content"].append({"type": "text", "text": " 2]"})  # joined, as evaluation joins them: a point
    several = sample("no")
    several[1]["content"].append({"type": "text", "text": " point"})
    (root / "user_1.pkl").write_bytes(pickle.dumps([plain, split, several]))
    assert problems(root) == [
        "user_1.pkl sample 0, field messages[1].content: no point in the ground-truth answer: 'tap it'",
        "user_1.pkl sample 2, field messages[1].content: no point in the ground-truth answer: 'no point'",
    ]


def test_training_may_opt_in_to_answers_without_a_point_but_evaluation_never(root):
    (root / "user_1.pkl").write_bytes(pickle.dumps([sample(), sample("tap the gear")]))
    with pytest.raises(DataError, match="pass --data.allow_unparseable_answers true") as err:
        load_samples(cfg(root), log=lambda *_: None)
    assert len(err.value.problems) == 1
    logged = []
    samples, _ = load_samples(cfg(root, allow_unparseable_answers=True), log=logged.append)
    assert [s.index for s in samples] == [0, 1]
    assert logged[0] == ("WARNING: training on 1 sample(s) whose answer has no point (data.allow_unparseable_answers):"
                         "\n  user_1.pkl sample 1, field messages[1].content[0].text: no point in the ground-truth "
                         "answer: 'tap the gear'")
    with pytest.raises(DataError, match="applies to training only") as err:
        load_samples(cfg(root, allow_unparseable_answers=True), log=lambda *_: None, scored=True)
    assert [p.index for p in err.value.problems] == [1]


def test_cli_validate_lists_a_truncated_and_an_empty_file_without_traceback(root, synth_root):
    (root / "user_1.pkl").write_bytes((synth_root / "user_1.pkl").read_bytes()[:333])
    (root / "user_2.pkl").write_bytes(b"")
    run = subprocess.run([sys.executable, "-m", "pigg.cli", "data", "validate", "--data-root", str(root),
                          "--users", "1-2", "--data.validation_workers", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr + run.stdout
    assert f"user_1.pkl: cannot be read: pickle data was truncated {CUT}" in run.stderr
    assert "user_2.pkl: cannot be read: the file is empty (0 bytes; copy it again)" in run.stderr
    assert "2 problem(s) in the data" in run.stderr


def test_cli_validate_warns_about_answers_without_a_point_only_when_allowed(root, capsys):
    (root / "user_1.pkl").write_bytes(pickle.dumps([sample("tap the gear")]))
    args = ["data", "validate", "--data-root", str(root), "--users", "1", "--data.validation_workers", "1"]
    assert main(args) == 2
    assert "user_1.pkl sample 0, field messages[1].content[0].text: no point" in capsys.readouterr().err
    assert main(args + ["--data.allow_unparseable_answers", "true"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: training on 1 sample(s) whose answer has no point" in out and "data OK" in out


def mutations(rng: random.Random, real: bytes):
    """Random bytes, or a real file cut short, with bytes changed, or with bytes put in."""
    kind = rng.choice(["random", "random_after_header", "cut", "flip", "flip_ascii", "insert"])
    if kind == "random":
        return kind, rng.randbytes(rng.randrange(0, 200))
    if kind == "random_after_header":  # past the protocol opcode, into the opcodes proper
        return kind, b"\x80\x04" + rng.randbytes(rng.randrange(0, 200))
    if kind == "cut":
        return kind, real[:rng.randrange(0, len(real))]
    data = bytearray(real)
    for _ in range(rng.randrange(1, 5)):
        at = rng.randrange(len(data))
        if kind == "flip":
            data[at] = rng.randrange(256)
        elif kind == "flip_ascii":  # often lands in a string: the file loads and its samples are checked
            data[at] = rng.randrange(32, 127)
        else:
            data[at:at] = rng.randbytes(rng.randrange(1, 9))
    return kind, bytes(data)


def test_fuzz_the_loader_raises_only_data_errors_that_name_the_file(synth_root, tmp_path):
    real_samples = pickle.loads((synth_root / "user_1.pkl").read_bytes())[:3]
    reals = {
        ".pkl": [pickle.dumps(real_samples, protocol=p) for p in (0, 2, 4, 5)],
        ".jsonl": ["".join(json.dumps(s) + "\n" for s in real_samples).encode()],
    }
    rng = random.Random(28)
    seen = set()
    for case in range(400):
        suffix = rng.choice([".pkl", ".pkl", ".jsonl"])
        kind, data = mutations(rng, rng.choice(reals[suffix]))
        folder = tmp_path / f"case_{case}"
        folder.mkdir()
        path = folder / f"user_1{suffix}"
        path.write_bytes(data)
        try:
            read_user_file(path)
            load_samples(cfg(folder, image_root=str(synth_root)), log=lambda *_: None)
            seen.add("loaded")
        except DataError as e:
            assert e.problems, (case, kind)
            for p in e.problems:
                assert p.source == path.name and str(p).startswith(path.name), (case, kind, str(p))
            seen.add(e.problems[0].message.removeprefix("cannot be read: ")[:20])
            seen.update("sample problem" for p in e.problems if p.index is not None)
        except Exception as e:
            pytest.fail(f"case {case} ({kind} {suffix}) raised {type(e).__name__}: {e}")
    # the cases reach every stage of the loader, not just its first check
    assert {"loaded", "sample problem"} <= seen and len(seen) >= 8, seen
