import math
import random

import pytest

from pigg.grounding.parser import Parsed, parse_answer, seed_point

CANONICAL = "```referring\nblue plus button\n```\n```grounding\n[311, 541]\n```"


def grounding(body: str) -> str:
    return f"```referring\nx\n```\n```grounding\n{body}\n```"


def test_canonical_answer():
    assert parse_answer(CANONICAL) == Parsed("blue plus button", (311.0, 541.0), "point")


@pytest.mark.parametrize("body, point, kind", [
    ("[311, 541]", (311.0, 541.0), "point"),
    ("(311, 541)", (311.0, 541.0), "point"),
    ("[311,541]", (311.0, 541.0), "point"),
    ("[ 12.5 , 7.25 ]", (12.5, 7.25), "point"),
    ("311, 541", (311.0, 541.0), "bare_point"),
    ("[100, 200, 300, 400]", (200.0, 300.0), "box"),
    ("(100, 200, 301, 401)", (200.5, 300.5), "box"),
    ("100, 200, 300, 400", (200.0, 300.0), "bare_box"),
    ("(100, 200) to (300, 400)", (200.0, 300.0), "box_to"),
    ("[10, 20] TO [30, 60]", (20.0, 40.0), "box_to"),
    ("[[311, 541]]", (311.0, 541.0), "point"),
    ("[1200, 541]", (1200.0, 541.0), "point"),  # outside 0-1000: read as written, not clamped
    ("[-5, 10]", (-5.0, 10.0), "point"),  # negative: read as written, the metric judges it
])
def test_point_formats_in_grounding_block(body, point, kind):
    parsed = parse_answer(grounding(body))
    assert (parsed.point, parsed.kind) == (point, kind)


def test_grounding_block_wins_over_other_numbers():
    text = "Step 1, 2: the icon [5, 5] in row 3.\n```referring\nicon 7, 8\n```\n```grounding\n[311, 541]\n```\n[9, 9]"
    assert parse_answer(text).point == (311.0, 541.0)


def test_grounding_block_without_point_is_a_failure_even_with_numbers_elsewhere():
    assert parse_answer("[5, 5]\n```grounding\nsomewhere top left\n```").point is None


def test_without_grounding_block_the_whole_answer_is_searched():
    assert parse_answer("The button is at (311, 541).").point == (311.0, 541.0)
    # bracketed beats an earlier bare pair
    assert parse_answer("Steps 1, 2 done; tap [311, 541]").point == (311.0, 541.0)


def test_first_bracketed_candidate_wins_and_to_pair_beats_its_own_corner():
    assert parse_answer("[10, 20] then [30, 40]").point == (10.0, 20.0)
    assert parse_answer("[10, 20] to [30, 40] then [50, 50]").point == (20.0, 30.0)


def test_unclosed_grounding_block_still_reads():
    assert parse_answer("```referring\nok\n```\n```grounding\n[311, 541]").point == (311.0, 541.0)


def test_referring_is_stripped_and_empty_block_is_none():
    assert parse_answer("```referring\n  Settings gear \n```\n```grounding\n[1, 2]\n```").referring == "Settings gear"
    assert parse_answer("```referring\n\n```\n```grounding\n[1, 2]\n```").referring is None
    assert parse_answer("```grounding\n[1, 2]\n```").referring is None


@pytest.mark.parametrize("text, point, kind, referring", [
    ('{"point_2d": [311, 541], "label": "plus"}', (311.0, 541.0), "point_2d", "plus"),
    ('{"bbox_2d": [100, 200, 300, 400], "label": "gear"}', (200.0, 300.0), "bbox_2d", "gear"),
    ('[{"bbox_2d": [100, 200, 300, 400], "label": "gear"}]', (200.0, 300.0), "bbox_2d", "gear"),
    ('```json\n[\n  {"point_2d": [12, 34], "label": "say \\"hi\\""}\n]\n```', (12.0, 34.0), "point_2d", 'say "hi"'),
    ("{'point_2d': [12, 34], 'label': 'single'}", (12.0, 34.0), "point_2d", "single"),
    ('{"point_2d": [12, 34]}', (12.0, 34.0), "point_2d", None),
    ('{"bbox_2d": [0, 0, 10, 10], "label": "cut off', (5.0, 5.0), "bbox_2d", None),  # truncated generation
])
def test_qwen_json_forms(text, point, kind, referring):
    assert parse_answer(text) == Parsed(referring, point, kind)


def test_json_label_and_point_come_from_the_same_object():
    text = '[{"bbox_2d": [1, 2, 3], "label": "bad"}, {"point_2d": [40, 50], "label": "good"}]'
    assert parse_answer(text) == Parsed("good", (40.0, 50.0), "point_2d")


def test_referring_block_beats_json_label():
    text = '```referring\nplus button\n```\n```grounding\n{"point_2d": [1, 2], "label": "other"}\n```'
    assert parse_answer(text) == Parsed("plus button", (1.0, 2.0), "point_2d")


def test_json_count_not_key_decides_point_or_box():
    assert parse_answer('{"point_2d": [10, 20, 30, 40]}') == Parsed(None, (20.0, 30.0), "point_2d")
    assert parse_answer('{"bbox_2d": [10, 20]}') == Parsed(None, (10.0, 20.0), "bbox_2d")


def test_malformed_json_coordinates_are_not_a_point():
    assert parse_answer('{"point_2d": [1, 2, 3]}').point is None
    assert parse_answer('{"point_2d": [1, "2"]}').point is None
    assert parse_answer('{"bbox_2d": []}').point is None


@pytest.mark.parametrize("text", [
    "", "   ", "garbage", "no point here at all", "7", "[7]", "[1, 2, 3]", "1, 2, 3", "[1, 2, 3, 4, 5]",
    grounding(""), grounding("[311]"), grounding("[1, 2, 3]"), "v2, 3", "version 1.2.3, 4.5.6", "12px, 40px",
    "[1 2]", "[" + "9" * 400 + ", 5]",
])
def test_no_point_gives_none_never_zero(text):
    parsed = parse_answer(text)
    assert parsed.point is None and parsed.kind is None


def test_non_string_input_gives_empty_parse():
    assert parse_answer(None) == Parsed(None, None, None)


def test_random_strings_never_raise():
    rng = random.Random(0)
    pieces = ["[", "]", "(", ")", "{", "}", ",", ", ", ".", "-", " ", "\n", "`", "```", '"', "'", ":", "to",
              "1", "23", "456", "7.5", "-8", "9" * 400, "point_2d", "bbox_2d", "label", "grounding", "referring",
              "json", "\\", "é", "가", "\x00"]
    kinds = {"point", "box", "box_to", "bare_point", "bare_box", "point_2d", "bbox_2d"}
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        parsed = parse_answer(text)
        seed = seed_point(text)
        assert len(seed) == 2
        if parsed.point is None:
            assert parsed.kind is None
        else:
            assert parsed.kind in kinds and len(parsed.point) == 2
            assert all(isinstance(v, float) and math.isfinite(v) for v in parsed.point)


@pytest.mark.parametrize("text, point", [
    (CANONICAL, (311.0, 541.0)),
    (grounding("[100, 200, 300, 400]"), (100.0, 200.0)),  # a box gives its first corner
    ("Step 1, then [311, 541]", (1.0, 311.0)),  # first two numbers anywhere when there is no block
    (grounding("[311]") + "\n[5, 6]", (0.0, 0.0)),  # the block is all it reads
    ("garbage", (0.0, 0.0)),
    ("", (0.0, 0.0)),
    ("7", (0.0, 0.0)),
])
def test_seed_point_rule(text, point):
    assert seed_point(text) == point
