"""`pigg demo`: the whole global fine-tuning pipeline offline, on CPU, in a few minutes.

Synthesises phone-GUI users, builds a tiny random Qwen3-VL with the real Qwen tokenizer, and
fine-tunes it globally with a demo preset. The preset is NOT the seed's recipe: the seed's
lr 1e-6 on an 8B model would teach a random 2-layer model nothing in a few minutes, so the demo
trains the whole tiny language model at a high learning rate to show the loss falling. It ends
with the zero-shot and fine-tuned models evaluated through the same `evaluate()` on held-out
users, and an HTML report comparing them.
"""
import json
import time
from pathlib import Path

from pigg import config as C

DEMO_TRAIN_USERS = "5-16"
DEMO_TEST_USERS = "1-4"


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
    from pigg.synth import synthesize
    from pigg.tiny import make_tiny_checkpoint

    if not (out / "data" / "users.json").is_file():
        t = time.time()
        synthesize(out / "data", 16, samples_per_user=40, seed=0, width=360, height=800)
        print(f"demo: synthesised 16 users in {out / 'data'} ({time.time() - t:.1f}s)")
    if not (out / "tiny-qwen3-vl" / "config.json").is_file():
        make_tiny_checkpoint(out / "tiny-qwen3-vl")
        print(f"demo: tiny Qwen3-VL with the real tokenizer in {out / 'tiny-qwen3-vl'}")


def loss_curve(folder: Path) -> list[tuple[int, float]]:
    checkpoints = sorted((folder / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


def eval_config(out: Path, checkpoint: Path | None, label: str) -> C.RunConfig:
    cfg = demo_config(out)
    cfg.data.users = DEMO_TEST_USERS
    e = cfg.eval
    e.checkpoint, e.label, e.out = str(checkpoint) if checkpoint else None, label, str(out / "eval" / label)
    e.batch_size, e.max_new_tokens, e.workers = 16, 48, 1
    return cfg


def run_demo(out="pigg_demo") -> Path:
    from pigg.evaluate import run_eval
    from pigg.report import write_report
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
    zero_shot = run_eval(eval_config(out, None, "vanilla"))
    tuned = run_eval(eval_config(out, folder, "global"))
    report = write_report([out / "eval" / "vanilla", out / "eval" / "global"], out / "report.html")
    print(f"\ndemo: Click Acc@140 on held-out users {DEMO_TEST_USERS}: zero-shot "
          f"{100 * zero_shot['micro']['click_acc_140']:.1f}% -> globally fine-tuned {100 * tuned['micro']['click_acc_140']:.1f}% "
          f"(parse failures {100 * zero_shot['micro']['parse_failure_rate']:.0f}% -> "
          f"{100 * tuned['micro']['parse_failure_rate']:.0f}%)")
    print(f"\ndemo finished in {time.time() - start:.0f}s")
    print(f"  synthetic users:   {out / 'data'} (train {DEMO_TRAIN_USERS}, held out {DEMO_TEST_USERS})")
    print(f"  base model:        {cfg.model.name_or_path}")
    print(f"  fine-tuned model:  {folder}")
    print(f"  TensorBoard:       tensorboard --logdir {folder / 'tensorboard'}")
    print(f"  evaluations:       {out / 'eval'} (vanilla, global)")
    print(f"  report:            {report}")
    print(f"  log files:         {cfg.train.log_dir}")
    return folder
