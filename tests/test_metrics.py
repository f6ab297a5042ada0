import json

import pytest

from pigg.grounding.metrics import (RADIUS, aggregate, distance, normalize_referring, referring_exact, referring_f1,
                          score_sample, summarize)


def answer(x, y, referring="plus button"):
    return f"```referring\n{referring}\n```\n```grounding\n[{x}, {y}]\n```"


@pytest.mark.parametrize("pred, gt, d, hit", [
    ((500, 640), (500, 500), 140.0, True),  # exactly on the radius: inclusive
    ((500, 640.0001), (500, 500), 140.0001, False),
    ((584, 612), (500, 500), 140.0, True),  # 84-112-140 triangle
    ((0, 0), (300, 400), 500.0, False),  # 3-4-5
    ((311, 541), (311, 541), 0.0, True),
])
def test_distance_and_hit_table(pred, gt, d, hit):
    assert distance(pred, gt) == pytest.approx(d, abs=1e-9)
    record = score_sample(answer(*pred), answer(*gt))
    assert record["distance"] == pytest.approx(d, abs=1e-9)
    assert record["hit"] is hit


def test_exact_boundary_values():
    assert RADIUS == 140.0
    assert distance((500, 640), (500, 500)) == 140.0
    assert distance((0, 0), (300, 400)) == 500.0
    assert distance(None, (1, 2)) is None


def test_score_sample_record():
    record = score_sample(answer(300, 400, "Blue plus button."), answer(0, 0, "plus button"))
    assert record == {
        "pred_point": [300.0, 400.0], "pred_referring": "Blue plus button.",
        "gt_point": [0.0, 0.0], "gt_referring": "plus button",
        "distance": 500.0, "hit": False, "parse_ok": True,
        "referring_exact": False, "referring_f1": 0.8,
        "seed_point": [300.0, 400.0], "seed_distance": 500.0, "seed_hit": False,
    }
    assert json.loads(json.dumps(record)) == record


def test_box_answer_scores_centre_but_seed_scores_first_corner():
    box = "```referring\nb\n```\n```grounding\n[0, 0, 400, 600]\n```"
    record = score_sample(box, answer(200, 300))
    assert (record["pred_point"], record["distance"], record["hit"]) == ([200.0, 300.0], 0.0, True)
    assert (record["seed_point"], record["seed_hit"]) == ([0.0, 0.0], False)
    assert record["seed_distance"] == pytest.approx(360.5551275463989)  # sqrt(200^2 + 300^2)


def test_seed_rule_hits_on_garbage_near_origin_where_pigg_misses():
    # A target at (50, 80) is 94.3 from (0, 0): the seed rule credits an unreadable answer with a hit.
    record = score_sample("I cannot find it.", answer(50, 80))
    assert record["pred_point"] is None and record["distance"] is None
    assert record["parse_ok"] is False and record["hit"] is False
    assert record["seed_point"] == [0.0, 0.0] and record["seed_hit"] is True
    s = summarize([record])
    assert (s["click_acc_140"], s["seed_click_acc_140"], s["parse_failure_rate"]) == (0.0, 1.0, 1.0)


def test_parse_failure_is_a_miss_and_excluded_from_l2_statistics():
    records = [
        score_sample(answer(500, 600), answer(500, 500)),  # 100, hit
        score_sample(answer(500, 800), answer(500, 500)),  # 300, miss
        score_sample(answer(800, 900), answer(500, 500)),  # 500, miss
        score_sample("no idea", answer(500, 500)),  # parse failure: miss, no distance
    ]
    s = summarize(records)
    assert s["n"] == 4
    assert s["click_acc_140"] == 0.25
    assert s["mean_l2"] == 300.0  # (100 + 300 + 500) / 3, not / 4
    assert s["median_l2"] == 300.0
    assert s["parse_failure_rate"] == 0.25
    assert s["seed_click_acc_140"] == 0.25  # (0, 0) is 707 from (500, 500)


def test_median_of_even_count_is_midpoint():
    records = [score_sample(answer(500, 500 + d), answer(500, 500)) for d in (10, 20, 40, 100)]
    s = summarize(records)
    assert (s["mean_l2"], s["median_l2"]) == (42.5, 30.0)


def test_all_parse_failures_give_none_l2():
    s = summarize([score_sample("", answer(1, 2)), score_sample("x", answer(1, 2))])
    assert (s["mean_l2"], s["median_l2"], s["click_acc_140"], s["parse_failure_rate"]) == (None, None, 0.0, 1.0)


def test_referring_means_count_missing_as_zero():
    records = [
        score_sample(answer(1, 1, "plus button"), answer(1, 1, "plus button")),  # exact, F1 1
        score_sample(answer(1, 1, "blue plus button"), answer(1, 1, "plus button")),  # F1 0.8
        score_sample("```grounding\n[1, 1]\n```", answer(1, 1, "plus button")),  # no name: 0
        score_sample(answer(1, 1, "gear"), answer(1, 1, "plus button")),  # 0
    ]
    s = summarize(records)
    assert s["referring_exact"] == 0.25
    assert s["referring_f1"] == pytest.approx(1.8 / 4)


def test_referring_f1_hand_case():
    # P = 2/3, R = 1, F1 = 2PR/(P+R) = 0.8
    assert referring_f1("blue plus button", "plus button") == 0.8
    assert referring_f1("Plus  Button!", "plus button") == 1.0
    assert referring_f1("button, plus", "plus button") == 1.0
    assert referring_f1("ok ok", "ok") == pytest.approx(2 / 3)  # P = 1/2, R = 1: repeats count once
    assert referring_f1("gear", "plus button") == 0.0


def test_referring_f1_missing_or_empty_is_zero_even_when_both_are():
    assert referring_f1(None, "plus") == 0.0
    assert referring_f1("plus", None) == 0.0
    assert referring_f1("", "") == 0.0
    assert referring_f1(None, None) == 0.0
    assert referring_f1('"..."', "plus") == 0.0
    assert referring_exact(None, None) is False
    assert referring_exact("", "") is False


def test_normalize_referring():
    assert normalize_referring('  "Blue   Plus\nButton."  ') == "blue plus button"
    assert normalize_referring("“Wi-Fi toggle”") == "wi-fi toggle"
    assert normalize_referring("`gear`") == "gear"
    assert normalize_referring(None) == ""
    assert referring_exact("The Gear!", "the gear") is True


def test_macro_versus_micro():
    a = [score_sample(answer(100, 100), answer(100, 100))]  # 1/1
    b = [score_sample(answer(100, 100), answer(100, 100)),
         score_sample(answer(900, 900), answer(100, 100)),
         score_sample("nothing", answer(100, 100))]  # 1/3
    result = aggregate({7: b, 3: a})
    assert list(result["users"]) == ["3", "7"]
    assert result["users"]["3"]["click_acc_140"] == 1.0
    assert result["users"]["7"]["click_acc_140"] == 1 / 3
    assert result["micro"]["n"] == 4
    assert result["micro"]["click_acc_140"] == 0.5
    assert result["macro"]["click_acc_140"] == (1 + 1 / 3) / 2
    assert result["macro"]["n_users"] == 2
    # L2 over parsed only: micro pools 0, 0, 800*sqrt(2); macro averages user means 0 and 400*sqrt(2)
    assert result["micro"]["mean_l2"] == pytest.approx(800 * 2 ** 0.5 / 3)
    assert result["macro"]["mean_l2"] == pytest.approx(400 * 2 ** 0.5 / 2)
    assert result["macro"]["parse_failure_rate"] == pytest.approx((0 + 1 / 3) / 2)


def test_macro_skips_users_with_no_value():
    a = [score_sample(answer(100, 130), answer(100, 100))]  # 30 away: a hit
    b = [score_sample("nothing", answer(100, 100))]
    result = aggregate({1: a, 2: b})
    assert result["users"]["2"]["mean_l2"] is None
    assert result["macro"]["mean_l2"] == 30.0  # user 1's alone, not (30 + 0) / 2 with a made-up zero
    assert result["macro"]["click_acc_140"] == 0.5


def test_empty_group_has_no_rates():
    assert summarize([]) == {"n": 0, "click_acc_140": None, "mean_l2": None, "median_l2": None,
                             "parse_failure_rate": None, "referring_exact": None, "referring_f1": None,
                             "seed_click_acc_140": None}


@pytest.mark.parametrize("truth", ["```referring\nplus\n```\n```grounding\n\n```", "plus button", "", "[1, 2, 3]"])
def test_truth_without_point_raises(truth):
    with pytest.raises(ValueError, match="no point in the ground-truth answer"):
        score_sample(answer(1, 2), truth)
