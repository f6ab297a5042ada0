"""Where pigg's evaluation time goes on one GPU (real 8B architecture, random weights).

Splits a batch's time into: the input pipeline alone (DataLoader workers running the processor),
prefill (max_new_tokens=1), full generation of 40 tokens, and generation of the same batch with the
padding removed (attention mask all ones), which tells what the left-padding mask costs.

    python bench/eval_profile.py [BATCH_SIZE]     # writes $OUT/eval_profile_bsN.json when OUT is set
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from eval_gpu import timed
from phone_8b import phone_users_and_8b
from pigg import config as C
from pigg.data.collate import sample_length
from pigg.data.samples import load_samples
from pigg.evaluate import PromptCollator, generate_batch, length_batches, prompt_and_truth
from pigg.model.loading import load_model
from pigg.data.processor import load_processor


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch_size", nargs="?", type=int, default=64, help="prompts in the batch (default: 64)")
    bs = parser.parse_args(argv).batch_size
    root = Path(tempfile.mkdtemp(prefix="pigg_eval_prof_"))
    folder, data_dir = phone_users_and_8b(root, 4, 2 * bs // 3, seed=1)
    cfg = C.RunConfig()
    cfg.model.name_or_path, cfg.model.random_weights = str(folder), True
    cfg.data.data_root, cfg.data.users = str(data_dir), "1-4"
    samples, sizes = load_samples(cfg.data)
    processor = load_processor(str(folder), None, cfg.model.max_pixels)
    prompts = [prompt_and_truth(s) for s in samples]
    batches = length_batches(prompts, [sample_length(processor, p, sizes)[0] for p, _ in prompts], bs)
    res = {"batch_size": bs, "processor": type(processor.image_processor).__name__}

    t = time.perf_counter()
    loaded = [b for b, _ in DataLoader(batches, batch_size=None, collate_fn=PromptCollator(processor), num_workers=8)]
    n = sum(b["input_ids"].shape[0] for b in loaded)
    res["input_pipeline_samples_per_s_8_workers"] = round(n / (time.perf_counter() - t), 1)
    t = time.perf_counter()
    PromptCollator(processor)(batches[0])
    res["collate_one_batch_main_process_s"] = round(time.perf_counter() - t, 2)

    model = load_model(cfg.model, "cuda").eval()
    model.config.use_cache = True
    batch = loaded[0]
    pad = (batch["attention_mask"] == 0).sum().item()
    res["padding_tokens_in_batch"] = pad
    res["tokens_per_sample"] = batch["input_ids"].shape[1]
    res["prefill_s"] = round(timed(lambda: generate_batch(model, processor, batch, 1, 1)), 2)
    res["generate40_s"] = round(timed(lambda: generate_batch(model, processor, batch, 40, 40)), 2)
    unpadded = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
    res["generate40_no_padding_mask_s"] = round(timed(lambda: generate_batch(model, processor, unpadded, 40, 40)), 2)
    res["generate40_samples_per_s"] = round(bs / res["generate40_s"], 2)
    res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"eval_profile_bs{bs}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
