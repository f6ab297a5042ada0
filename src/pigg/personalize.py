"""Personalized fine-tuning: for each test user, K folds; each fold starts from the global model,
trains on the other folds and is evaluated on its own, next to the zero-shot and global models.

Starting point. From a LoRA global output, the global adapter is merged into the base once per
process and every fold trains a fresh LoRA adapter on the merged weights. Merged rather than
stacked: the forward pass carries one adapter instead of two, the personal adapter stays small
and independent, and `pigg export --adapter GLOBAL --adapter PERSONAL` rebuilds exactly the
weights it trained on (merging is addition). PEFT's `unload()` then removes the fold's adapter
without touching the merged weights, so the next fold starts from the global model again. With
`--full` all language-model weights train; they are restored from a copy in CPU memory before each
fold. From a full global output the model is the global weights themselves.

Every model is loaded once per process; users and folds run one after another. A finished fold
writes `fold.json` last and is skipped by a rerun; predictions are appended as they are made, so an
interrupted run continues where it stopped.

Baselines. Beside the three models, two constant answers are scored on the same held-out samples
(pigg.grounding.priors): the global prior, fitted on the global run's training users (its
provenance.json), and the user prior, fitted per user and fold on that fold's training part only. A
personalized model that does no better than the user prior learned the user's favourite screen region,
not the user.

Output, OUT/personal_agent_{method}/:
  pigg_config.yaml, provenance.json, splits.json   the run's configuration and each user's folds
  vanilla/, global/         zero-shot and global predictions and metrics on every held-out sample
  user_{id}/fold_{k}/       adapter (or weights), processor, eval/, fold.json (checkpoints/ while it runs)
  user_{id}/summary.json    the models and baselines per fold (the user prior with its point) and pooled
  personalized/             the folds' held-out predictions together (each sample predicted by the
                            model that did not train on it) and their metrics
  {vanilla,global,personalized}/baselines/   the baselines on that folder's samples, listed in its metrics.json
  summary.json, report.html
"""
import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import torch

from pigg import config as C
import pigg.grounding.metrics as M
from pigg.grounding.priors import attach as attach_priors, baseline_records, describe, global_prior, user_prior

PERSONALIZE_DEFAULTS = {  # the seed's 4_finetune_person.py; the run's other settings are the global run's
    "data": {"users": "1-10"},
    "train": {"learning_rate": 2e-5, "epochs": 3.0, "effective_batch": 4, "warmup_steps": 5, "weight_decay": 0.01,
              "save_steps": 500},
}
MODELS = ("vanilla", "global", "personalized")
BASELINES = ("global_prior", "user_prior")  # constant answers, not models (pigg.grounding.priors)
# Settings that change what a fold learns or how it is split: a rerun into the same folder must keep them.
SAME_RUN_FIELDS = {"model": None, "lora": None, "personalize": ("base", "folds", "split", "split_seed"),
                   "train": ("method", "learning_rate", "epochs", "max_steps", "effective_batch", "warmup_steps",
                             "lr_scheduler", "weight_decay", "seed")}


def folds_of(n: int, k: int, split: str, seed: int, user: int) -> dict[int, tuple[list[int], list[int]]]:
    """{fold: (train positions, test positions)} over a user's n samples in file order.

    kfold: positions shuffled with a generator seeded by (seed, user), cut into k near-equal folds.
    time: positions in order cut into k blocks; fold j (2..k) trains on blocks 1..j-1 and tests on j.
    """
    if n < k:
        raise ValueError(f"user {user} has {n} samples, fewer than the {k} folds")
    bounds = [round(i * n / k) for i in range(k + 1)]
    if split == "time":
        blocks = [list(range(bounds[i], bounds[i + 1])) for i in range(k)]
        return {j: (sum(blocks[:j - 1], []), blocks[j - 1]) for j in range(2, k + 1)}
    order = list(range(n))
    random.Random(f"pigg-folds:{seed}:{user}").shuffle(order)  # str seeds hash the same in every process
    parts = [sorted(order[bounds[i]:bounds[i + 1]]) for i in range(k)]
    return {j: (sorted(p for i, part in enumerate(parts) if i != j - 1 for p in part), parts[j - 1])
            for j in range(1, k + 1)}


def describe_global(base: str | None) -> tuple[str, str | None, C.RunConfig | None]:
    """(base model, global adapter or None, the global run's config if it wrote one) of a global output."""
    if not base:
        raise C.ConfigError("personalize.base is required: the global output folder (--base global_agent_lora)")
    folder = Path(base)
    global_cfg = C.load_yaml(folder / "pigg_config.yaml") if (folder / "pigg_config.yaml").is_file() else None
    if (folder / "adapter_config.json").is_file():
        adapter_cfg = json.loads((folder / "adapter_config.json").read_text())
        model = global_cfg.model.name_or_path if global_cfg else adapter_cfg["base_model_name_or_path"]
        return model, str(folder), global_cfg
    if (folder / "config.json").is_file():
        return (global_cfg.model.name_or_path if global_cfg else str(folder)), None, global_cfg
    raise FileNotFoundError(f"{folder}: neither adapter_config.json nor config.json: not a global output folder")


def global_defaults(base: str | None) -> dict:
    """The global run's model settings (pixels, dtype, attention), which personalization keeps."""
    _, _, global_cfg = describe_global(base)
    return {"model": C.to_dict(global_cfg)["model"]} if global_cfg else {}


def output_folder(cfg: C.RunConfig) -> Path:
    return Path(cfg.train.output_dir) / f"personal_agent_{cfg.train.method}"


def personalize(cfg: C.RunConfig) -> Path:
    """`pigg personalize`: every selected user and fold; returns the output folder."""
    from pigg.logs import log_path, tee_output

    C.validate(cfg)
    if cfg.train.vision:
        raise C.ConfigError("personalize trains the language model of each fold (LoRA or full); train.vision is "
                            "for global fine-tuning (pigg train)")
    with tee_output(log_path(cfg.train.log_dir, f"personalize_{cfg.train.method}")) as log_file:
        print(f"pigg personalize: log file {log_file}")
        return _personalize(cfg)


def _personalize(cfg: C.RunConfig) -> Path:
    from pigg.data.samples import load_samples
    from pigg.data.processor import load_processor
    from pigg.train import check_lengths, print_config

    ps = cfg.personalize
    base_model, global_adapter, _ = describe_global(ps.base)
    out = output_folder(cfg)
    check_same_run(out, cfg)
    print_config(cfg)
    print(f"personalize: start from {ps.base} (base {base_model}" +
          (", global adapter merged into it" if global_adapter else "") + f") -> {out}")
    samples, sizes = load_samples(cfg.data, scored=True)  # held-out answers are scored
    processor = load_processor(ps.base, cfg.model.min_pixels, cfg.model.max_pixels)
    tokens = max(check_lengths(processor, samples, sizes, cfg.data.max_length))
    by_user = {}
    for s in sorted(samples, key=lambda s: (s.user, s.index)):
        by_user.setdefault(s.user, []).append(s)
    splits = {u: folds_of(len(ss), ps.folds, ps.split, ps.split_seed, u) for u, ss in by_user.items()}
    out.mkdir(parents=True, exist_ok=True)
    C.save_yaml(cfg, out / "pigg_config.yaml")
    write_splits(out / "splits.json", by_user, splits, ps)
    jobs = [(u, k) for u in by_user for k in splits[u] if ps.fold is None or k == ps.fold]
    priors = [global_prior(cfg, [ps.base]), user_prior(by_user, splits)]
    held_out = [by_user[u][i] for u, k in jobs for i in splits[u][k][1]]
    print(f"personalize: {len(by_user)} user(s), {len(jobs)} fold(s), {len(held_out)} held-out samples")

    evaluate_into(load_base(cfg, base_model), processor, held_out, sizes, out / "vanilla", cfg, "vanilla",
                  weights=base_model)
    model = load_global(cfg, base_model, global_adapter)
    evaluate_into(model, processor, held_out, sizes, out / "global", cfg, "global",
                  weights=base_model if global_adapter else ps.base, adapter=global_adapter)
    start = llm_copy(model) if cfg.train.method == "full" else None
    for user, k in jobs:
        train_part = [by_user[user][i] for i in splits[user][k][0]]
        test_part = [by_user[user][i] for i in splits[user][k][1]]
        model = run_fold(model, start, processor, train_part, test_part, sizes, tokens, cfg,
                         out / f"user_{user}" / f"fold_{k}")
    write_summaries(out, by_user, splits, priors)
    for m in MODELS:
        attach_priors(out / m, priors)
    from pigg.grounding.report import write_report

    report = write_report([out / m for m in MODELS], out / "report.html", labels=list(MODELS))
    print(f"personalize: report {report}")
    return out


def check_same_run(out: Path, cfg: C.RunConfig) -> None:
    """A rerun into an existing folder continues it, so it must train and split the same way."""
    if not (out / "pigg_config.yaml").is_file():
        return
    old, new = C.to_dict(C.load_yaml(out / "pigg_config.yaml")), C.to_dict(cfg)
    changed = [f"{section}.{name}: {old[section][name]!r} -> {new[section][name]!r}"
               for section, names in SAME_RUN_FIELDS.items() for name in (names or new[section])
               if old[section][name] != new[section][name]]
    if changed:
        raise C.ConfigError(f"{out} holds a personalization run with other settings; continue it with the same "
                            "settings or choose another --output-dir:\n  " + "\n  ".join(changed))
    print(f"personalize: continuing the run in {out} (finished folds are kept)")


def write_splits(path: Path, by_user: dict, splits: dict, ps) -> None:
    """Each user's folds as sample indices (the `index` field of predictions), kept across reruns."""
    record = json.loads(path.read_text()) if path.is_file() else {"split": ps.split, "folds": ps.folds,
                                                                   "seed": ps.split_seed, "users": {}}
    for user, folds in splits.items():
        indices = {str(k): {"train": [by_user[user][i].index for i in tr], "test": [by_user[user][i].index for i in te]}
                   for k, (tr, te) in folds.items()}
        if record["users"].setdefault(str(user), indices) != indices:
            raise ValueError(f"{path}: user {user}'s samples changed since this run split them (different "
                             f"count or order in the user file); choose another --output-dir")
    path.write_text(json.dumps(record, indent=1) + "\n")


def load_base(cfg: C.RunConfig, name_or_path: str, adapter: str | None = None):
    """A model with the run's settings from `name_or_path`, an adapter merged into it if given."""
    from pigg.model.loading import load_for_inference
    from pigg.model.loading import device

    return load_for_inference(dataclasses.replace(cfg.model, name_or_path=name_or_path), adapter, device())


def load_global(cfg: C.RunConfig, base_model: str, global_adapter: str | None):
    """The global model: base + global adapter merged, or the full global weights."""
    if global_adapter:
        return load_base(cfg, base_model, global_adapter)
    return load_base(cfg, cfg.personalize.base)


def llm_copy(model) -> dict:
    """The language model's weights in CPU memory: what full personalization restores before each fold."""
    from pigg.model.loading import part_of

    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if part_of(k) == "llm"}


def evaluate_into(model, processor, samples, sizes, out_dir: Path, cfg, label: str, weights: str | None = None,
                  adapter: str | None = None) -> dict:
    """`weights` and `adapter`: what answered, named in metrics.json as `pigg eval` names them."""
    from pigg.evaluate import evaluate

    e = cfg.eval
    model.config.use_cache = True
    metrics = evaluate(model, processor, samples, sizes, out_dir, e.batch_size, e.max_new_tokens, e.workers,
                       meta=dict(label=label, **({"model": weights} if weights else {}),
                                 **({"adapter": adapter} if adapter else {}), base=cfg.personalize.base,
                                 users=cfg.data.users),
                       fast=e.fast_generation, liger=cfg.fast.liger_kernel)
    model.config.use_cache = False
    return metrics


def run_fold(model, start, processor, train_part, test_part, sizes, tokens, cfg, fold_dir: Path):
    """Train one user's fold from the global weights, save it, evaluate it; return the global model."""
    from transformers import set_seed

    from pigg.model.loading import apply_lora, freeze_vision, train_full_llm
    from pigg.data.processor import save_processor
    from pigg.provenance import write_provenance
    from pigg.train import fit
    from pigg.trainer import checkpoint_to_resume

    if (fold_dir / "fold.json").is_file():
        print(f"personalize: {fold_dir} finished earlier; skipped")
        return model
    print(f"\npersonalize: {fold_dir.parent.name} {fold_dir.name}: train on {len(train_part)}, test on {len(test_part)}")
    resume_from = checkpoint_to_resume(fold_dir, resume=True)
    clock = time.time()
    set_seed(cfg.train.seed)
    if cfg.train.method == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        trained = apply_lora(model, cfg.lora)
    else:
        model.load_state_dict(start, strict=False)
        freeze_vision(model)
        train_full_llm(model)
        trained = model
    trainer, plan = fit(trained, processor, train_part, tokens, cfg, fold_dir, resume_from)
    trainer.save_model(str(fold_dir))
    save_processor(processor, fold_dir)
    train_seconds = time.time() - clock
    steps = trainer.state.global_step
    del trainer
    _release_training_state(trained)
    metrics = evaluate_into(trained, processor, test_part, sizes, fold_dir / "eval", cfg, "personalized")
    write_provenance(fold_dir / "provenance.json", base=cfg.personalize.base, method=cfg.train.method,
                     user=test_part[0].user, train_samples=len(train_part), test_samples=len(test_part),
                     optimizer_steps=steps)
    fold = dict(user=test_part[0].user, fold=int(fold_dir.name.split("_")[1]), train=[s.index for s in train_part],
                test=[s.index for s in test_part], optimizer_steps=steps, micro_batch=plan.micro_batch,
                train_seconds=round(train_seconds, 1), total_seconds=round(time.time() - clock, 1),
                click_acc_140=metrics["micro"]["click_acc_140"])
    (fold_dir / "fold.json").write_text(json.dumps(fold, indent=1) + "\n")  # marks the fold finished
    shutil.rmtree(fold_dir / "checkpoints", ignore_errors=True)  # only a fold cut short needs them
    print(f"personalize: {fold_dir.parent.name} {fold_dir.name}: Click Acc@140 "
          f"{100 * metrics['micro']['click_acc_140']:.1f}%, trained in {train_seconds:.0f}s")
    return trained.unload() if cfg.train.method == "lora" else trained


def _release_training_state(model) -> None:
    for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        if hasattr(model, name):
            getattr(model, name)()
            break
    if hasattr(model, "disable_input_require_grads"):
        try:
            model.disable_input_require_grads()
        except AttributeError:  # no hook was registered
            pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_summaries(out: Path, by_user: dict, splits: dict, priors: list) -> dict:
    """Per user and fold: the three models and the baselines on the fold's held-out samples; pooled over
    folds; all users."""
    runs = {m: _records(out, m) for m in MODELS}
    ready = [p for p in priors if p.point_for is not None]  # an unavailable one is only described
    # The baselines answer exactly the samples of the finished folds (the personalized records).
    runs.update({p.name: baseline_records(runs["personalized"], p) for p in ready})
    names = [*MODELS, *(p.name for p in ready)]
    pooled = {m: {} for m in names}
    for user in by_user:
        folds = {}
        for k in splits[user]:
            if not (out / f"user_{user}" / f"fold_{k}" / "fold.json").is_file():
                continue
            test = {by_user[user][i].index for i in splits[user][k][1]}
            folds[str(k)] = {}
            for m in names:
                records = [r for r in runs[m].get(user, []) if r["index"] in test]
                folds[str(k)][m] = M.summarize(records)
                pooled[m].setdefault(user, []).extend(records)
            for p in ready:  # the point each baseline answered on this fold
                first = by_user[user][splits[user][k][1][0]].index
                folds[str(k)][p.name] = {"point": list(p.point_for(user, first)), **folds[str(k)][p.name]}
        if folds:
            summary = {"folds": folds, "pooled": {m: M.summarize(pooled[m][user]) for m in names}}
            (out / f"user_{user}" / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    from pigg.evaluate import write_json_atomic

    overall = {m: M.aggregate(pooled[m]) for m in MODELS}
    for p in priors:
        overall[p.name] = {"label": p.label, "baseline": p.info, **(M.aggregate(pooled[p.name]) if p.point_for else {})}
    write_json_atomic(out / "summary.json", overall)
    _write_personalized_run(out, pooled["personalized"])
    print(format_summary(overall))
    return overall


def _records(out: Path, model: str) -> dict[int, list[dict]]:
    from pigg.evaluate import read_done

    if model != "personalized":
        return read_done(out / model / "predictions") if (out / model / "predictions").is_dir() else {}
    records = {}
    for pred_dir in sorted(out.glob("user_*/fold_*/eval/predictions")):
        if (pred_dir.parents[1] / "fold.json").is_file():
            for user, found in read_done(pred_dir).items():
                records.setdefault(user, []).extend(found)
    return records


def _write_personalized_run(out: Path, per_user: dict) -> None:
    """One evaluation folder, as `pigg eval` writes it, holding every finished fold's held-out predictions."""
    from pigg.evaluate import write_json_atomic

    folder = out / "personalized"
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "predictions").mkdir(parents=True)
    for user, records in per_user.items():
        (folder / "predictions" / f"user_{user}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_json_atomic(folder / "metrics.json", {"label": "personalized", "model": "each fold's own: user_*/fold_*/",
                                                "adapter": "—", **M.aggregate(per_user)})


def format_summary(overall: dict) -> str:
    users = sorted(overall["personalized"]["users"], key=int)
    names = [*MODELS, *(b for b in BASELINES if "micro" in overall.get(b, {}))]
    heads = [overall[m]["label"] + " *" if m in BASELINES else m for m in names]
    lines = [f"{'user':>6} {'n':>6} " + " ".join(f"{h:>15}" for h in heads) + "   (Click Acc@140 on held-out folds)"]
    for user in users:
        row = [overall[m]["users"].get(user, {}).get("click_acc_140") for m in names]
        lines.append(f"{user:>6} {overall['personalized']['users'][user]['n']:>6} " +
                     " ".join(f"{'-' if v is None else f'{100 * v:.1f}%':>15}" for v in row))
    for scope in ("micro", "macro"):
        row = [overall[m][scope].get("click_acc_140") for m in names]
        lines.append(f"{scope:>6} {'':>6} " + " ".join(f"{'-' if v is None else f'{100 * v:.1f}%':>15}" for v in row))
    for b in BASELINES:
        if b in overall:
            lines.append(f"* baseline {overall[b]['label']}: {describe(overall[b]['baseline'])}")
    return "\n".join(lines)
