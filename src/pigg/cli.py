"""The `pigg` command: one entry point, subcommands mapped to plain functions.

Flags for every config field are generated from the dataclasses (`--train.learning_rate`), with
short aliases for the common ones (`--lr`, `--users`, `--lora`). Precedence: seed defaults <
`--config FILE.yaml` < flags.
"""
import argparse
import dataclasses
import os
import sys

from pigg import config as C
from pigg.distributed import close_process_group

ALIASES = [  # short flag -> (section, field); the first one whose section the command has wins
    ("--model", "model", "name_or_path"),
    ("--max-pixels", "model", "max_pixels"),
    ("--data-root", "data", "data_root"),
    ("--image-root", "data", "image_root"),
    ("--users", "data", "users"),
    ("--max-length", "data", "max_length"),
    ("--output-dir", "train", "output_dir"),
    ("--lr", "train", "learning_rate"),
    ("--epochs", "train", "epochs"),
    ("--max-steps", "train", "max_steps"),
    ("--batch-size", "train", "batch_size"),
    ("--batch-size", "eval", "batch_size"),
    ("--grad-accum", "train", "grad_accum"),
    ("--effective-batch", "train", "effective_batch"),
    ("--save-steps", "train", "save_steps"),
    ("--workers", "train", "dataloader_workers"),
    ("--workers", "eval", "workers"),
    ("--seed", "train", "seed"),
    ("--adapter", "eval", "adapter"),
    ("--checkpoint", "eval", "checkpoint"),
    ("--out", "eval", "out"),
    ("--label", "eval", "label"),
    ("--max-new-tokens", "eval", "max_new_tokens"),
    ("--benchmark", "eval", "benchmark"),
    ("--benchmark-root", "eval", "benchmark_root"),
    ("--prompt", "eval", "prompt"),
    ("--base", "personalize", "base"),
    ("--folds", "personalize", "folds"),
    ("--fold", "personalize", "fold"),
    ("--split", "personalize", "split"),
]
SWITCHES = {  # flag -> (section, field, value)
    "--lora": ("train", "method", "lora"),
    "--full": ("train", "method", "full"),
    "--resume": ("train", "resume", True),
    "--trust-pickle": ("data", "trust_pickle", True),
    "--skip-missing-users": ("data", "skip_missing_users", True),
}


def _parse_value(kind, text):
    if kind in (bool, "bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    if "bool" in str(kind):  # bool | None
        return None if text.lower() in ("none", "auto") else _parse_value(bool, text)
    if kind in (int, float, str):
        return kind(text)
    if "list" in str(kind):
        return [x for x in text.split(",") if x]
    if "int" in str(kind):
        return None if text.lower() == "none" else int(text)
    if "float" in str(kind):  # float | None
        return None if text.lower() == "none" else float(text)
    return None if text.lower() == "none" else text


SECTION_TITLES = {
    "model": "model: the base model and its processor",
    "lora": "lora: the adapters (with --lora)",
    "data": "data: the users' files",
    "train": "train: the optimisation",
    "eval": "eval: generation and scoring",
    "personalize": "personalize: per-user folds",
    "rl": "rl: GRPO sampling, rewards and policy loss (pigg rl)",
    "fast": "fast: speed switches that keep the same mathematics (docs/performance.md; --fast.NAME false turns one off)",
}


def help_text(text: str | None) -> str | None:
    return text.replace("%", "%%") if text else text  # argparse formats help with %


def add_config_flags(parser, sections=("model", "lora", "data", "train")) -> None:
    """The common short flags first, then one group of `--section.field` flags per section."""
    common = parser.add_argument_group("common options")
    common.add_argument("--config", help="YAML file with any of the sections below (examples in configs/); flags "
                                         "win over it.")
    taken = set()
    for flag, section, name in ALIASES:
        if section in sections and flag not in taken:
            taken.add(flag)
            f = next(f for f in dataclasses.fields(C.SECTIONS[section]) if f.name == name)
            common.add_argument(flag, dest=f"{section}.{name}", default=None, metavar="V",
                                help=help_text(f"{f.metadata['help']} (--{section}.{name})"),
                                type=lambda text, k=f.type: _parse_value(k, text))
    for flag, (section, name, value) in SWITCHES.items():
        if section in sections:
            common.add_argument(flag, dest=f"{section}.{name}", action="store_const", const=value,
                                default=None, help=f"set {section}.{name} = {value}")
    for section in sections:
        group = parser.add_argument_group(SECTION_TITLES[section])
        for f in dataclasses.fields(C.SECTIONS[section]):
            add_field(group, section, f.name)


def add_field(group, section: str, name: str, *short: str, help: str | None = None) -> None:
    """`--section.name` (and any `short` flags) for one field of a config section, typed and documented as
    the field is (or by `help`, where the command uses the field for less); hidden fields take their flag
    without showing it."""
    f = next(f for f in dataclasses.fields(C.SECTIONS[section]) if f.name == name)
    shown = argparse.SUPPRESS if f.metadata.get("hidden") else help_text(help or f.metadata.get("help"))
    group.add_argument(*short, f"--{section}.{name}", dest=f"{section}.{name}", default=None, metavar="V",
                       type=lambda text, k=f.type: _parse_value(k, text), help=shown)


def config_from_args(args, defaults: dict | None = None) -> C.RunConfig:
    """Seed defaults, then the command's own `defaults`, then the YAML file, then flags."""
    cfg = C.from_dict(defaults or {}, C.RunConfig(), source="defaults")
    if getattr(args, "config", None):
        cfg = C.load_yaml(args.config, cfg)
    flags = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            flags.setdefault(section, {})[name] = value
    return C.from_dict(flags, cfg, source="command line")


def single_gpu_guard(env=os.environ) -> None:
    """Several visible GPUs without a launcher or --gpus would make the Trainer fall back to
    nn.DataParallel (one process driving every GPU in turn); use the first GPU and say how to use all."""
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if "," in visible and "WORLD_SIZE" not in env:
        first = visible.split(",")[0]
        print(f"WARNING: GPUs {visible} are visible but no --gpus was given, so this run uses GPU {first} only; "
              f"pass --gpus {visible} for data-parallel work on all of them.")
        env["CUDA_VISIBLE_DEVICES"] = first


def add_launch_flags(parser) -> None:
    group = parser.add_argument_group("processes (data parallelism; docs/several_gpus.md)")
    group.add_argument("--gpus", default=None, metavar="LIST",
                       help="GPUs to use, e.g. 0 or 0,1,2,3 (sets CUDA_VISIBLE_DEVICES); with several, one process "
                            "per GPU is started through torch.distributed.run")
    group.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="N processes on the CPU (gloo), for tests and machines without GPUs")
    group.add_argument("--nnodes", type=int, default=1, metavar="N",
                       help="machines taking part; run the same command on each (needs --rdzv-endpoint)")
    group.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                       help="multi-node rendezvous: the first node's address and a free port, the same on every node")
    group.add_argument("--rdzv-id", default="pigg", metavar="ID", help="multi-node job id, the same on every node")


def without_launch_flags(argv: list[str]) -> list[str]:
    """`argv` for the launched processes: the launcher has acted on the launch flags already (and
    torchrun's own parser would trip over `--nproc`, a prefix of its `--nproc-per-node`)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_launch_flags(parser)
    return parser.parse_known_args(argv)[1]


def start_processes(args) -> None:
    """Relaunch through torch.distributed.run when several processes are asked for (never returns
    then); otherwise pick the visible devices for this process. Before torch touches CUDA."""
    from pigg.distributed import Launch, launch_environment, launcher_command, relaunch, select_gpus

    launch = Launch(args.gpus, args.nproc, args.nnodes, args.rdzv_endpoint, args.rdzv_id)
    cmd = launcher_command(without_launch_flags(args.argv), launch)
    if cmd:
        relaunch(cmd, launch_environment(launch))
    select_gpus(launch)
    single_gpu_guard()


def cmd_train(args) -> None:
    start_processes(args)
    from pigg.train import train

    train(config_from_args(args))


def cmd_rl(args) -> None:
    start_processes(args)
    from pigg.rl import RL_DEFAULTS, rl

    rl(config_from_args(args, RL_DEFAULTS))


EVAL_DEFAULTS = {"data": {"users": "1-10"}}


def cmd_eval(args) -> None:
    start_processes(args)
    from pigg.evaluate import run_eval

    run_eval(config_from_args(args, EVAL_DEFAULTS))


def cmd_personalize(args) -> None:
    single_gpu_guard()
    from pigg.personalize import PERSONALIZE_DEFAULTS, global_defaults, personalize

    # precedence: seed defaults < personalization defaults < the global run's model settings < YAML < flags
    first = config_from_args(args, PERSONALIZE_DEFAULTS)
    if first.eval.benchmark:  # the eval section's flags come along; this one has no meaning here
        raise C.ConfigError("personalize scores each user's held-out fold; a public benchmark is for pigg eval "
                            "--benchmark (with the personalized fold's --adapter)")
    personalize(config_from_args(args, {**PERSONALIZE_DEFAULTS, **global_defaults(first.personalize.base)}))


def cmd_predict(args) -> None:
    single_gpu_guard()
    from pigg.predict import run_predict

    run_predict(config_from_args(args), args.image, args.command, args.input, args.json, args.draw)


def cmd_report(args) -> None:
    from pigg.grounding.report import write_report

    labels = args.labels.split(",") if args.labels else None
    print(f"report written to {write_report(args.runs, args.out, labels=labels)}")


def cmd_export(args) -> None:
    from pigg.export import export

    export(args.model, args.adapter or [], args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
           force=args.force)  # it says where it wrote


def cmd_data_validate(args) -> None:
    from pigg.data.samples import load_samples

    cfg = config_from_args(args)
    load_samples(cfg.data)
    print("data OK")


def cmd_data_stats(args) -> None:
    from pigg.data.stats import print_stats

    print_stats(config_from_args(args))


def cmd_data_synth(args) -> None:
    from pigg.offline.synth import synthesize

    paths = synthesize(args.out, args.users, samples_per_user=args.samples_per_user, seed=args.seed,
                       width=args.width, height=args.height)
    print(f"wrote {len(paths)} user files to {args.out}")


def cmd_make_tiny(args) -> None:
    from pigg.offline.tiny import make_tiny_checkpoint

    print(f"tiny Qwen3-VL written to {make_tiny_checkpoint(args.out, seed=args.seed)}")


def cmd_demo(args) -> None:
    from pigg.offline.demo import run_demo

    run_demo(args.out, quick=args.quick, rl=args.rl)


def add_liger_flag(parser) -> None:
    """`--fast.liger_kernel`, the one speed switch of the `fast` section that generation (eval, predict,
    rl's sampling) uses: Liger's kernels in the prefill."""
    add_field(parser.add_argument_group("fast: the speed switch that applies here"), "fast", "liger_kernel",
              help="Liger's fused RMSNorm, RoPE and SwiGLU kernels in generation's prefill (None: on when "
                   "liger-kernel is installed, on a GPU; pip install 'pigg[fast]').")


def add_predict_flags(parser) -> None:
    """What to predict and how to show it, then the model's flags and the few eval settings that apply."""
    what = parser.add_argument_group("what to predict")
    what.add_argument("--image", default=None, help="a screenshot")
    what.add_argument("--command", default=None, help="what the user asks for on it, e.g. 'Open the settings'")
    what.add_argument("--input", default=None, metavar="FILE.jsonl",
                      help='many at once: one {"image": PATH, "command": TEXT} a line (relative paths from the file)')
    what.add_argument("--json", action="store_true", help="print one JSON object a prediction instead of text")
    what.add_argument("--draw", default=None, metavar="OUT.png",
                      help="write the screenshot with the point and its 140-unit circle (in 0-1000 space, so an "
                           "ellipse in pixels on a non-square screenshot); with --input, a folder of PNGs")
    add_config_flags(parser, ("model",))
    group = parser.add_argument_group("eval: the model to ask and how")
    for flag, name in (("--adapter", "adapter"), ("--checkpoint", "checkpoint"), ("--prompt", "prompt"),
                       ("--batch-size", "batch_size"), ("--max-new-tokens", "max_new_tokens")):
        add_field(group, "eval", name, flag)


DESCRIPTION = """\
pigg fine-tunes Qwen3-VL-8B-Instruct into a GUI grounding agent: given a phone screenshot and a user's
command, it names the element to tap and gives its point in relative 0-1000 coordinates. It trains one
global model on many users' data, evaluates it on held-out users, personalizes it per user and exports it."""
EPILOG = """\
a run from start to end (users 11-83 train, 1-10 are held out):
  pigg data validate --data-root /data/pigg --users 1-83
  pigg train --data-root /data/pigg --users 11-83 --lora --output-dir /ckpt
  pigg eval --data-root /data/pigg --users 1-10 --checkpoint /ckpt/global_agent_lora --out runs/global
  pigg personalize --base /ckpt/global_agent_lora --data-root /data/pigg --users 1-10 --lora --output-dir /ckpt
  pigg export --adapter /ckpt/global_agent_lora --out /models/pigg-8b

Offline first: `pigg demo` trains, evaluates and personalizes a tiny model on synthetic users on the CPU
(about 10 minutes).
`pigg COMMAND --help` lists a command's options; README.md and docs/ in the repository explain them."""


# Each main command's --help opens with what it does and writes, and ends with examples.
ABOUT = {
    "train": ("Global fine-tuning (LoRA or full) on the pooled samples of many users. Writes\n"
              "OUTPUT_DIR/global_agent_lora/ (or global_agent_full/): the adapter (or the model), the processor,\n"
              "pigg_config.yaml, provenance.json, checkpoints/ and TensorBoard events. More: docs/training.md.",
              ["pigg train --data-root /data/pigg --users 11-83 --lora --output-dir /ckpt",
               "pigg train --config configs/global_full_8b.yaml --data-root /data/pigg --gpus 0,1",
               "pigg train --data-root /data/pigg --users 11-83 --lora --output-dir /ckpt --resume"]),
    "rl": ("Reinforcement fine-tuning (GRPO) from the base, a global output or a personalized fold: for each\n"
           "prompt G answers are sampled and rewarded for a point within 140 units of the truth and for the\n"
           "answer's format. Writes OUTPUT_DIR/rl_agent_lora/. Needs TRL: pip install 'pigg[rl]'.\n"
           "More: docs/training.md.",
           ["pigg rl --data-root /data/pigg --users 11-83 --rl.start /ckpt/global_agent_lora --output-dir /ckpt"]),
    "eval": ("Greedy answers on held-out users' samples (or a public benchmark), scored for Click Acc@140, L2\n"
             "distance, parse failures and the referring name, beside a prior baseline. Writes OUT/predictions/\n"
             "and OUT/metrics.json; rerun the same command to continue. More: docs/evaluation.md.",
             ["pigg eval --data-root /data/pigg --users 1-10 --out runs/vanilla",
              "pigg eval --data-root /data/pigg --users 1-10 --checkpoint /ckpt/global_agent_lora --out runs/global",
              "pigg eval --benchmark screenspot-v2 --benchmark-root /data/screenspot-v2 "
              "--checkpoint /ckpt/global_agent_lora"]),
    "personalize": ("For each held-out user, K folds: each starts from the global model, trains on the other folds\n"
                    "and is scored on its own, beside the zero-shot and global models and the priors. Writes\n"
                    "OUTPUT_DIR/personal_agent_lora/ (a model per user and fold, summaries, report.html).\n"
                    "More: docs/personalization.md.",
                    ["pigg personalize --base /ckpt/global_agent_lora --data-root /data/pigg --users 1-10 --lora "
                     "--output-dir /ckpt"]),
    "predict": ("Where a model would tap: the element's name and its point (0-1000 and pixels), for one screenshot\n"
                "and command or a JSONL file of them; --draw marks the point on the screenshot.",
                ["pigg predict --checkpoint /ckpt/global_agent_lora --image screen.png --command \"open the settings\" "
                 "--draw screen_point.png"]),
    "report": ("One self-contained HTML page comparing evaluation runs: tables, charts and each run's worst misses.",
               ["pigg report runs/vanilla runs/global --out report.html"]),
    "export": ("Merge LoRA adapters into the base model and write one Hugging Face model folder that stock\n"
               "transformers or an inference server loads. More: docs/export.md.",
               ["pigg export --adapter /ckpt/global_agent_lora --out /models/pigg-8b"]),
}


def command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help opens with ABOUT's description and ends with its examples."""
    description, examples = ABOUT.get(name, (None, []))
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) if examples else None
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pigg", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = command(sub, "train", "global fine-tuning (LoRA or full) on pooled users",
                       usage="pigg train --data-root DIR [--users 11-83] [--lora | --full] [--config FILE.yaml] "
                             "[options]")
    add_config_flags(p, ("model", "lora", "data", "train", "fast"))
    add_launch_flags(p)
    p.set_defaults(func=cmd_train)

    p = command(sub, "rl", "reinforcement fine-tuning (GRPO) with a click reward, from the base, a global "
                                  "output or a personalized fold",
                       usage="pigg rl --data-root DIR [--users 11-83] [--rl.start GLOBAL_OR_FOLD] [--config FILE.yaml] "
                             "[options]")
    add_config_flags(p, ("model", "lora", "data", "train", "rl"))
    add_liger_flag(p)
    add_launch_flags(p)
    p.set_defaults(func=cmd_rl)

    p = command(sub, "eval", "evaluate a model (zero-shot, or with --adapter / --checkpoint) on held-out users "
                                    "or a public benchmark (--benchmark)",
                       usage="pigg eval --data-root DIR [--users 1-10] [--adapter DIR | --checkpoint DIR] [--out DIR] "
                             "[options]\n       pigg eval --benchmark screenspot-v2|screenspot-pro|screenspot "
                             "--benchmark-root DIR [--prompt pigg|qwen] [model flags] [--out DIR]")
    add_config_flags(p, ("model", "data", "eval"))
    add_liger_flag(p)
    add_launch_flags(p)
    p.set_defaults(func=cmd_eval)

    p = command(sub, "personalize", "per-user K-fold fine-tuning from a global output, evaluated against "
                                           "the zero-shot and global models",
                       usage="pigg personalize --base GLOBAL_OUTPUT --data-root DIR [--users 1-10] [--folds 3] "
                             "[options]")
    add_config_flags(p, ("model", "lora", "data", "train", "eval", "personalize", "fast"))
    p.set_defaults(func=cmd_personalize)

    p = command(sub, "predict", "ask a model where to click on screenshots: one (--image, --command) or many "
                                       "(--input FILE.jsonl)",
                       usage="pigg predict (--image PATH --command TEXT | --input FILE.jsonl) [--adapter DIR | "
                             "--checkpoint DIR] [--json] [--draw OUT.png] [options]")
    add_predict_flags(p)
    add_liger_flag(p)
    p.set_defaults(func=cmd_predict)

    p = command(sub, "report", "one self-contained HTML page comparing evaluation runs")
    p.add_argument("runs", nargs="+", help="evaluation folders (each with metrics.json and predictions/)")
    p.add_argument("--out", default=None, help="HTML file to write (default: report.html in the first run)")
    p.add_argument("--labels", default=None, help="comma-separated names for the runs (default: each run's label)")
    p.set_defaults(func=cmd_report)

    p = command(sub, "export", "merge LoRA adapters into the base and write a complete model folder")
    p.add_argument("--model", default=None, help="base hub id or folder (default: the first adapter's base)")
    p.add_argument("--adapter", action="append", help="LoRA adapter folder; repeat to stack, merged in order")
    p.add_argument("--out", required=True, help="folder to write (built beside it, renamed into place)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)

    data = sub.add_parser("data", help="validate, summarise or synthesise user data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("validate", help="check every selected sample, as training would, without a model")
    add_config_flags(p, ("data",))
    p.set_defaults(func=cmd_data_validate)
    p = dsub.add_parser("stats", help="per-user summary: samples, image sizes, image and text tokens")
    add_config_flags(p, ("model", "data"))
    p.set_defaults(func=cmd_data_stats)
    p = dsub.add_parser("synth", help="write synthetic users (PIGG-format pickles and PNG screenshots)")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=20, help="number of users (ids 1..N)")
    p.add_argument("--samples-per-user", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=360)
    p.add_argument("--height", type=int, default=800)
    p.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("make-tiny", help="write a tiny random Qwen3-VL with the real tokenizer")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("demo", help="offline demo on the CPU: synthetic users and a tiny model through global "
                                    "fine-tuning, evaluation and personalization")
    p.add_argument("--out", default="pigg_demo", help="folder for the demo's data, model and outputs")
    p.add_argument("--quick", action="store_true", help="a few samples and steps: checks the pipeline, learns "
                                                        "nothing (tests)")
    p.add_argument("--rl", action="store_true", help="also run GRPO (pigg rl) from the global model and compare "
                                                     "the two on the held-out users")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what a relaunch under torch.distributed.run repeats
    from pigg.data.samples import DataError

    try:
        args.func(args)
    except (C.ConfigError, DataError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"pigg: error: {e}", file=sys.stderr)
        return 2
    close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
