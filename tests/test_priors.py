"""Prior baselines: the densest-point rule on hand-made point sets, where the training targets come
from, scoring beside a model's own samples, and what `pigg eval` writes."""
import json
import math
import shutil

import pytest

from pigg import config as C
from pigg.data.samples import DataError, Sample
from pigg.grounding import priors as P
from pigg.grounding.metrics import aggregate, score_point, score_sample
from pigg.offline.synth import format_answer

SQRT2 = math.sqrt(2)


def messages(x, y, name="plus button"):
    return [{"role": "user", "content": [{"type": "image", "image": "screen.png"}, {"type": "text", "text": "tap it"}]},
            {"role": "assistant", "content": [{"type": "text", "text": format_answer(name, x, y)}]}]


def write_users(root, points_by_user: dict):
    """One JSONL file per user, a sample per point (the images are never opened by a prior)."""
    root.mkdir(parents=True, exist_ok=True)
    for user, points in points_by_user.items():
        (root / f"user_{user}.jsonl").write_text("".join(json.dumps(messages(x, y)) + "\n" for x, y in points))
    return root


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------

def test_densest_point_of_the_issue_example():
    # (0,0) has (100,0) and (0,100) within 140: 3 of 4 targets. (100,0) reaches (0,100) only at 141.4.
    # The mean (275, 275) lies where no target is (it hits none), and the medoid by summed L2 would be
    # (0, 100) or (100, 0) (1586.8 against (0, 0)'s 1614.2): the rule is neither.
    fitted = P.fit([(0, 0), (100, 0), (0, 100), (1000, 1000)])
    assert fitted["point"] == [0.0, 0.0]
    assert fitted["train_samples"] == 4
    assert fitted["train_click_acc_140"] == 0.75
    assert fitted["train_mean_l2"] == pytest.approx((100 + 100 + 1000 * SQRT2) / 4)


def test_hit_radius_is_inclusive_and_ties_go_to_the_smaller_mean_l2_first():
    # (100,0) reaches (240,0) at exactly 140: 3 of 3.
    assert P.fit([(0, 0), (100, 0), (240, 0)])["point"] == [100.0, 0.0]
    # With (241,0), (0,0) and (100,0) both cover 2; (100,0) is nearer overall (241 against 341).
    fitted = P.fit([(0, 0), (100, 0), (241, 0)])
    assert fitted["point"] == [100.0, 0.0] and fitted["train_click_acc_140"] == 2 / 3
    assert fitted["train_mean_l2"] == pytest.approx(241 / 3)


def test_full_ties_go_to_the_smaller_point_and_repeats_count():
    assert P.fit([(500, 500), (0, 0)])["point"] == [0.0, 0.0]  # 1 hit and 707.1 each
    assert P.fit([(0, 100), (100, 0)])["point"] == [0.0, 100.0]  # symmetric: equal sums, x decides
    fitted = P.fit([(0, 0), (900, 900), (900, 900)])
    assert fitted["point"] == [900.0, 900.0] and fitted["train_click_acc_140"] == 2 / 3


def test_no_points_is_an_error():
    with pytest.raises(ValueError, match="no training points"):
        P.fit([])


def test_many_points_are_fitted_in_blocks():
    # 448 distinct candidates, more than three blocks: a grid 50 apart and a cluster at its centre.
    grid = [(x, y) for x in range(0, 1001, 50) for y in range(0, 1001, 50)]  # 441 points
    cluster = [(500 + dx, 500) for dx in range(-3, 4)] * 5
    fitted = P.fit(grid + cluster)
    # Within 140 of (500, 500): the 5 x 5 grid block around it less its corners (100^2 + 100^2 > 140^2),
    # 21 points, and the 35 of the cluster. (497, 500) also reaches the corners (400, 400) and (400, 600),
    # 139.3 away (97^2 + 100^2 = 19409 <= 19600), so it covers 58; (498, 500) misses them (19604), and
    # (503, 500), its mirror image, ties with it in count and distance: the smaller x wins.
    assert sum(1 for x, y in grid if (x - 497) ** 2 + (y - 500) ** 2 <= 140 ** 2) == 23
    assert fitted["point"] == [497.0, 500.0] and fitted["train_click_acc_140"] == (23 + 35) / (441 + 35)


# ---------------------------------------------------------------------------------------------
# Scoring a constant answer
# ---------------------------------------------------------------------------------------------

def test_score_point_is_the_record_of_a_point_only_answer():
    record = score_point((0, 0), [100, 0], "plus button")
    assert record == score_sample("```grounding\n[0, 0]\n```", format_answer("plus button", 100, 0))
    assert record["distance"] == 100.0 and record["hit"] is True and record["parse_ok"] is True
    assert (record["referring_exact"], record["referring_f1"], record["seed_hit"]) == (False, 0.0, True)


def held_out(user, points, start=0):
    return [{"user": user, "index": start + i, "source": f"user_{user}.jsonl", "image": "screen.png", "command": "tap",
             "raw": "...", **score_sample("nothing", format_answer("b", x, y))} for i, (x, y) in enumerate(points)]


def test_baseline_records_score_the_prior_on_exactly_the_model_samples():
    prior = P.Prior("global_prior", "global prior", {}, lambda user, index: (0.0, 0.0))
    model = {1: held_out(1, [(50, 50), (0, 140)]), 2: held_out(2, [(300, 400)], start=5)}
    scored = P.baseline_records(model, prior)
    assert [(r["user"], r["index"]) for rs in scored.values() for r in rs] == [(1, 0), (1, 1), (2, 5)]
    assert scored[1][0]["raw"] == "```grounding\n[0, 0]\n```"
    result = aggregate(scored)
    # distances 50*sqrt(2) (hit), 140 (hit, on the radius), 500 (miss)
    assert result["micro"]["click_acc_140"] == 2 / 3
    assert result["micro"]["mean_l2"] == pytest.approx((50 * SQRT2 + 140 + 500) / 3)
    assert result["micro"]["median_l2"] == 140.0
    assert result["macro"]["click_acc_140"] == (1 + 0) / 2
    assert result["micro"]["parse_failure_rate"] == 0.0 and result["micro"]["referring_exact"] == 0.0


def test_user_prior_is_fitted_on_each_folds_training_part_only():
    targets = [(0, 0), (100, 0), (900, 900), (950, 900), (900, 950), (0, 100)]
    by_user = {7: [Sample(7, 10 + i, "user_7.jsonl", messages(x, y)) for i, (x, y) in enumerate(targets)]}
    splits = {7: {1: ([2, 3, 4, 5], [0, 1]), 2: ([0, 1, 4, 5], [2, 3]), 3: ([0, 1, 2, 3], [4, 5])}}
    prior = P.user_prior(by_user, splits)
    folds = prior.info["folds"]["7"]
    # fold 1 trains on (900,900), (950,900), (900,950), (0,100): each of the first three covers the three
    # (70.7 apart at most); summed L2 1304.2, 1362.7, 1358.6: (900, 900)
    assert folds["1"]["point"] == [900.0, 900.0] and folds["1"]["train_click_acc_140"] == 0.75
    # fold 2 trains on (0,0), (100,0), (900,950), (0,100): (0, 0) covers three, (100, 0) misses (0, 100) at 141.4
    assert folds["2"]["point"] == [0.0, 0.0] and folds["2"]["train_click_acc_140"] == 0.75
    # fold 3 trains on (0,0), (100,0), (900,900), (950,900): two pairs, each point covers 2; summed L2
    # 2681.4, 2542.1, 2527.0, 2596.6: (900, 900)
    assert folds["3"]["point"] == [900.0, 900.0] and folds["3"]["train_click_acc_140"] == 0.5
    answers = [prior.point_for(7, 10 + i) for i in range(6)]
    assert answers == [(900.0, 900.0)] * 2 + [(0.0, 0.0)] * 2 + [(900.0, 900.0)] * 2


def test_a_sample_in_no_test_fold_has_no_user_prior_answer():
    by_user = {1: [Sample(1, i, "user_1.jsonl", messages(10 * i, 0)) for i in range(4)]}
    prior = P.user_prior(by_user, {1: {2: ([0, 1], [2, 3])}})  # a time split: block 1 is never tested
    with pytest.raises(ValueError, match="user prior: no answer for user 1 sample 0"):
        P.baseline_records({1: held_out(1, [(0, 0)])}, prior)


# ---------------------------------------------------------------------------------------------
# Where the global prior's training targets come from
# ---------------------------------------------------------------------------------------------

def global_output(folder, data_root, users="2-3", provenance=True):
    """What `pigg train` leaves for the prior: pigg_config.yaml (its data root) and provenance.json (its users)."""
    cfg = C.RunConfig()
    cfg.data.data_root, cfg.data.users = str(data_root), users
    folder.mkdir(parents=True, exist_ok=True)
    C.save_yaml(cfg, folder / "pigg_config.yaml")
    if provenance:
        (folder / "provenance.json").write_text(json.dumps({"users": users, "samples": 3}))
    return folder


def eval_config(data_root, users="1", **settings):
    cfg = C.RunConfig()
    cfg.data.data_root, cfg.data.users = str(data_root), users
    for key, value in settings.items():
        setattr(cfg.eval, key, value)
    return cfg


@pytest.fixture()
def train_root(tmp_path):
    return write_users(tmp_path / "train_data", {2: [(0, 0), (100, 0)], 3: [(0, 100), (1000, 1000)]})


def test_global_prior_from_the_weights_provenance_and_config(train_root, tmp_path, capsys):
    weights = global_output(tmp_path / "global_agent_lora", train_root)
    cfg = eval_config(tmp_path / "elsewhere")  # the eval's own data root holds no training users
    prior = P.global_prior(cfg, [str(weights)])
    assert prior.point_for(1, 0) == (0.0, 0.0)
    info = prior.info
    assert (info["point"], info["train_samples"], info["train_click_acc_140"]) == ([0.0, 0.0], 4, 0.75)
    assert info["fitted_on"] == {"users": "2-3", "data_root": str(train_root),
                                 "chosen_by": str(weights / "provenance.json"), "samples_without_a_point": 0}
    assert P.describe(info) == "always [0, 0], the densest of 4 training targets (users 2-3)"
    printed = capsys.readouterr().out
    assert "global prior baseline: always [0, 0] (densest training point of 4 training targets" in printed


def test_a_checkpoint_of_a_run_cut_short_uses_the_runs_config(train_root, tmp_path):
    run = global_output(tmp_path / "global_agent_lora", train_root, users="2", provenance=False)
    checkpoint = run / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    users, _, origin = P.recorded_training(checkpoint)
    assert (users, origin) == ("2", str(run / "pigg_config.yaml"))
    prior = P.global_prior(eval_config(tmp_path), [str(checkpoint)])
    assert prior.info["point"] == [0.0, 0.0] and prior.info["train_samples"] == 2  # (0,0), (100,0): tie, smaller


def test_explicit_prior_users_win_and_missing_files_are_an_error(train_root, tmp_path):
    weights = global_output(tmp_path / "global_agent_lora", train_root)
    cfg = eval_config(train_root, prior_users="3")
    prior = P.global_prior(cfg, [str(weights)])
    assert prior.info["fitted_on"]["users"] == "3" and prior.info["fitted_on"]["chosen_by"] == "eval.prior_users"
    assert prior.info["point"] == [0.0, 100.0]  # (0,100) and (1000,1000): one each, (0,100) first
    with pytest.raises(DataError, match="no user_4.pkl or user_4.jsonl"):
        P.global_prior(eval_config(train_root, prior_users="3-4"), [])


def test_prior_data_root_replaces_the_recorded_one(train_root, tmp_path):
    moved = shutil.copytree(train_root, tmp_path / "moved")
    weights = global_output(tmp_path / "global_agent_lora", tmp_path / "gone")
    missing = P.global_prior(eval_config(tmp_path), [str(weights)])
    assert missing.point_for is None
    assert missing.info["unavailable"].startswith(f"the training users 2-3 named in {weights / 'provenance.json'} "
                                                  f"have no files under {tmp_path / 'gone'}")
    found = P.global_prior(eval_config(tmp_path, prior_data_root=str(moved)), [str(weights)])
    assert found.info["fitted_on"]["data_root"] == str(moved) and found.info["point"] == [0.0, 0.0]


def test_without_recorded_users_the_seeds_11_83_are_used_only_when_all_are_there(tmp_path, capsys):
    root = write_users(tmp_path / "data", {u: [(500, 500 + u)] for u in range(11, 83)})  # 83 is missing
    prior = P.global_prior(eval_config(root), [])
    assert prior.point_for is None
    assert "seed's training users 11-83 lack files under" in prior.info["unavailable"]
    assert "(83); give --eval.prior_users" in prior.info["unavailable"]
    assert "WARNING: no global prior baseline" in capsys.readouterr().out
    write_users(root, {83: [(500, 583)]})
    prior = P.global_prior(eval_config(root), [])
    # targets (500, 511) ... (500, 583): each has all 73 within 72; the middle one is nearest to them
    assert prior.info["point"] == [500.0, 547.0] and prior.info["train_click_acc_140"] == 1.0
    assert prior.info["fitted_on"]["chosen_by"] == "the seed's training users (eval.prior_users unset)"


def test_overlap_with_the_evaluated_users_is_recorded(train_root, tmp_path, capsys):
    prior = P.global_prior(eval_config(train_root, users="1-2", prior_users="2-3"), [])
    assert prior.info["fitted_on"]["evaluated_users_among_them"] == "2"
    assert "also evaluated" in capsys.readouterr().out


def test_training_samples_without_a_point_are_counted_not_fitted(tmp_path):
    root = write_users(tmp_path / "data", {2: [(300, 300)]})
    pointless = messages(0, 0)
    pointless[1]["content"][0]["text"] = "```referring\nplus\n```"
    with open(root / "user_2.jsonl", "a") as f:
        f.write(json.dumps(pointless) + "\n")
    prior = P.global_prior(eval_config(root, prior_users="2"), [])
    assert prior.info["point"] == [300.0, 300.0] and prior.info["fitted_on"]["samples_without_a_point"] == 1


def test_broken_training_sample_names_file_index_and_field(tmp_path):
    root = write_users(tmp_path / "data", {2: [(300, 300)]})
    with open(root / "user_2.jsonl", "a") as f:
        f.write(json.dumps([{"role": "user", "content": "no image"}, {"role": "assistant", "content": ""}]) + "\n")
    with pytest.raises(DataError, match=r"user_2\.jsonl sample 1, field messages\[1\]\.content: assistant answer is "):
        P.global_prior(eval_config(root, prior_users="2"), [])


# ---------------------------------------------------------------------------------------------
# Beside a model: metrics.json and the printed table
# ---------------------------------------------------------------------------------------------

def eval_run(folder, per_user: dict):
    """A `pigg eval` folder whose model always answers (500, 500)."""
    (folder / "predictions").mkdir(parents=True)
    done = {}
    for user, points in per_user.items():
        answer = format_answer("b", 500, 500)
        rows = [{"user": user, "index": i, "source": f"user_{user}.jsonl", "image": None, "command": "tap",
                 "raw": answer, **score_sample(answer, format_answer("b", x, y))} for i, (x, y) in enumerate(points)]
        (folder / "predictions" / f"user_{user}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        done[user] = rows
    (folder / "metrics.json").write_text(json.dumps({"label": "model", **aggregate(done)}))
    return folder


def test_attach_writes_the_baseline_beside_the_model(tmp_path):
    from pigg.evaluate import format_metrics

    run = eval_run(tmp_path / "ev", {1: [(0, 100), (600, 500)], 4: [(1000, 1000)]})
    prior = P.Prior("global_prior", "global prior", {"rule": P.RULE, "point": [0.0, 0.0], "train_samples": 4,
                                                     "fitted_on": {"users": "2-3"}}, lambda user, index: (0.0, 0.0))
    unavailable = P.Prior("other_prior", "other prior", {"rule": P.RULE, "unavailable": "no training data"})
    metrics = P.attach(run, [prior, unavailable])
    assert metrics == json.loads((run / "metrics.json").read_text())
    entry = metrics["baselines"]["global_prior"]
    assert entry["label"] == "global prior" and entry["folder"] == "baselines/global_prior"
    # (0,0) against (0,100): 100, hit; (600,500): 781.0, miss; (1000,1000): 1414.2, miss
    assert entry["micro"]["click_acc_140"] == 1 / 3 and entry["macro"]["click_acc_140"] == 0.25
    assert entry["micro"]["median_l2"] == pytest.approx(math.hypot(600, 500))
    assert entry["users"]["4"]["mean_l2"] == pytest.approx(1000 * SQRT2)
    assert metrics["micro"]["click_acc_140"] == 1 / 3  # the model's own rows are untouched: (600,500) is 100 away
    assert metrics["baselines"]["other_prior"] == {"label": "other prior", "baseline": unavailable.info}
    folder = run / "baselines" / "global_prior"
    written = json.loads((folder / "metrics.json").read_text())
    assert written["baseline"] == prior.info and written["micro"] == entry["micro"]
    assert sorted(p.name for p in (folder / "predictions").iterdir()) == ["user_1.jsonl", "user_4.jsonl"]
    table = format_metrics(metrics).splitlines()
    at = table.index("baseline global prior: always [0, 0], the densest of 4 training targets (users 2-3)")
    assert table[at + 1].startswith(" micro      3    33.3%    765.1")
    assert table[at + 2].startswith(" macro      3    25.0%")
    assert table[at + 3] == "baseline other prior: not available: no training data"
    assert P.attach(run, [prior]) == {**metrics, "baselines": {"global_prior": entry}}  # a rerun replaces them


def test_pigg_eval_reports_the_global_prior_of_the_checkpoints_training_users(tiny_dir, synth_root, tmp_path,
                                                                             monkeypatch):
    """A full checkpoint that records users 2-3 of the synthetic data, evaluated on user 1."""
    from pigg.cli import main

    checkpoint = shutil.copytree(tiny_dir, tmp_path / "global_agent_full")
    global_output(checkpoint, synth_root, users="2-3")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", str(checkpoint), "--data-root", str(synth_root), "--users", "1",
                 "--out", str(tmp_path / "ev"), "--max-new-tokens", "4", "--workers", "0",
                 "--data.validation_workers", "1", "--max-pixels", str(200 * 400)]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    entry = metrics["baselines"]["global_prior"]
    samples = [s for u in (2, 3) for s in _samples(synth_root, u)]
    expected = P.fit(P.truth_points(samples))
    assert entry["baseline"]["point"] == expected["point"] and entry["baseline"]["fitted_on"]["users"] == "2-3"
    assert entry["micro"]["n"] == metrics["micro"]["n"] == 8  # user 1's 8 samples, as the model
    truths = [json.loads(line)["gt_point"] for line in (tmp_path / "ev" / "predictions" / "user_1.jsonl").open()]
    hits = sum(math.dist(expected["point"], t) <= 140 for t in truths)
    assert entry["micro"]["click_acc_140"] == hits / 8


def _samples(root, user):
    from pigg.data.samples import read_user_file, normalize_sample

    rows = read_user_file(root / f"user_{user}.pkl")
    return [Sample(user, i, f"user_{user}.pkl", normalize_sample(r, "x", i, root)[0]) for i, r in enumerate(rows)]
