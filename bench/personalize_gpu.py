"""Time per fold of one user's personalization on the real Qwen3-VL-8B architecture (random weights).

A global LoRA output is made first (2 optimizer steps of pigg train on user 2), then `pigg personalize`
runs user 1 with the seed's personalization settings (K=3, 3 epochs, effective batch 4, lr 2e-5):
vanilla and global evaluation of the held-out samples, then per fold a fresh LoRA on the merged
global weights, training and evaluation. Random weights answer with junk up to max_new_tokens, so
evaluation time here is an upper bound for that token limit.

    python bench/personalize_gpu.py [SAMPLES]     # writes $OUT/personalize_gpu.json when OUT is set
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from phone_8b import phone_users_and_8b
from pigg import config as C
from pigg.personalize import PERSONALIZE_DEFAULTS, personalize
from pigg.train import train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", nargs="?", type=int, default=30, help="user 1's samples (default: 30)")
    n = parser.parse_args(argv).samples
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    root = Path(tempfile.mkdtemp(prefix="pigg_personal_"))
    model_dir, data_dir = phone_users_and_8b(root, 2, n)

    cfg = C.RunConfig()
    cfg.model.name_or_path, cfg.model.random_weights = str(model_dir), True
    cfg.data.data_root, cfg.data.users = str(data_dir), "2"
    cfg.train.max_steps, cfg.train.output_dir, cfg.train.log_dir = 2, str(root / "global"), str(root / "logs")
    start = time.time()
    base = train(cfg)
    global_seconds = time.time() - start

    cfg = C.from_dict(PERSONALIZE_DEFAULTS, C.RunConfig())
    cfg.model.name_or_path, cfg.model.random_weights = str(model_dir), True
    cfg.data.data_root, cfg.data.users = str(data_dir), "1"
    cfg.personalize.base = str(base)
    cfg.train.output_dir, cfg.train.log_dir = str(root / "personal"), str(root / "logs")
    cfg.eval.max_new_tokens = 32
    start = time.time()
    out = personalize(cfg)
    total = time.time() - start
    folds = [json.loads(p.read_text()) for p in sorted(out.glob("user_1/fold_*/fold.json"))]
    result = dict(device=torch.cuda.get_device_name(), samples=n, global_run_seconds=round(global_seconds, 1),
                  personalize_seconds=round(total, 1), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                  folds=[{k: f[k] for k in ("fold", "optimizer_steps", "micro_batch", "train_seconds", "total_seconds")}
                         | {"train_samples": len(f["train"]), "test_samples": len(f["test"])} for f in folds])
    print(json.dumps(result, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "personalize_gpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
