"""The results table of bench/README.md, from the JSON files that bench/train_throughput.py,
bench/eval_gpu.py and bench/rl_gpu.py write: one row per training variant (seed recipe, TRL's peer,
pigg's default, in the README's order, then any other variant), one per evaluation variant (the seed's
loop, transformers' generate() on batches, pigg's default, each by batch size) and one per GRPO sampler.
Markdown, so a new run's table can replace the README's as it is printed.

    python bench/results_table.py bench/results/train_throughput_*_h200.json bench/results/eval_gpu_h200.json \
        bench/results/rl_gpu_h200.json
"""
import argparse
import json
from pathlib import Path

EPOCH = 90727  # samples in the seed's training set: a LoRA epoch's hours are this over the rate
EVALUATION = {"seed": " (the seed's loop)", "current": " (transformers' generate())",  # name: label
              "pigg_noliger": " (pigg, without Liger's kernels)", "pigg": ""}
RL_SAMPLERS = {"pigg": "pigg's generator", "transformers": "TRL's generate()"}  # rl.sampler: its row's name
ROWS = {  # variant: its row's name, in the README's order
    "seed_lora": "seed recipe LoRA",
    "trl_sft_best": "TRL SFTTrainer best in 80 GB (Liger, 8 workers)",
    "trl_sft_whole_gpu": "TRL SFTTrainer, whole GPU",
    "pigg_default_lora_80gb": "pigg default LoRA planned for 79.2 GiB",
    "pigg_default_lora": "pigg default LoRA, whole GPU",
    "seed_full": "seed recipe full FT",
    "pigg_default_full": "pigg default full FT",
}


def read(paths: list[Path]) -> tuple[list[dict], dict, list[dict]]:
    """Training results (bench/train_throughput.py's lists; a variant's last result counts, a failure
    too), evaluation results by row label (bench/eval_gpu.py's "seed_bsN", "current_bsN",
    "pigg_noliger_bsN" and "pigg_bsN" entries, in that order and by batch size) and GRPO runs
    (bench/rl_gpu.py's, with its settings)."""
    training, evaluation, rl = {}, {}, []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if isinstance(data, list):
            training.update({r["name"]: r for r in data if "samples_per_s" in r or "error" in r})
            continue
        if "runs" in data:
            settings = {k: v for k, v in data.items() if k != "runs"}
            rl += [{**settings, **run} for run in data["runs"]]
            continue
        for key, value in data.items():
            variant, _, size = key.partition("_bs")
            if variant in EVALUATION and size.isdigit():
                evaluation[list(EVALUATION).index(variant), int(size)] = (size + EVALUATION[variant], value)
    order = [name for name in ROWS if name in training] + [name for name in training if name not in ROWS]
    return [training[name] for name in order], dict(evaluation[key] for key in sorted(evaluation)), rl


def training_table(results: list[dict]) -> list[str]:
    lines = ["| run | mb x acc | ckpt layers | samples/s | peak GiB | MFU | LoRA epoch of 90,727 |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {ROWS.get(r['name'], r['name'])} | error: {r['error'][:80]} | | | | | |")
            continue
        epoch = f"{EPOCH / r['samples_per_s'] / 3600:.1f} h" if r["method"] == "lora" else ""
        lines.append(f"| {ROWS.get(r['name'], r['name'])} | {r['micro_batch']}x{r['grad_accum']} | "
                     f"{r['checkpointing']} | {r['samples_per_s']:.2f} | {r['peak_gib']:.1f} | {r['mfu_pct']:.1f}% | "
                     f"{epoch} |")
    return lines


def evaluation_table(results: dict) -> list[str]:
    lines = ["| evaluation batch | samples/s end to end | steady | peak GiB |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['samples_per_s']:.2f} | {r['steady_samples_per_s']:.2f} | {r['peak_gib']:.1f} |")
    return lines


def rl_table(runs: list[dict]) -> list[str]:
    lines = ["| GRPO sampler | G x prompts, tokens | prompts/s | step s | sampling s | update s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {RL_SAMPLERS.get(r['sampler'], r['sampler'])} | {r['generations']}x{r['prompts_per_step']}, "
                     f"{r['max_new_tokens']} | {r['prompts_per_second']:.2f} | {r['step_seconds']:.1f} | "
                     f"{r['sampling_seconds']:.1f} | {r['update_and_scoring_seconds']:.1f} | {r['peak_gib']:.1f} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path,
                        help="JSON files of train_throughput.py, eval_gpu.py and rl_gpu.py")
    training, evaluation, rl = read(parser.parse_args(argv).files)
    lines = []
    for rows, table in ((training, training_table), (evaluation, evaluation_table), (rl, rl_table)):
        if rows:
            lines += ([""] if lines else []) + table(rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
