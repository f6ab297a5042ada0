#!/usr/bin/env bash
# Four H100s' runs for this session, under the device tool's 10 minutes a command: the interconnect,
# the 2-GPU tests, then bench/train_multi_gpu.py with what time is left (later variants skipped).
# Variant names as arguments run only those: bash bench/session_4gpu.sh lora_1gpu lora_ddp_4gpu_weak
set -u
cd "$(dirname "$0")/.."
nvidia-smi topo -m | head -8
timeout 170 python3 -m pytest -q -m gpu tests/test_distributed.py 2>&1 | grep -E "^(E |FAILED|[0-9]+ (passed|failed|skipped))" | head -20
python3 bench/train_multi_gpu.py --budget $((545 - SECONDS)) --steps 8 "$@" 2>&1 | grep -v "^{" | tail -40
cp bench/results/train_multi_gpu_4gpu.json "${OUT:-/tmp}/" 2>/dev/null
true
