"""Fabricated `pigg eval` run folders for the report tests: real synthetic screenshots, invented answers.

A plan gives, per user and sample, how far the prediction lands from the ground truth in 0-1000
units (moved along one axis, so the distance is exact) or None for an unparsable answer. Metrics are
computed here the plain way so the tests can compare the page against values worked out by hand.
"""
import json
import math
import pickle
import re
import statistics
from pathlib import Path

from pigg.offline.synth import format_answer, synthesize

ANSWER = re.compile(r"```referring\n(.+)\n```\n```grounding\n\[(\d+), (\d+)\]\n```")
COMMAND = re.compile(r"following instruction: (.*)\n\nThink step-by-step")
HIT_RADIUS = 140

# Users 1, 2, 3 have 6, 5 and 6 samples with these synth arguments (see synthesize's count spread).
PLANS = {
    "vanilla": {1: [None, 300, 200, 10, 150, 0], 2: [None, None, 400, 50, 100], 3: [500, 20, 250, 140, 90, 160]},
    "global": {1: [20, 30, 200, 10, 40, 0], 2: [10, 450, 30, 50, 100], 3: [None, 20, 30, 40, 150, 60]},
    "personalized": {1: [0, 0, 0, 0, 0, 0], 2: [5, 20, 30, 40, 450], 3: [10, 20, 30, 40, 50, 480]},
}


def make_data(out_dir: Path) -> dict:
    """Synthesise 3 users; return {user: [{"image", "command", "gt_point", "gt_referring"}, ...]}."""
    synthesize(out_dir, users=3, samples_per_user=6, seed=0, width=180, height=400)
    data = {}
    for user in (1, 2, 3):
        with open(out_dir / f"user_{user}.pkl", "rb") as f:
            samples = pickle.load(f)
        data[user] = [_ground_truth(out_dir, s) for s in samples]
    return data


def _ground_truth(out_dir: Path, sample: list) -> dict:
    image, prompt = sample[0]["content"]
    referring, x, y = ANSWER.fullmatch(sample[1]["content"][0]["text"]).groups()
    return {"image": str(out_dir / image["image"]), "command": COMMAND.search(prompt["text"]).group(1),
            "gt_point": [int(x), int(y)], "gt_referring": referring}


def moved(point: list, d: int) -> list:
    """A point exactly d units from `point`, along whichever direction stays inside 0-1000."""
    x, y = point
    for candidate in ([x + d, y], [x - d, y], [x, y + d], [x, y - d]):
        if all(0 <= c <= 1000 for c in candidate):
            return candidate
    raise ValueError(f"no point {d} units from {point} inside 0-1000")


def prediction(user: int, index: int, truth: dict, d) -> dict:
    row = {"user": user, "index": index, "source": f"user_{user}.pkl", **truth}
    if d is None:
        return {**row, "raw": "I cannot see that element.", "pred_point": None, "pred_referring": None,
                "distance": None, "hit": False, "parse_ok": False, "referring_exact": False, "referring_f1": 0.0,
                "seed_point": None, "seed_distance": None, "seed_hit": False}
    point = moved(truth["gt_point"], d)
    hit = d <= HIT_RADIUS
    referring = truth["gt_referring"] if hit else "some other element"
    return {**row, "raw": format_answer(referring, *point), "pred_point": point, "pred_referring": referring,
            "distance": float(d), "hit": hit, "parse_ok": True, "referring_exact": hit,
            "referring_f1": 1.0 if hit else 0.0, "seed_point": point, "seed_distance": float(d), "seed_hit": hit}


def metrics_of(rows: list) -> dict:
    distances = [r["distance"] for r in rows if r["distance"] is not None]
    n = len(rows)
    return {"n": n, "click_acc_140": sum(r["hit"] for r in rows) / n,
            "mean_l2": statistics.mean(distances) if distances else None,
            "median_l2": statistics.median(distances) if distances else None,
            "parse_failure_rate": sum(not r["parse_ok"] for r in rows) / n,
            "referring_exact": sum(r["referring_exact"] for r in rows) / n,
            "referring_f1": sum(r["referring_f1"] for r in rows) / n,
            "seed_click_acc_140": sum(r["seed_hit"] for r in rows) / n}


def macro_of(per_user: dict) -> dict:
    keys = [k for k in next(iter(per_user.values())) if k != "n"]
    macro = {}
    for k in keys:
        values = [m[k] for m in per_user.values() if m[k] is not None]
        macro[k] = sum(values) / len(values) if values else None
    return {**macro, "n_users": len(per_user)}


def write_run(folder: Path, label: str, data: dict, plan: dict, edit=None) -> Path:
    """A run folder as `pigg eval` writes it; `edit(row)` may change predictions before writing."""
    (folder / "predictions").mkdir(parents=True)
    per_user, everything = {}, []
    for user, offsets in plan.items():
        rows = [prediction(user, i, data[user][i], d) for i, d in enumerate(offsets)]
        if edit:
            rows = [edit(r) for r in rows]
        lines = "".join(json.dumps(r) + "\n" for r in rows)
        (folder / "predictions" / f"user_{user}.jsonl").write_text(lines)
        per_user[str(user)] = metrics_of(rows)
        everything += rows
    metrics = {"label": label, "model": "Qwen/Qwen3-VL-8B-Instruct",
               "adapter": None if label == "vanilla" else f"runs/{label}/adapter", "max_new_tokens": 128,
               "users": per_user, "micro": metrics_of(everything), "macro": macro_of(per_user)}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return folder


# Prior baselines as pigg.grounding.priors writes them: the global prior always answers GLOBAL_PRIOR,
# the user prior each user's first target (so that sample is a hit at distance 0).
GLOBAL_PRIOR = (500, 500)


def user_prior_points(data: dict) -> dict:
    return {user: tuple(samples[0]["gt_point"]) for user, samples in data.items()}


def attach_priors(folder: Path, data: dict, global_point=GLOBAL_PRIOR, extra=()) -> Path:
    from pigg.grounding import priors as P

    firsts = user_prior_points(data)
    global_info = {"rule": P.RULE, "point": list(global_point), "train_samples": 40, "train_click_acc_140": 0.25,
                   "train_mean_l2": 300.0, "fitted_on": {"users": "5-16", "data_root": "demo/data",
                                                         "chosen_by": "runs/global/provenance.json"}}
    user_info = {"rule": P.RULE, "fitted_on": "each user's training folds, per fold",
                 "folds": {str(u): {"1": {"point": list(p)}, "2": {"point": list(p)}} for u, p in firsts.items()}}
    P.attach(folder, [P.Prior("global_prior", "global prior", global_info, lambda u, i: tuple(global_point)),
                      P.Prior("user_prior", "user prior", user_info, lambda u, i: firsts[u]), *extra])
    return folder


def prior_metrics(data: dict, plan: dict, point_for) -> dict:
    """{"users": {user: metrics}, "micro": ..., "macro": ...} of a constant-per-user answer, the plain way."""
    per_user, everything = {}, []
    for user, offsets in plan.items():
        rows = []
        for i in range(len(offsets)):
            d = math.dist(point_for(user), data[user][i]["gt_point"])
            rows.append({"distance": d, "hit": d <= HIT_RADIUS, "parse_ok": True, "referring_exact": False,
                         "referring_f1": 0.0, "seed_hit": d <= HIT_RADIUS})
        per_user[str(user)] = metrics_of(rows)
        everything += rows
    return {"users": per_user, "micro": metrics_of(everything), "macro": macro_of(per_user)}
