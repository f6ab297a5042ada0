"""The seed system's command lines, translated onto `pigg`.

    python 2_finetune_global.py 0 --lora          ->  CUDA_VISIBLE_DEVICES=0  pigg train --lora
    python 2_finetune_global.py 0,1               ->  CUDA_VISIBLE_DEVICES=0,1 pigg train --full
    python 2_finetune_global.py 0 --lora --u 11 50 -> ... --users 11-50   (two numbers: a range)

Any other flag is passed to `pigg train` unchanged (e.g. --data-root, --output-dir).
"""
import argparse
import os
import sys

from pigg.users import seed_users_arg


def translate_finetune_global(argv: list[str]) -> tuple[dict, list[str]]:
    """(environment changes, pigg argv) for the seed's `2_finetune_global.py` arguments."""
    parser = argparse.ArgumentParser(prog="2_finetune_global.py", add_help=True)
    parser.add_argument("gpus", help="GPU list, e.g. 0 or 0,1 (becomes CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--lora", action="store_true", help="LoRA (default: full fine-tuning, as in the seed)")
    parser.add_argument("--u", nargs="+", type=int, help="users: two numbers are a range, more a list")
    args, rest = parser.parse_known_args(argv)
    gpus = args.gpus.replace(" ", "")
    if not all(g.isdigit() for g in gpus.split(",")):
        parser.error(f"GPU list must look like 0 or 0,1, got {args.gpus!r}")
    out = ["train", "--lora" if args.lora else "--full"]
    if args.u:
        out += ["--users", seed_users_arg(args.u)]
    return {"CUDA_VISIBLE_DEVICES": gpus}, out + rest


def finetune_global_main(argv=None) -> int:
    env, pigg_argv = translate_finetune_global(sys.argv[1:] if argv is None else argv)
    os.environ.update(env)  # before torch initialises CUDA
    from pigg.cli import main

    return main(pigg_argv)
