"""The seed system's command lines, translated onto `pigg`.

    python 2_finetune_global.py 0 --lora          ->  pigg train --lora --gpus 0 --lr 1e-6
    python 2_finetune_global.py 0,1               ->  pigg train --full --gpus 0,1 --lr 1e-6   (FSDP over 2 GPUs)
    python 2_finetune_global.py 0 --lora --u 11 50 -> ... --users 11-50   (two numbers: a range)

The seed trained at lr 1e-6 with both methods; `pigg train` picks its learning rate by method (1e-4 for
LoRA), so the translation passes the seed's 1e-6 to run the seed's recipe. Any other flag is passed to
`pigg train` unchanged and comes after it, so `--lr` given here wins (e.g. --data-root, --output-dir, --lr).
"""
import argparse
import os
import sys

from pigg.data.users import seed_users_arg

SEED_LR = "1e-6"  # 2_finetune_global.py's learning rate, LoRA and full alike


def translate_finetune_global(argv: list[str]) -> tuple[dict, list[str]]:
    """(environment changes, pigg argv) for the seed's `2_finetune_global.py` arguments."""
    parser = argparse.ArgumentParser(prog="2_finetune_global.py", add_help=True)
    parser.add_argument("gpus", help="GPU list, e.g. 0 or 0,1 (one training process per GPU)")
    parser.add_argument("--lora", action="store_true", help="LoRA (default: full fine-tuning, as in the seed)")
    parser.add_argument("--u", nargs="+", type=int, help="users: two numbers are a range, more a list")
    args, rest = parser.parse_known_args(argv)
    env = _gpu_env(parser, args.gpus)
    out = ["train", "--lora" if args.lora else "--full", "--gpus", env["CUDA_VISIBLE_DEVICES"], "--lr", SEED_LR]
    if args.u:
        out += ["--users", seed_users_arg(args.u)]
    return env, out + rest


def _gpu_env(parser, gpus: str) -> dict:
    gpus = gpus.replace(" ", "")
    if not all(g.isdigit() for g in gpus.split(",")):
        parser.error(f"GPU list must look like 0 or 0,1, got {gpus!r}")
    return {"CUDA_VISIBLE_DEVICES": gpus}


def translate_eval(argv: list[str], with_checkpoint: bool) -> tuple[dict, list[str]]:
    """The seed's `1_vanilla_eval.py 0 --u 1 10` and `3_eval_checkpoint.py 0 --checkpoint DIR --u 1 10 [--lora]`."""
    name = "3_eval_checkpoint.py" if with_checkpoint else "1_vanilla_eval.py"
    parser = argparse.ArgumentParser(prog=name)
    parser.add_argument("gpus", help="GPU list, e.g. 0 or 0,1 (one evaluation process per GPU)")
    parser.add_argument("--u", nargs="+", type=int, default=[1, 10], help="users: two numbers are a range")
    if with_checkpoint:
        parser.add_argument("--checkpoint", required=True, help="fine-tuned output or checkpoint folder")
        parser.add_argument("--lora", action="store_true", help="the checkpoint is a LoRA adapter (checked)")
    args, rest = parser.parse_known_args(argv)
    env = _gpu_env(parser, args.gpus)
    out = ["eval", "--gpus", env["CUDA_VISIBLE_DEVICES"], "--users", seed_users_arg(args.u)]
    if with_checkpoint:
        from pathlib import Path

        is_adapter = (Path(args.checkpoint) / "adapter_config.json").is_file()
        if args.lora and not is_adapter:
            parser.error(f"--lora given but {args.checkpoint} has no adapter_config.json")
        out += ["--checkpoint", args.checkpoint]
    return env, out + rest


def translate_personalize(argv: list[str]) -> tuple[dict, list[str]]:
    """The seed's `4_finetune_person.py 0 --lora --users 1 2`: users are a list; the global output is the
    one `2_finetune_global.py` leaves in the working folder unless --base says otherwise."""
    parser = argparse.ArgumentParser(prog="4_finetune_person.py")
    parser.add_argument("gpus", help="GPU list, e.g. 0 (becomes CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--lora", action="store_true", help="LoRA (default: full fine-tuning, as in the seed)")
    parser.add_argument("--users", nargs="+", type=int, default=list(range(1, 11)), help="test users to personalize")
    parser.add_argument("--base", default=None, help="global output (default: ./global_agent_lora or ./global_agent_full)")
    args, rest = parser.parse_known_args(argv)
    method = "lora" if args.lora else "full"
    out = ["personalize", f"--{method}", "--users", ",".join(str(u) for u in args.users),
           "--base", args.base or f"global_agent_{method}"]
    return _gpu_env(parser, args.gpus), out + rest


def _run(env: dict, pigg_argv: list[str]) -> int:
    os.environ.update(env)  # before torch initialises CUDA
    from pigg.cli import main

    return main(pigg_argv)


def vanilla_eval_main(argv=None) -> int:
    return _run(*translate_eval(sys.argv[1:] if argv is None else argv, with_checkpoint=False))


def eval_checkpoint_main(argv=None) -> int:
    return _run(*translate_eval(sys.argv[1:] if argv is None else argv, with_checkpoint=True))


def finetune_global_main(argv=None) -> int:
    return _run(*translate_finetune_global(sys.argv[1:] if argv is None else argv))


def finetune_person_main(argv=None) -> int:
    return _run(*translate_personalize(sys.argv[1:] if argv is None else argv))
