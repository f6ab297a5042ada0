"""pigg's own training path on the real Qwen3-VL-8B architecture (random weights) on one GPU.

Runs `pigg.train.train()` end to end (data validation, processor, freezing, LoRA or full FT,
Trainer with the seed's arguments, dataloader workers) on synthetic phone screenshots of
1080x2400 (966 image tokens, about 1,090 tokens a sample), and reports steady-state samples/s and
peak memory next to the seed recipe's numbers measured on an H100 (shared/bench/seed_recipe_bench.json).

    PYTHONPATH=src python bench/train_gpu.py [variant ...]    # writes $OUT/train_gpu.json
"""
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from pigg import config as C
from pigg.architectures import qwen3_vl_8b_config
from pigg.synth import synthesize
from pigg.tiny import make_config_folder
from pigg.train import train

# shared/bench/seed_recipe_bench.json, H100 80GB, same 8B architecture, batch 1, accumulation 8, checkpointing
SEED = {"lora": dict(samples_per_s=1.89, peak_gib=19.4), "full": dict(samples_per_s=2.79, peak_gib=64.9)}
# same file, LoRA batch 4 without checkpointing (bare loop): 5.49 samples/s, 73.9 GiB
STEPS = 6  # optimizer steps of 8 samples; the first one is warm-up and not timed

VARIANTS = {  # name: (method, batch_size, grad_accum, gradient_checkpointing)
    "pigg_seed_lora": ("lora", 1, 8, True),
    "pigg_seed_full": ("full", 1, 8, True),
    "pigg_lora_mb4_nockpt": ("lora", 4, 2, False),
}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def run(name, model_dir, data_dir, root) -> dict:
    method, batch, accum, ckpt = VARIANTS[name]
    cfg = C.RunConfig()
    cfg.model.name_or_path, cfg.model.random_weights = str(model_dir), True
    cfg.data.data_root, cfg.data.users = str(data_dir), "1-8"
    cfg.train.method, cfg.train.batch_size, cfg.train.grad_accum = method, batch, accum
    cfg.train.gradient_checkpointing, cfg.train.max_steps = ckpt, STEPS
    cfg.train.output_dir, cfg.train.log_dir = str(root / name), str(root / "logs")
    cfg.train.save_steps, cfg.train.dataloader_workers = 10_000, 8
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    timer = StepTimer()
    train(cfg, callbacks=[timer])
    shutil.rmtree(root / name)  # a full fine-tuning output with its checkpoint is ~65 GB: the disk holds one
    dt = (timer.times[-1] - timer.times[0]) / (len(timer.times) - 1)
    samples_per_s = batch * accum / dt
    return dict(name=name, method=method, batch_size=batch, grad_accum=accum, checkpointing=ckpt,
                sec_per_optimizer_step=round(dt, 3), samples_per_s=round(samples_per_s, 2),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                epoch_hours_90727=round(90727 / samples_per_s / 3600, 2),
                seed_samples_per_s=SEED[method]["samples_per_s"], seed_peak_gib=SEED[method]["peak_gib"])


def main():
    names = sys.argv[1:] or list(VARIANTS)
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    root = Path(tempfile.mkdtemp(prefix="pigg_bench_"))
    t = time.time()
    data_dir = root / "data"
    synthesize(data_dir, 8, samples_per_user=12, seed=0, width=1080, height=2400)
    print(f"synthesised 1080x2400 users in {time.time() - t:.1f}s", flush=True)
    model_dir = make_config_folder(root / "qwen3vl8b-random", qwen3_vl_8b_config())
    results = []
    for name in names:
        results.append(run(name, model_dir, data_dir, root))
        print(json.dumps(results[-1]), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "train_gpu.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'variant':<20} {'samples/s':>9} {'peak GiB':>8} {'epoch h':>7}   seed: {'samples/s':>9} {'peak GiB':>8}")
    for r in results:
        print(f"{r['name']:<20} {r['samples_per_s']:>9.2f} {r['peak_gib']:>8.1f} {r['epoch_hours_90727']:>7.2f}"
              f"         {r['seed_samples_per_s']:>9.2f} {r['seed_peak_gib']:>8.1f}")


if __name__ == "__main__":
    main()
