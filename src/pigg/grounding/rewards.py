"""Rewards for reinforcement fine-tuning (`pigg rl`): the click itself, and the answer's format.

- Click reward, `hit`: 1 when the answer's point lies within RADIUS (140, inclusive) of the true point
  in 0-1000 space, else 0: Click Acc@140 for one answer, the reward GUI-R1 trains with. `distance`:
  1 - d / (2 x RADIUS), floored at 0: a graded signal that still prefers a nearer miss (0.5 at the
  radius, 0 from 280 units on). The answer is read by the same parser as evaluation, so a box counts
  as its centre and an answer with no readable point earns 0.
- Format reward: half for a closed, non-empty ```referring block, half for a closed ```grounding block
  that holds a point (a point or a box, as the parser reads it).

`group_advantages` is the advantage GRPO gives each answer: its reward less its group's mean, over the
group's standard deviation (unbiased, + 1e-4, as TRL computes it); a group whose answers all score
the same teaches nothing (advantage 0).
"""
import re

import torch

from pigg.grounding.metrics import RADIUS, distance
from pigg.grounding.parser import parse_answer

CLICK_MODES = ("hit", "distance")
# Closed fences only: an answer cut off by max_new_tokens has not the format the model is asked for.
CLOSED_REFERRING = re.compile(r"```[ \t]*referring\b[ \t]*\n?(.*?)```", re.IGNORECASE | re.DOTALL)
CLOSED_GROUNDING = re.compile(r"```[ \t]*grounding\b[ \t]*\n?(.*?)```", re.IGNORECASE | re.DOTALL)


def truth_point(truth: str, where: str = "ground truth") -> tuple[float, float]:
    point = parse_answer(truth).point
    if point is None:
        raise ValueError(f"{where}: the ground-truth answer holds no point to reward clicks against: {truth!r}")
    return point


def click_reward(answer: str, truth: str, mode: str = "hit") -> float:
    """1/0 for a hit/miss (mode `hit`) or the graded 1 - d / 280 (mode `distance`); 0 without a point."""
    if mode not in CLICK_MODES:
        raise ValueError(f"click reward mode must be one of {CLICK_MODES}, got {mode!r}")
    d = distance(parse_answer(answer).point, truth_point(truth))
    if d is None:
        return 0.0
    if mode == "hit":
        return 1.0 if d <= RADIUS else 0.0
    return max(0.0, 1.0 - d / (2 * RADIUS))


def is_hit(answer: str, truth: str) -> bool:
    return click_reward(answer, truth, "hit") == 1.0


def format_reward(answer: str) -> float:
    """0.5 for a closed non-empty referring block, 0.5 for a closed grounding block holding a point."""
    if not isinstance(answer, str):
        return 0.0
    referring = CLOSED_REFERRING.search(answer)
    grounding = CLOSED_GROUNDING.search(answer)
    score = 0.5 if referring and referring.group(1).strip() else 0.0
    if grounding and parse_answer(f"```grounding\n{grounding.group(1)}```").point is not None:
        score += 0.5
    return score


def group_advantages(rewards, group_size: int) -> torch.Tensor:
    """Each answer's reward less its group's mean, over the group's standard deviation + 1e-4; the
    groups are consecutive runs of `group_size` answers to one prompt."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} (need >= 2 a group)")
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)
