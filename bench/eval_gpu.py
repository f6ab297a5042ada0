"""pigg's evaluate() on the real Qwen3-VL-8B architecture (random weights) on one GPU.

Same work per sample as shared/bench/eval_bench.py (exactly 40 new tokens, phone screenshots of
1080x2400 = 966 image tokens), but through pigg's own path: data validation, DataLoader workers
running the processor, length-sorted left-padded batches, scoring, JSONL writes. Baselines measured
on an H100 (eval_bench.json): the seed's one-at-a-time loop 0.56 samples/s, a naive batch-32 loop 9.52.

    PYTHONPATH=src python bench/eval_gpu.py [batch sizes ...]     # writes $OUT/eval_gpu.json
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from phone_8b import phone_users_and_8b
from pigg import config as C
from pigg.data.samples import load_samples
import pigg.evaluate as E
from pigg.evaluate import evaluate
from pigg.model.loading import load_model
from pigg.data.processor import load_processor

BASELINE = {"seed_loop_bs1": 0.56, "naive_bs32": 9.52}
NEW_TOKENS = 40


def main():
    sizes_to_try = [int(x) for x in sys.argv[1:]] or [32, 64, 128]
    root = Path(tempfile.mkdtemp(prefix="pigg_eval_bench_"))
    t = time.time()
    folder, data_dir = phone_users_and_8b(root, 8, 100, seed=1)
    print(f"synthesised in {time.time() - t:.0f}s; device {torch.cuda.get_device_name()}", flush=True)
    cfg = C.RunConfig()
    cfg.model.name_or_path, cfg.model.random_weights = str(folder), True
    cfg.data.data_root, cfg.data.users = str(data_dir), "1-8"
    samples, sizes = load_samples(cfg.data)
    processor = load_processor(str(folder), None, cfg.model.max_pixels)
    model = load_model(cfg.model, "cuda").eval()
    model.config.use_cache = True
    # Record when each batch's answers come back, to separate steady state from the pipeline's start.
    stamps, real_generate = [], E.generate_batch

    def stamped(*args, **kw):
        out = real_generate(*args, **kw)
        stamps.append((time.time(), len(out)))
        return out

    E.generate_batch = stamped
    results = {}
    for bs in sizes_to_try:
        evaluate(model, processor, samples[:bs], sizes, root / f"warm{bs}", bs, NEW_TOKENS, 8, min_new_tokens=NEW_TOKENS)
        n = min(len(samples), 6 * bs)
        stamps.clear()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.time()
        evaluate(model, processor, samples[:n], sizes, root / f"run{bs}", bs, NEW_TOKENS, 8, min_new_tokens=NEW_TOKENS)
        torch.cuda.synchronize()
        dt = time.time() - t
        steady = sum(k for _, k in stamps[1:]) / (stamps[-1][0] - stamps[0][0])
        results[f"pigg_bs{bs}"] = dict(samples=n, seconds=round(dt, 2), samples_per_s=round(n / dt, 2),
                                       steady_samples_per_s=round(steady, 2),
                                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                                       test_set_minutes_10063=round(10063 / steady / 60, 1))
        print(json.dumps({f"pigg_bs{bs}": results[f"pigg_bs{bs}"]}), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "eval_gpu.json").write_text(json.dumps({**results, "baseline": BASELINE}, indent=1))
    print(f"\n{'variant':<14} {'samples/s':>9} {'steady':>7} {'peak GiB':>8} {'10,063 samples':>15}")
    for name, r in results.items():
        print(f"{name:<14} {r['samples_per_s']:>9.2f} {r['steady_samples_per_s']:>7.2f} {r['peak_gib']:>8.1f} "
              f"{r['test_set_minutes_10063']:>12.1f} min")
    for name, v in BASELINE.items():
        print(f"{name:<14} {v:>9.2f}          (shared/bench/eval_bench.json, H100)")


if __name__ == "__main__":
    main()
