"""`pigg demo`: the whole pipeline offline, on CPU: global fine-tuning, then personalization.

Synthesises phone-GUI users (about half with personal habits: private words for icons, favourite
apps, a favourite screen region), builds a tiny random Qwen3-VL with the real Qwen tokenizer,
fine-tunes it globally on users 5-16, then personalizes it for each held-out user 1-4 with K=3 folds.
The zero-shot, global and personalized models answer the same held-out samples through the same
`evaluate()`, and one report compares them per user.

The presets are NOT the seed's recipe: the seed's lr 1e-6 on an 8B model would teach a random
2-layer model nothing in a few minutes, so the demo trains the whole tiny language model at high
learning rates. A model this small learns the answer format, layout priors and words, not real
visual grounding: personalization shows most in the referring answer (which element a user's own
words mean), and only a little in Click Acc.
"""
import json
import time
from pathlib import Path

from pigg import config as C

DEMO_TRAIN_USERS = "5-16"
DEMO_TEST_USERS = "1-4"
SAMPLES = {**dict.fromkeys(range(1, 5), 100), **dict.fromkeys(range(5, 17), 40)}  # test users: 3 folds of ~30


def demo_config(out: Path) -> C.RunConfig:
    cfg = C.RunConfig()
    cfg.model.name_or_path = str(out / "tiny-qwen3-vl")
    cfg.model.max_pixels = 180 * 400  # ~64 image tokens a screenshot keeps CPU steps short
    cfg.data.data_root, cfg.data.users, cfg.data.validation_workers = str(out / "data"), DEMO_TRAIN_USERS, 2
    t = cfg.train
    t.method, t.learning_rate, t.warmup_steps, t.lr_scheduler = "full", 3e-3, 5, "cosine"
    t.batch_size, t.grad_accum, t.epochs = 4, 2, 4.0
    t.gradient_checkpointing, t.dataloader_workers = False, 1
    t.save_steps, t.logging_steps = 50, 5
    t.output_dir, t.log_dir = str(out / "runs"), str(out / "logs")
    return cfg


def prepare(out: Path) -> None:
    from pigg.offline.synth import synthesize
    from pigg.offline.tiny import make_tiny_checkpoint

    if not (out / "data" / "users.json").is_file():
        t = time.time()
        synthesize(out / "data", 16, samples_per_user=SAMPLES, seed=0, width=360, height=800)
        print(f"demo: synthesised 16 users in {out / 'data'} ({time.time() - t:.1f}s)")
    if not (out / "tiny-qwen3-vl" / "config.json").is_file():
        make_tiny_checkpoint(out / "tiny-qwen3-vl")
        print(f"demo: tiny Qwen3-VL with the real tokenizer in {out / 'tiny-qwen3-vl'}")


def loss_curve(folder: Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of the training loss (or another value the Trainer logged, e.g. grad_norm) as the
    run's newest checkpoint recorded them."""
    checkpoints = sorted((folder / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return [(h["step"], h[key]) for h in state["log_history"] if key in h]


def personal_config(out: Path, base: Path) -> C.RunConfig:
    cfg = demo_config(out)
    cfg.data.users, cfg.personalize.base = DEMO_TEST_USERS, str(base)
    t = cfg.train
    t.learning_rate, t.warmup_steps, t.lr_scheduler, t.epochs = 1e-3, 0, "constant", 3.0
    t.effective_batch, t.batch_size, t.grad_accum = 4, 4, None
    e = cfg.eval
    e.batch_size, e.max_new_tokens, e.workers = 16, 48, 1
    return cfg


def run_demo(out="pigg_demo") -> Path:
    from pigg.personalize import personalize
    from pigg.train import train

    out = Path(out)
    start = time.time()
    prepare(out)
    cfg = demo_config(out)
    if (C.output_folder(cfg) / "checkpoints").is_dir():
        cfg.train.resume = True  # a second `pigg demo` continues or reuses the first one's run
    folder = train(cfg)
    curve = loss_curve(folder)
    print("\ndemo: training loss by optimizer step")
    for step, loss in curve:
        print(f"  step {step:>4}  loss {loss:7.3f}  " + "#" * int(loss * 4))
    personal = personalize(personal_config(out, folder))
    print_comparison(out, personal)
    print(f"\ndemo finished in {time.time() - start:.0f}s")
    print(f"  synthetic users:   {out / 'data'} (train {DEMO_TRAIN_USERS}, held out {DEMO_TEST_USERS}; "
          "habits in users.json)")
    print(f"  base model:        {cfg.model.name_or_path}")
    print(f"  global model:      {folder}")
    print(f"  personalized:      {personal} (one model per user and fold)")
    print(f"  TensorBoard:       tensorboard --logdir {folder / 'tensorboard'}")
    print(f"  report:            {personal / 'report.html'}")
    print(f"  log files:         {cfg.train.log_dir}")
    return folder


def print_comparison(out: Path, personal: Path) -> None:
    from pigg.personalize import MODELS

    habits = {u: "yes" if v["habits"] else "no" for u, v in json.loads((out / "data" / "users.json").read_text()).items()}
    summary = json.loads((personal / "summary.json").read_text())

    def row(model, user):
        return summary[model]["micro"] if user == "micro" else summary[model]["users"][user]

    def scores(user, key):
        return " / ".join(f"{100 * row(m, user)[key]:5.1f}%" for m in MODELS)

    print(f"\ndemo: held-out folds of users {DEMO_TEST_USERS}, zero-shot / global / personalized")
    print(f"{'user':>6} {'habits':>6} {'n':>5}   {'Click Acc@140':^27}   {'referring exact match':^27}")
    for user in sorted(summary["personalized"]["users"], key=int) + ["micro"]:
        n = row("personalized", user)["n"]
        print(f"{user:>6} {habits.get(user, ''):>6} {n:>5}   {scores(user, 'click_acc_140')}   "
              f"{scores(user, 'referring_exact')}")
