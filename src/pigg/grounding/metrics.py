"""Scores for grounding answers, one record per sample, summaries per user and over users.

Per group of records (`summarize`):
- click_acc_140: share of samples whose predicted point lies within RADIUS (L2, inclusive) of the true
  point in 0-1000 space. A sample whose answer has no readable point is a miss.
- mean_l2, median_l2: L2 distance over the samples with a readable point only; None when there are
  none. Unreadable answers are left out here, not given a made-up distance: parse_failure_rate (their
  share of all samples) reports them instead, so read the two together.
- referring_exact: share of samples whose normalized name equals the truth's (a missing name is 0).
- referring_f1: mean SQuAD-style bag-of-tokens F1 between the names (a missing name is 0).
- seed_click_acc_140: Acc@140 under the replaced system's rule (first two numbers, (0, 0) when
  unreadable), kept only to compare with its reports. It credits an unreadable answer whenever the
  target sits near the top-left corner, and it scores a box by its first corner.

Over users (`aggregate`): "micro" pools every sample (each sample weighs the same); "macro" is the
plain mean of the per-user values (each user weighs the same), skipping users where a value is None.

A prior baseline's constant point is scored by `score_point` into the same records, so the same
summaries describe models and baselines (pigg.grounding.priors).

Nothing is rounded here; reporting code does that.
"""
import math
import statistics
import unicodedata
from collections import Counter

from pigg.grounding.parser import parse_answer, seed_point

RADIUS = 140.0
SUMMARY_KEYS = ("click_acc_140", "mean_l2", "median_l2", "parse_failure_rate", "referring_exact",
                "referring_f1", "seed_click_acc_140")


def distance(pred, gt) -> float | None:
    """Euclidean distance in 0-1000 space; None when there is no prediction."""
    if pred is None:
        return None
    return math.hypot(pred[0] - gt[0], pred[1] - gt[1])


def is_hit(d: float | None) -> bool:
    return d is not None and d <= RADIUS


def to_pixels(point, size) -> tuple[float, float]:
    """A 0-1000 point in the pixels of a (width, height) image; each axis scales by its own side."""
    return (point[0] * size[0] / 1000, point[1] * size[1] / 1000)


def to_relative(pixel, size) -> tuple[float, float]:
    """A pixel position of a (width, height) image in 0-1000 space."""
    return (pixel[0] * 1000 / size[0], pixel[1] * 1000 / size[1])


def in_box(pixel, box) -> bool:
    """The point (pixels) lies inside box (x1, y1, x2, y2 in pixels), edges included, as the ScreenSpot
    benchmarks score it; no point is a miss."""
    return pixel is not None and box[0] <= pixel[0] <= box[2] and box[1] <= pixel[1] <= box[3]


def normalize_referring(text: str | None) -> str:
    """Lowercase, whitespace collapsed, punctuation and quotes around the name dropped."""
    if not text:
        return ""
    return _strip_edges(" ".join(text.lower().split()))


def _strip_edges(text: str) -> str:
    # Unicode categories rather than string.punctuation, so “curly” and 「CJK」 quotes go too.
    def edge(c):
        return c.isspace() or c == "`" or unicodedata.category(c).startswith("P")

    start, end = 0, len(text)
    while start < end and edge(text[start]):
        start += 1
    while end > start and edge(text[end - 1]):
        end -= 1
    return text[start:end]


def _tokens(text: str | None) -> list[str]:
    # Each word loses its own edge punctuation too, so "button," matches "button".
    return [t for t in (_strip_edges(w) for w in normalize_referring(text).split()) if t]


def referring_f1(pred: str | None, gt: str | None) -> float:
    """Bag-of-tokens F1 of the normalized names. 0.0 when either is missing or empty, both included:
    with no true name there is nothing to get right, and saying nothing earns no credit."""
    p, g = _tokens(pred), _tokens(gt)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    # 2PR/(P+R) with P = same/|p|, R = same/|g|, in the form that keeps 4/5 exactly 0.8.
    return 2 * same / (len(p) + len(g))


def referring_exact(pred: str | None, gt: str | None) -> bool:
    """Normalized names equal and not empty (two missing names do not match, as in referring_f1)."""
    p = normalize_referring(pred)
    return p != "" and p == normalize_referring(gt)


def score_sample(answer: str, truth: str) -> dict:
    """One JSON-able record. Raises ValueError when the truth has no readable point: a broken label
    would otherwise score as a miss and hide in the averages."""
    gt = parse_answer(truth)
    if gt.point is None:
        shown = repr(truth)
        raise ValueError(f"no point in the ground-truth answer {shown[:200]}{'...' if len(shown) > 200 else ''}")
    pred = parse_answer(answer)
    # The seed rule is scored against our reading of the truth, so only the prediction rule differs.
    return _record(pred.point, pred.referring, gt.point, gt.referring, seed_point(answer))


def score_point(point, gt_point, gt_referring: str | None = None) -> dict:
    """The record of an answer that is a point and nothing else, as a prior baseline answers: it names
    no element (referring scores 0) and the seed rule reads the same point."""
    point = (float(point[0]), float(point[1]))
    return _record(point, None, (float(gt_point[0]), float(gt_point[1])), gt_referring, point)


def _record(pred_point, pred_referring, gt_point, gt_referring, seed) -> dict:
    d = distance(pred_point, gt_point)
    seed_d = distance(seed, gt_point)
    return {
        "pred_point": None if pred_point is None else list(pred_point),
        "pred_referring": pred_referring,
        "gt_point": list(gt_point),
        "gt_referring": gt_referring,
        "distance": d,
        "hit": is_hit(d),
        "parse_ok": pred_point is not None,
        "referring_exact": referring_exact(pred_referring, gt_referring),
        "referring_f1": referring_f1(pred_referring, gt_referring),
        "seed_point": list(seed),
        "seed_distance": seed_d,
        "seed_hit": is_hit(seed_d),
    }


def summarize(records: list[dict]) -> dict:
    """The metrics of one group; every rate is None for an empty group."""
    n = len(records)
    if n == 0:
        return {"n": 0, **{key: None for key in SUMMARY_KEYS}}
    parsed = [r["distance"] for r in records if r["parse_ok"]]
    return {
        "n": n,
        "click_acc_140": sum(r["hit"] for r in records) / n,
        "mean_l2": sum(parsed) / len(parsed) if parsed else None,
        "median_l2": statistics.median(parsed) if parsed else None,
        "parse_failure_rate": sum(not r["parse_ok"] for r in records) / n,
        "referring_exact": sum(r["referring_exact"] for r in records) / n,
        "referring_f1": sum(r["referring_f1"] for r in records) / n,
        "seed_click_acc_140": sum(r["seed_hit"] for r in records) / n,
    }


def aggregate(per_user: dict[int, list[dict]]) -> dict:
    """Per-user summaries (keyed by the id as a string, for JSON), pooled micro and per-user macro."""
    users = {str(user): summarize(records) for user, records in sorted(per_user.items())}
    pooled = [r for _, records in sorted(per_user.items()) for r in records]
    macro = {}
    for key in SUMMARY_KEYS:
        values = [u[key] for u in users.values() if u[key] is not None]
        macro[key] = sum(values) / len(values) if values else None
    macro["n_users"] = len(users)
    return {"users": users, "micro": summarize(pooled), "macro": macro}
