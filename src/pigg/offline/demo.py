"""`pigg demo`: the whole pipeline offline, on CPU: global fine-tuning, then personalization.

Synthesises users whose screens hold two or three large coloured blocks on a 3x3 grid and whose
commands name a block by its colour (`pigg.offline.blocks`); half of them also have private words
for colours. Builds a tiny random Qwen3-VL with the real Qwen tokenizer, fine-tunes it globally on
users 5-16, then personalizes it for each held-out user 1-4 with K=3 folds. The zero-shot, global and
personalized models answer the same held-out samples through the same `evaluate()`, beside two prior
baselines that never look at the screen: the global prior (one point fitted on the training users)
and the user prior (one point per user and fold, fitted on that fold's training part). A model that
does no better than a prior learned where targets usually are, not how to find them.

Why blocks and not the phone screens of `pigg.offline.synth`: those name most elements by the text
drawn on them, which a tiny model behind a random vision tower cannot read. A colour survives the
random patch embedding; the tower's random position embeddings are raised to the pixels' size
(`make_tiny_checkpoint(position_scale=...)`) so that its output also tells the cells apart.

The model and presets are NOT the seed's recipe. The model is `demo_qwen3_vl_config()`: 4 layers of
128 and a rotary base that tells the image rows and columns apart (with the 2-layer test model and
Qwen's base the global model never left the prior). Global fine-tuning trains everything, the random
vision tower included (`train.vision`), at lr 3e-4; personalization trains the language model. Found
with `dev/probe_demo.py` over some 30 settings on a GPU and the CPU: finding the only block on a screen
takes about 300 steps, telling the named block from the others most of the rest.
`quick=True` is a reduced preset for tests: it checks the pipeline, not learning.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

from pigg import config as C

DEMO_TRAIN_USERS = "5-16"
DEMO_TEST_USERS = "1-4"
HABIT_USERS = {1, 3, 5, 7, 9, 11, 13, 15}  # half of the training users and half of the held-out ones
SCREEN = 192  # pixels a side: 6x6 image tokens, each grid cell 2x2 of them
POSITION_SCALE = 40.0
LEARNING_RATE = 3e-4  # of global fine-tuning; 5e-4 and 1e-3 learned slower, 3e-3 never left the prior


@dataclass(frozen=True)
class Preset:
    test_samples: int  # per held-out user: K=3 folds of a third each
    train_samples: int  # per training user
    epochs: float  # global fine-tuning
    personal_epochs: float
    rl_steps: int  # GRPO steps of `--rl`


FULL = Preset(test_samples=60, train_samples=200, epochs=3.0, personal_epochs=4.0, rl_steps=20)
QUICK = Preset(test_samples=6, train_samples=4, epochs=1.0, personal_epochs=1.0, rl_steps=2)


def demo_config(out: Path, preset: Preset = FULL) -> C.RunConfig:
    cfg = C.RunConfig()
    cfg.model.name_or_path = str(out / "tiny-qwen3-vl")
    cfg.model.min_pixels = cfg.model.max_pixels = SCREEN * SCREEN  # never resized: the cells stay on tokens
    cfg.data.data_root, cfg.data.users, cfg.data.validation_workers = str(out / "data"), DEMO_TRAIN_USERS, 1
    t = cfg.train
    t.method, t.vision, t.learning_rate, t.warmup_steps, t.lr_scheduler = (
        "full", True, LEARNING_RATE, 10, "constant_with_warmup")
    t.batch_size, t.grad_accum, t.epochs = 8, 1, preset.epochs
    t.gradient_checkpointing, t.dataloader_workers = False, 1
    t.save_steps, t.logging_steps = 1000, 10
    t.output_dir, t.log_dir = str(out / "runs"), str(out / "logs")
    return cfg


def prepare(out: Path, preset: Preset = FULL) -> None:
    from pigg.model.architectures import demo_qwen3_vl_config
    from pigg.offline.blocks import synthesize_blocks
    from pigg.offline.tiny import make_tiny_checkpoint

    if not (out / "data" / "users.json").is_file():
        t = time.time()
        counts = {u: preset.test_samples if u <= 4 else preset.train_samples for u in range(1, 17)}
        synthesize_blocks(out / "data", counts, HABIT_USERS, seed=0, size=SCREEN)
        print(f"demo: synthesised 16 users in {out / 'data'} ({time.time() - t:.1f}s)")
    if not (out / "tiny-qwen3-vl" / "config.json").is_file():
        make_tiny_checkpoint(out / "tiny-qwen3-vl", position_scale=POSITION_SCALE, config=demo_qwen3_vl_config())
        print(f"demo: tiny Qwen3-VL with the real tokenizer in {out / 'tiny-qwen3-vl'}")


def loss_curve(folder: Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of the training loss (or another value the Trainer logged, e.g. grad_norm) as the
    run's newest checkpoint recorded them."""
    checkpoints = sorted((folder / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return [(h["step"], h[key]) for h in state["log_history"] if key in h]


def personal_config(out: Path, base: Path, preset: Preset = FULL) -> C.RunConfig:
    cfg = demo_config(out, preset)
    cfg.data.users, cfg.personalize.base = DEMO_TEST_USERS, str(base)
    t = cfg.train
    t.vision = False  # a user's words are the language model's to learn
    t.learning_rate, t.warmup_steps, t.lr_scheduler, t.epochs = LEARNING_RATE, 0, "constant", preset.personal_epochs
    t.effective_batch, t.batch_size, t.grad_accum = 4, 4, None
    e = cfg.eval
    e.batch_size, e.max_new_tokens, e.workers = 32, 40, 1
    return cfg


def run_demo(out="pigg_demo", quick: bool = False, rl: bool = False) -> Path:
    from pigg.personalize import personalize
    from pigg.train import train

    out, preset = Path(out), QUICK if quick else FULL
    start, cpu_start = time.time(), cpu_seconds()
    prepare(out, preset)
    cfg = demo_config(out, preset)
    if (C.output_folder(cfg) / "checkpoints").is_dir():
        cfg.train.resume = True  # a second `pigg demo` continues or reuses the first one's run
    folder = train(cfg)
    print_loss_curve(folder)
    personal = personalize(personal_config(out, folder, preset))
    print_comparison(out, personal)
    if rl:  # GRPO from the global model (pigg.rl), compared with it on the held-out users
        from pigg.rl import demo_rl

        demo_rl(cfg, folder, DEMO_TEST_USERS, preset.rl_steps)
    print(f"\ndemo finished in {time.time() - start:.0f}s ({cpu_seconds() - cpu_start:.0f} CPU seconds, "
          "its worker processes included)")
    print(f"  synthetic users:   {out / 'data'} (train {DEMO_TRAIN_USERS}, held out {DEMO_TEST_USERS}; "
          "habits in users.json)")
    print(f"  base model:        {cfg.model.name_or_path}")
    print(f"  global model:      {folder}")
    print(f"  personalized:      {personal} (one model per user and fold)")
    print(f"  TensorBoard:       tensorboard --logdir {folder / 'tensorboard'}")
    print(f"  report:            {personal / 'report.html'}")
    print(f"  log files:         {cfg.train.log_dir}")
    return folder


def cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def print_loss_curve(folder: Path) -> None:
    print("\ndemo: training loss by optimizer step")
    for step, loss in loss_curve(folder):
        print(f"  step {step:>4}  loss {loss:7.3f}  " + "#" * min(60, int(loss * 40)))


COLUMNS = (("vanilla", "zero-shot"), ("global", "global"), ("personalized", "personal"),
           ("global_prior", "glob.prior"), ("user_prior", "user prior"))


def comparison_rows(users_json: dict, summary: dict) -> list[tuple[str, str, int, dict]]:
    """(user or group, habits, n, {column: Click Acc@140}) for each held-out user, then the users with
    habits, those without and all of them pooled (each sample counts once)."""
    columns = [key for key, _ in COLUMNS if summary.get(key, {}).get("users")]
    users = sorted(summary["personalized"]["users"], key=int)
    rows = []
    for user in users:
        n = summary["personalized"]["users"][user]["n"]
        acc = {c: summary[c]["users"][user]["click_acc_140"] for c in columns if user in summary[c]["users"]}
        rows.append((user, "yes" if users_json[user]["habits"] else "no", n, acc))
    for label, habits in (("habits", "yes"), ("none", "no"), ("all", None)):
        group = [r for r in rows[:len(users)] if habits is None or r[1] == habits]
        n = sum(r[2] for r in group)
        if n:
            acc = {c: sum(r[3][c] * r[2] for r in group) / n for c in columns if all(c in r[3] for r in group)}
            rows.append((label, habits or "", n, acc))
    return rows


def print_comparison(out: Path, personal: Path) -> None:
    users_json = json.loads((out / "data" / "users.json").read_text())
    summary = json.loads((personal / "summary.json").read_text())
    rows = comparison_rows(users_json, summary)
    print(f"\ndemo: Click Acc@140 on the held-out folds of users {DEMO_TEST_USERS} (priors never look at the screen)")
    print(f"{'user':>6} {'habits':>6} {'n':>4}  " + " ".join(f"{title:>10}" for _, title in COLUMNS))
    for user, habits, n, acc in rows:
        cells = [f"{100 * acc[key]:9.1f}%" if key in acc else f"{'-':>10}" for key, _ in COLUMNS]
        print(f"{user:>6} {habits:>6} {n:>4}  " + " ".join(cells))
    pooled = {r[0]: r[3] for r in rows}
    if "global_prior" in pooled["all"] and "user_prior" in pooled["all"]:
        best_prior = max(pooled["all"]["global_prior"], pooled["all"]["user_prior"])
        print(f"global model: {100 * pooled['all']['global']:.1f}%, "
              f"{100 * (pooled['all']['global'] - best_prior):+.1f} points against the better prior")
    for group in ("habits", "none"):
        if group in pooled and "user_prior" in pooled[group]:
            acc = pooled[group]
            print(f"users {'with' if group == 'habits' else 'without'} habits: personalized "
                  f"{100 * (acc['personalized'] - acc['global']):+.1f} points against global, "
                  f"{100 * (acc['personalized'] - acc['user_prior']):+.1f} against the user prior")
