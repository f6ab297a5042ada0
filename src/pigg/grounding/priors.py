"""Prior baselines: what always answering the same point scores, reported beside every model.

A model that learned where targets usually lie on a screen, but not to read the screen, scores about
what a constant answer scores. So pigg scores two constant answers with the same metrics on the same
held-out samples as the models (the samples each model answered, read from its predictions):

- global prior: one point fitted on the ground truth of the global model's training users, answered
  for every sample;
- user prior (personalization): for each user and fold, one point fitted on that user's training
  folds only, answered for the fold's held-out samples.

Both points follow one rule, the DENSEST TRAINING POINT: of the training targets, the one with the
most training targets within 140 units (the best training Click Acc@140 a training target gets as a
constant answer); ties go to the smaller mean L2 to the training targets, then to the smaller (x, y).
Not the mean: targets spread over a screen can average to a place where none lies, and a weak
baseline would flatter the models.

Baselines are fitted on training data only. Where none can be found, metrics.json says so under
"baselines" instead of showing a made-up one. A baseline names no element, so its referring scores
are 0.
"""
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pigg import config as C
from pigg.data.samples import DataError, Problem, Sample, find_user_files, normalize_sample, read_user_file, user_file
from pigg.data.users import format_users, parse_users
from pigg.grounding import metrics as M
from pigg.grounding.parser import parse_answer

RULE = ("densest training point: the training target with the most training targets within 140 units "
        "(ties: the smaller mean L2 to them, then the smaller x, y)")
SEED_TRAIN_USERS = "11-83"
CHUNK = 128  # candidates per block of distances: 128 x 20,000 targets x 2 coordinates is 41 MB of float64


@dataclass
class Prior:
    name: str  # its key in metrics.json and summary.json
    label: str  # its name in reports
    info: dict  # what it is, JSON-able: the rule, the point(s), the training data; or why it is unavailable
    point_for: Callable[[int, int], tuple] | None = None  # (user, sample index) -> its answer; None: unavailable


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------

def fit(points: list) -> dict:
    """The densest training point of `points`, with its hit rate and mean L2 on them."""
    if not points:
        raise ValueError("no training points to fit a prior on")
    counts = Counter((float(x), float(y)) for x, y in points)
    candidates = sorted(counts)  # the first best is then the one with the smaller (x, y)
    xy, weights = np.array(candidates), np.array([counts[c] for c in candidates], dtype=np.float64)
    hits, l2 = np.empty(len(xy)), np.empty(len(xy))
    for start in range(0, len(xy), CHUNK):
        squared = ((xy[start:start + CHUNK, None, :] - xy[None, :, :]) ** 2).sum(-1)
        hits[start:start + CHUNK] = (squared <= M.RADIUS ** 2) @ weights  # squares stay exact on integer points
        l2[start:start + CHUNK] = np.sqrt(squared) @ weights
    # Rounded so that symmetric candidates, whose sums differ only in summation order, tie.
    best = max(range(len(xy)), key=lambda i: (hits[i], -round(float(l2[i]), 6)))
    n = len(points)
    return {"point": list(candidates[best]), "train_samples": n, "train_click_acc_140": float(hits[best]) / n,
            "train_mean_l2": float(l2[best]) / n}


def truth_points(samples: list[Sample]) -> list[tuple[float, float]]:
    """Each sample's ground-truth point; raises one DataError naming every sample that has none."""
    from pigg.evaluate import prompt_and_truth

    points, problems = [], []
    for s in samples:
        point = parse_answer(prompt_and_truth(s)[1]).point
        if point is None:
            problems.append(Problem(s.source, s.index, f"messages[{len(s.messages) - 1}].content",
                                    "no point in the ground-truth answer"))
        points.append(point)
    if problems:
        raise DataError(problems)
    return points


# ---------------------------------------------------------------------------------------------
# The global prior: which training data, then the point
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainingData:
    data_root: str
    users: str
    origin: str  # what chose these users, for the report
    trust_pickle: bool = False


def recorded_training(folder) -> tuple[str, C.RunConfig | None, str] | None:
    """(training users, the run's config, the file that names them) of a pigg output folder, or of a
    checkpoint inside one (OUT/checkpoints/checkpoint-N: the run's files are two levels up); None
    when the folder records no training users (base weights, a personalized fold)."""
    folder = Path(folder)
    for run in (folder, folder.parent.parent) if folder.parent.name == "checkpoints" else (folder,):
        config_path, provenance = run / "pigg_config.yaml", run / "provenance.json"
        run_cfg = C.load_yaml(config_path) if config_path.is_file() else None
        users = json.loads(provenance.read_text()).get("users") if provenance.is_file() else None
        if users:
            return users, run_cfg, str(provenance)
        if run_cfg is not None:  # a run cut short writes provenance.json only at its end
            return run_cfg.data.users, run_cfg, str(config_path)
    return None


def training_data(cfg: C.RunConfig, weights: list) -> tuple[TrainingData | None, str]:
    """Where the global prior's training targets are: (data, "") or (None, why there is none).

    In this order: eval.prior_users when given; the training users recorded with the weights
    (provenance.json, else the pigg_config.yaml of a run cut short) under that run's data root; the
    seed's training users 11-83 when all their files are under data.data_root. eval.prior_data_root,
    when given, replaces the data root in every case.
    """
    e, d = cfg.eval, cfg.data
    if e.prior_users:
        root = e.prior_data_root or d.data_root
        find_user_files(root, e.prior_users)  # asked for by name: a missing file is an error, before any model loads
        return TrainingData(root, e.prior_users, "eval.prior_users", d.trust_pickle), ""
    for folder in weights:
        found = recorded_training(folder)
        if found is None:
            continue
        users, run_cfg, origin = found
        run_data = run_cfg.data if run_cfg is not None else d
        root = e.prior_data_root or run_data.data_root
        present = [u for u in parse_users(users) if user_file(root, u)]
        if not present or (len(present) < len(parse_users(users)) and not run_data.skip_missing_users):
            return None, (f"the training users {users} named in {origin} have no files under {root} "
                          "(give --eval.prior_data_root, or --eval.prior_users with --eval.prior_data_root)")
        return TrainingData(root, format_users(present), origin, run_data.trust_pickle), ""
    root = e.prior_data_root or d.data_root
    missing = [u for u in parse_users(SEED_TRAIN_USERS) if not user_file(root, u)]
    if missing:
        return None, (f"no training data: {', '.join(map(str, weights)) or 'the model'} records no training users, "
                      f"and the seed's training users {SEED_TRAIN_USERS} lack files under {root} "
                      f"({format_users(missing)}); give --eval.prior_users (and --eval.prior_data_root)")
    origin = "the seed's training users (eval.prior_users unset)"
    return TrainingData(root, SEED_TRAIN_USERS, origin, d.trust_pickle), ""


def read_training_points(data: TrainingData) -> tuple[dict[int, list], int]:
    """({user: ground-truth points}, samples without a point) of the training users, one file at a time
    and without opening images. A training sample whose answer holds no point (training may take them:
    data.allow_unparseable_answers) gives no target; it is counted, and the count is reported."""
    from pigg.evaluate import prompt_and_truth

    points, problems, pointless = {}, [], 0
    for user, path in find_user_files(data.data_root, data.users).items():
        found = points.setdefault(user, [])
        for index, raw in enumerate(read_user_file(path, data.trust_pickle)):
            messages, bad = normalize_sample(raw, path.name, index, Path(data.data_root))
            problems += bad
            if not bad:
                point = parse_answer(prompt_and_truth(Sample(user, index, path.name, messages))[1]).point
                if point is None:
                    pointless += 1
                else:
                    found.append(point)
    if problems:
        raise DataError(problems, hint="(while fitting the global prior baseline on the training data)")
    return points, pointless


def global_prior(cfg: C.RunConfig, weights: list) -> Prior:
    """The global prior for a run that evaluates cfg.data.users with `weights` (output folders that may
    record their training users); unavailable, with the reason, when no training data is found."""
    data, why = training_data(cfg, weights)
    if data is None:
        print(f"WARNING: no global prior baseline: {why}")
        return Prior("global_prior", "global prior", {"rule": RULE, "unavailable": why})
    per_user, pointless = read_training_points(data)
    if not any(per_user.values()):
        why = f"no training sample of users {data.users} under {data.data_root} has a point in its answer"
        print(f"WARNING: no global prior baseline: {why}")
        return Prior("global_prior", "global prior", {"rule": RULE, "unavailable": why})
    fitted = fit([p for user in sorted(per_user) for p in per_user[user]])
    fitted_on = {"users": format_users(list(per_user)), "data_root": str(data.data_root), "chosen_by": data.origin,
                 "samples_without_a_point": pointless}
    info = {"rule": RULE, **fitted, "fitted_on": fitted_on}
    seen = sorted(set(per_user) & set(parse_users(cfg.data.users)))
    if seen:  # the prior has seen those users' answers, as the model trained on the same users has
        info["fitted_on"]["evaluated_users_among_them"] = format_users(seen)
        print(f"WARNING: the global prior is fitted on users {format_users(seen)}, who are also evaluated")
    point = tuple(fitted["point"])
    print(f"global prior baseline: always {point_text(point)} ({RULE.split(':')[0]} of {fitted['train_samples']} "
          f"training targets, users {info['fitted_on']['users']}; training Click Acc@140 "
          f"{100 * fitted['train_click_acc_140']:.1f}%)")
    return Prior("global_prior", "global prior", info, lambda user, index: point)


def user_prior(by_user: dict[int, list[Sample]], splits: dict) -> Prior:
    """Per user and fold, the densest point of the user's training folds, answered on the fold's
    held-out samples (`splits`: {user: {fold: (train positions, test positions)}} into by_user)."""
    folds, answers = {}, {}
    for user, user_folds in splits.items():
        targets = truth_points(by_user[user])
        for k, (train, test) in user_folds.items():
            fitted = fit([targets[i] for i in train])
            folds.setdefault(str(user), {})[str(k)] = fitted
            answers.update({(user, by_user[user][i].index): tuple(fitted["point"]) for i in test})
    info = {"rule": RULE, "fitted_on": "each user's training folds, per fold", "folds": folds}
    return Prior("user_prior", "user prior", info, lambda user, index: answers[(user, index)])


# ---------------------------------------------------------------------------------------------
# Scoring beside a model
# ---------------------------------------------------------------------------------------------

def point_text(point) -> str:
    return f"[{point[0]:g}, {point[1]:g}]"


def answer_text(point) -> str:
    return f"```grounding\n{point_text(point)}\n```"


def describe(info: dict) -> str:
    """What a baseline answers, in one line (its "baseline" entry in metrics.json)."""
    if "unavailable" in info:
        return f"not available: {info['unavailable']}"
    if "point" in info:
        return (f"always {point_text(info['point'])}, the densest of {info['train_samples']} training targets "
                f"(users {info['fitted_on']['users']})")
    return "per user and fold, the densest of the targets in that user's training folds"


def baseline_records(per_user: dict, prior: Prior) -> dict[int, list[dict]]:
    """The prior's records on exactly the samples of a model's records ({user: [record]})."""
    out = {}
    for user, records in per_user.items():
        rows = []
        for r in records:
            try:
                point = prior.point_for(r["user"], r["index"])
            except KeyError:
                raise ValueError(f"{prior.label}: no answer for user {r['user']} sample {r['index']} (not held out "
                                 "in any fold)") from None
            rows.append({k: r.get(k) for k in ("user", "index", "source", "image", "command")} |
                        {"raw": answer_text(point), **M.score_point(point, r["gt_point"], r["gt_referring"])})
        out[user] = rows
    return out


def attach(run_dir, priors: list[Prior]) -> dict:
    """Score each prior on the samples a `pigg eval` run folder holds; write each into
    run_dir/baselines/<name>/ (predictions and metrics.json, as pigg eval writes them) and list them
    under "baselines" in run_dir/metrics.json. Returns the updated metrics."""
    from pigg.evaluate import by_index, read_done, write_json_atomic

    run_dir = Path(run_dir)
    records = by_index(read_done(run_dir / "predictions"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["baselines"] = {p.name: write_baseline(run_dir / "baselines" / p.name, p, records, run_dir) for p in priors}
    write_json_atomic(run_dir / "metrics.json", metrics)
    return metrics


def write_baseline(folder: Path, prior: Prior, records: dict, relative_to: Path) -> dict:
    """The prior's folder (replaced) and its entry for the model's metrics.json."""
    from pigg.evaluate import write_json_atomic

    if prior.point_for is None:
        return {"label": prior.label, "baseline": prior.info}
    scored = baseline_records(records, prior)
    metrics = M.aggregate(scored)
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "predictions").mkdir(parents=True)
    for user, rows in scored.items():
        (folder / "predictions" / f"user_{user}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_json_atomic(folder / "metrics.json", {"label": prior.label, "baseline": prior.info, **metrics})
    return {"label": prior.label, "baseline": prior.info, "folder": str(folder.relative_to(relative_to)), **metrics}
