"""pigg.grounding.rewards on hand-computed answers, and GRPO's group advantages on hand-computed rewards."""
import math

import pytest
import torch

from pigg.grounding.rewards import click_reward, format_reward, group_advantages

TRUTH = "```referring\nTransfer button\n```\n```grounding\n[500, 260]\n```"


def answer(point: str, name: str = "Transfer button") -> str:
    return f"```referring\n{name}\n```\n```grounding\n{point}\n```"


def test_hit_at_exactly_140_and_miss_just_beyond():
    assert click_reward(answer("[640, 260]"), TRUTH) == 1.0
    assert click_reward(answer("[500, 120]"), TRUTH) == 1.0
    assert click_reward(answer("[640.01, 260]"), TRUTH) == 0.0
    assert click_reward(answer("[584, 372]"), TRUTH) == 1.0  # (84, 112): exactly 140 on a diagonal
    assert click_reward(answer("[584, 372.01]"), TRUTH) == 0.0


def test_distance_mode_is_graded():
    assert click_reward(answer("[500, 260]"), TRUTH, "distance") == 1.0
    assert click_reward(answer("[640, 260]"), TRUTH, "distance") == 0.5
    assert math.isclose(click_reward(answer("[570, 260]"), TRUTH, "distance"), 0.75)
    assert click_reward(answer("[780, 260]"), TRUTH, "distance") == 0.0
    assert click_reward(answer("[900, 900]"), TRUTH, "distance") == 0.0


def test_unparseable_answers_earn_nothing():
    for text in ("", "I cannot tell", answer("the blue one"), answer("[640]"), None):
        assert click_reward(text, TRUTH) == 0.0
        assert click_reward(text, TRUTH, "distance") == 0.0
    assert format_reward(answer("the blue one")) == 0.5  # the name, but no point
    assert format_reward("I cannot tell") == 0.0
    assert format_reward(None) == 0.0


def test_box_answers_count_as_their_centre():
    assert click_reward(answer("[400, 200, 700, 320]"), TRUTH) == 1.0  # centre (550, 260)
    assert click_reward(answer("[500, 260, 900, 900]"), TRUTH) == 0.0  # corner on target, centre (700, 580) not
    assert click_reward(answer("[400, 200] to [700, 320]"), TRUTH) == 1.0
    assert format_reward(answer("[400, 200, 700, 320]")) == 1.0


def test_format_needs_closed_blocks_with_content():
    assert format_reward(TRUTH) == 1.0
    assert format_reward(answer("[1, 2]", name="  ")) == 0.5  # empty name
    assert format_reward("```grounding\n[500, 260]\n```") == 0.5  # no referring block
    assert format_reward("```referring\nTransfer button\n```\n```grounding\n[500, 260]") == 0.5  # cut off
    assert format_reward("[500, 260]") == 0.0  # a point, but not in the format asked for
    assert click_reward("[500, 260]", TRUTH) == 1.0  # ... which the click reward still credits


def test_truth_without_point_is_an_error():
    with pytest.raises(ValueError, match="ground-truth"):
        click_reward(TRUTH, "```referring\nTransfer button\n```")
    with pytest.raises(ValueError, match="mode"):
        click_reward(TRUTH, TRUTH, "box")


def test_group_advantages_on_hand_computed_rewards():
    # group 1: rewards 1, 0, 0, 1: mean 0.5, unbiased std sqrt(1/3); group 2: all equal -> 0
    adv = group_advantages([1.0, 0.0, 0.0, 1.0, 1.5, 1.5, 1.5, 1.5], 4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6)
    # group of 3: 1.5, 0.5, 0 -> mean 2/3, std sqrt(((5/6)^2 + (1/6)^2 + (2/3)^2) / 2)
    std = math.sqrt(((5 / 6) ** 2 + (1 / 6) ** 2 + (2 / 3) ** 2) / 2)
    expected = torch.tensor([5 / 6, -1 / 6, -2 / 3]) / (std + 1e-4)
    assert torch.allclose(group_advantages([1.5, 0.5, 0.0], 3), expected, atol=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1.0, 0.0, 1.0], 4)
