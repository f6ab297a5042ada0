"""Training throughput on one GPU: the seed recipe, pigg's default, each lever on its own, a peer.

Every pigg variant runs `pigg.train.train()` end to end on the real Qwen3-VL-8B architecture with
random weights and synthetic 1080x2400 phone screenshots (~1,054 tokens a sample): data
validation, processor, freezing, LoRA or full FT, the Trainer, DataLoader workers. A variant is the
seed recipe with one setting changed, so each lever is measured on its own; `pigg_default` is pigg
with no settings given. The seed recipe and pigg's default run 16 optimizer steps on the same samples
and seed, so their loss curves can be compared; the others 6. The first step is warm-up, not timed; a
variant's rate is 8 samples over its median step.

The peer is TRL's SFTTrainer (bring its wheel) on the same model, samples and LoRA configuration,
configured as well as TRL allows (micro-batch 4 without checkpointing, 8 workers, Liger), as in
shared/bench/trl_peer_bench.py. `input_pipeline` times decode + resize + tokenize + collate alone.

    PYTHONPATH=src python bench/train_throughput.py [variant ...] [--json NAME]   # writes $OUT/NAME
"""
import gc
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from flops import mfu
from phone_8b import phone_users_and_8b
from pigg import config as C
from pigg.offline.demo import loss_curve
from pigg.train import train

SEED_RECIPE = dict(batch_size=1, grad_accum=8, gradient_checkpointing=True, logits_on_labels_only=False,
                   dataloader_workers=0, liger_kernel=False, optimizer="adamw_torch", torch_compile=False,
                   lora_input_fp32=True, fused_lora=False, padding_mask=True,
                   pad_to_multiple=1, batched_vision_attention=False, vision_without_autocast=False)
PIGG_DEFAULT = {}  # nothing given: batch plan from memory, labels-only logits, 8 workers, Liger, fused AdamW
LEVERS = {  # one change to the seed recipe each
    "micro_batch_from_memory": dict(batch_size=None, grad_accum=None, gradient_checkpointing=None),
    "no_checkpointing": dict(gradient_checkpointing=False),
    "logits_on_labels_only": dict(logits_on_labels_only=True),
    "workers_8": dict(dataloader_workers=8),
    "liger": dict(liger_kernel=True),
    "fused_adamw": dict(optimizer="adamw_torch_fused"),
    "torch_compile": dict(torch_compile=True),
    "bf16_adapter_inputs": dict(lora_input_fp32=False),
    # pigg.fast.lora's fused adapters take bf16 inputs: with the seed's float32 cast PEFT's forward runs
    "fused_lora": dict(fused_lora=True, lora_input_fp32=False),
}
VARIANTS = {  # name: (method, settings, optimizer steps)
    "seed_lora": ("lora", SEED_RECIPE, 16),
    "pigg_default_lora": ("lora", PIGG_DEFAULT, 16),
    **{f"lever_{k}": ("lora", {**SEED_RECIPE, **v}, 6) for k, v in LEVERS.items()},
    "seed_full": ("full", SEED_RECIPE, 6),
    "pigg_default_full": ("full", PIGG_DEFAULT, 6),
    "pigg_default_lora_compiled": ("lora", {"torch_compile": True}, 16),
    # Without LoRA dropout the compiled and eager curves should agree step by step: which part of the
    # compiled run's different curve (README) the dropout explains.
    "pigg_default_lora_no_dropout": ("lora", {"lora.dropout": 0.0}, 16),
    "pigg_default_lora_compiled_no_dropout": ("lora", {"torch_compile": True, "lora.dropout": 0.0}, 16),
    "pigg_default_full_compiled": ("full", {"torch_compile": True}, 6),
    # Attention without cuDNN's kernels (Flash without padding, memory-efficient with): is cuDNN's backward
    # what makes the eager curve differ from the compiled one (bench/attention_grads.py)?
    "pigg_default_lora_no_cudnn_attention": ("lora", {"cudnn_attention": False}, 16),
    # On a GPU with more memory than the H100's 80 GB the plan is micro-batch 8 without checkpointing:
    # micro-batch 4 x 2 there (how much of the rate is the micro-batch, how much the card), micro-batch 8
    # with every layer recomputed, and pigg's defaults planned for (and capped at) an H100's 79.2 GiB.
    "pigg_default_lora_mb4": ("lora", {"batch_size": 4}, 8),
    "pigg_default_lora_mb8_checkpointing": ("lora", {"batch_size": 8, "gradient_checkpointing": True}, 8),
    "pigg_default_lora_80gb": ("lora", {"gpu_memory_gib": 79.2}, 12),
    "pigg_default_full_80gb": ("full", {"gpu_memory_gib": 79.2}, 6),
    # PEFT's adapter forward in place of pigg.fast.lora's fused one (pigg's default before it)
    "pigg_default_lora_peft": ("lora", {"fused_lora": False}, 16),
    "pigg_default_lora_80gb_peft": ("lora", {"gpu_memory_gib": 79.2, "fused_lora": False}, 12),
    # attention given the padding mask (masked kernel over repeated key/value heads; pigg's default before)
    "pigg_default_lora_80gb_padding_mask": ("lora", {"gpu_memory_gib": 79.2, "padding_mask": True}, 12),
    # the vision tower's attention image by image, as transformers runs it
    "pigg_default_lora_80gb_per_image_attention": ("lora", {"gpu_memory_gib": 79.2, "batched_vision_attention": False},
                                                   12),
    # the vision tower under the Trainer's autocast, as the seed runs it (float32 LayerNorms)
    "pigg_default_lora_80gb_vision_autocast": ("lora", {"gpu_memory_gib": 79.2, "vision_without_autocast": False}, 12),
    # the adapters' dropout by torch's kernel, drawn again in the backward (pigg.fast.lora without lora_kernels)
    "pigg_default_lora_80gb_torch_dropout": ("lora", {"gpu_memory_gib": 79.2, "lora_kernels": False}, 12),
}
# Liger patches transformers' Qwen3-VL functions for the rest of the process, and pigg's default uses
# it where installed: give each variant a process of its own (`... train_throughput.py NAME --json F`)
# to measure it alone. The compiled variants' first step includes compilation and is not timed;
# with 16 steps the next few may still compile a variant of the inputs, so compare their median.
ORDER = ["seed_lora", "pigg_default_lora", "lever_micro_batch_from_memory", "lever_no_checkpointing",
         "lever_logits_on_labels_only", "lever_workers_8", "lever_fused_adamw", "lever_bf16_adapter_inputs",
         "lever_fused_lora", "lever_torch_compile", "pigg_default_lora_compiled", "pigg_default_lora_no_dropout",
         "pigg_default_lora_compiled_no_dropout", "pigg_default_lora_no_cudnn_attention", "pigg_default_lora_mb4",
         "pigg_default_lora_mb8_checkpointing", "pigg_default_lora_80gb", "pigg_default_lora_peft",
         "pigg_default_lora_80gb_peft", "pigg_default_lora_80gb_padding_mask",
         "pigg_default_lora_80gb_per_image_attention", "pigg_default_lora_80gb_vision_autocast",
         "pigg_default_lora_80gb_torch_dropout",
         "pigg_default_full_80gb",
         "seed_full", "input_pipeline", "lever_liger", "pigg_default_full", "pigg_default_full_compiled",
         "trl_sft_best"]
CURVES = {"seed_lora", "pigg_default_lora", "pigg_default_lora_compiled", "pigg_default_lora_no_dropout",
          "pigg_default_lora_compiled_no_dropout", "pigg_default_lora_no_cudnn_attention"}  # logged every step
WORKERS = (1, 4, 8, 16)  # DataLoader workers the input pipeline is timed with
LORA_LR = 1e-4  # large enough that 16 steps move the loss; speed does not depend on it


class StepTimer(TrainerCallback):
    """Marks the end of each optimizer step in the GPU's stream, without waiting for the GPU: a timer
    that synchronised would hold the CPU back from preparing the next step while the GPU works, as
    training does not. Also notes the CPU time of the training thread (the forward, the optimizer,
    the Trainer) and of the whole process (with autograd's thread, which runs the backward): a step
    whose CPU time nears its length may be bound by launching its kernels rather than by the GPU (an
    upper bound: a thread waiting inside CUDA may spin)."""
    def __init__(self):
        self.events, self.cpu = [], []

    def on_step_end(self, args, state, control, **kw):
        self.events.append(torch.cuda.Event(enable_timing=True))
        self.events[-1].record()
        self.cpu.append((time.thread_time(), time.process_time()))


def cpu_per_step(timer: StepTimer) -> dict:
    """Median CPU seconds per step after the first, of the training thread and of the process."""
    def median(i):
        return round(statistics.median(b[i] - a[i] for a, b in zip(timer.cpu, timer.cpu[1:])), 3)
    return {"training_thread": median(0), "process": median(1)}


def step_rate(timer: StepTimer) -> tuple[float, list[float]]:
    """Samples/s from the median optimizer step after the first (warm-up, compilation), and the steps."""
    torch.cuda.synchronize()
    steps = [a.elapsed_time(b) / 1e3 for a, b in zip(timer.events, timer.events[1:])]
    return 8 / statistics.median(steps), [round(x, 3) for x in steps]


def mfu_pct(samples_per_s: float, tokens: int, method: str) -> float:
    return round(100 * mfu(method, samples_per_s, tokens), 1)


def pigg_variant(name, model_dir, data_dir, root, tokens) -> dict:
    method, settings, steps = VARIANTS[name]
    cfg = C.RunConfig()
    cfg.model.name_or_path, cfg.model.random_weights = str(model_dir), True
    cfg.data.data_root, cfg.data.users = str(data_dir), "1-8"
    t = cfg.train
    # Logging reads the loss back from the GPU: every step where the loss curves are compared, else as
    # pigg does by default (every 10 steps)
    t.method, t.max_steps, t.save_steps, t.warmup_steps = method, steps, 10_000, 2
    t.logging_steps = 1 if name in CURVES else t.logging_steps
    t.learning_rate = LORA_LR if method == "lora" else 1e-6
    t.output_dir, t.log_dir = str(root / name), str(root / "logs")
    sections = {}  # "lora.dropout" sets cfg.lora.dropout; a bare name a train setting
    for key, value in settings.items():
        section, _, field = key.rpartition(".")
        sections.setdefault(section or "train", {})[field] = value
    C.from_dict(sections, cfg, source=name)  # a misspelt setting is an error, not a new attribute
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    timer = StepTimer()
    folder = train(cfg, callbacks=[timer])
    plan = json.loads((folder / "provenance.json").read_text())["batch_plan"]
    losses = [loss for _, loss in loss_curve(folder)]
    grad_norms = [norm for _, norm in loss_curve(folder, "grad_norm")]  # before clipping
    shutil.rmtree(root / name)  # a full fine-tuning output with its checkpoint is ~65 GB
    rate, steps_s = step_rate(timer)
    return dict(name=name, method=method, settings=settings, micro_batch=plan["micro_batch"],
                grad_accum=plan["grad_accum"], checkpointing=plan["checkpointed_layers"],
                samples_per_s=round(rate, 2), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                mfu_pct=mfu_pct(rate, tokens, method), epoch_hours_90727=round(90727 / rate / 3600, 2),
                step_seconds=steps_s, cpu_seconds_per_step=cpu_per_step(timer), losses=losses, grad_norms=grad_norms)


def trl_variant(model_dir, data_dir, tokens) -> dict:
    """TRL's SFTTrainer at its best setting from shared/bench: micro-batch 4, no checkpointing, 8 workers, Liger."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoProcessor, Qwen3VLForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    from pigg.data.samples import load_samples
    from pigg.model.loading import lora_target_regex

    samples, _ = load_samples(C.DataConfig(data_root=str(data_dir), users="1-8"))
    rows = []
    for s in samples:
        system, answer = s.messages
        image = next(i["image"] for i in system["content"] if i["type"] == "image")
        text = next(i["text"] for i in system["content"] if i["type"] == "text")
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                     "completion": [answer], "images": [_open(data_dir / image)]})
    dataset = Dataset.from_list(rows)
    with torch.device("cuda"):
        model = Qwen3VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.bfloat16,
                                                             attn_implementation="sdpa")
    model.model.visual.requires_grad_(False)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM",
                      target_modules=lora_target_regex(C.LoraSettings().target_modules))
    args = SFTConfig(output_dir="/tmp/trl_out", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     gradient_checkpointing=False, bf16=True, learning_rate=LORA_LR, weight_decay=0.01, max_steps=6,
                     logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=8, max_length=None,
                     completion_only_loss=True, use_liger_kernel=True)
    timer = StepTimer()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, peft_config=lora, callbacks=[timer],
                         processing_class=AutoProcessor.from_pretrained(model_dir))
    trainer.train()
    rate, steps_s = step_rate(timer)
    result = dict(name="trl_sft_best", method="lora", settings=dict(micro_batch=4, grad_accum=2, checkpointing=0,
                  workers=8, liger=True), samples_per_s=round(rate, 2),
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1), mfu_pct=mfu_pct(rate, tokens, "lora"),
                  epoch_hours_90727=round(90727 / rate / 3600, 2), step_seconds=steps_s)
    del trainer, model
    return result


def _open(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def input_pipeline(model_dir, data_dir) -> dict:
    """Samples/s that DataLoader workers deliver (decode, resize, tokenize, collate as training does: rotary
    positions, padding to a multiple, bf16 pixels), micro-batch 8, no GPU."""
    from torch.utils.data import DataLoader

    from pigg.data.collate import TrainCollator
    from pigg.data.samples import load_samples
    from pigg.data.processor import load_processor

    samples, _ = load_samples(C.DataConfig(data_root=str(data_dir), users="1-8"))
    t = C.TrainConfig()
    collate = TrainCollator(load_processor(str(model_dir)), 8192, t.padding_mask, t.pad_to_multiple, torch.bfloat16,
                            supervised_index=t.logits_on_labels_only, grid_on_cpu=t.batched_vision_attention)
    rates = {}
    for workers in WORKERS:
        # The workers fill 4 batches each ahead while the first one starts: the clock starts once those
        # are taken, and then times as many batches again, so it measures how fast the workers produce.
        ahead, timed = 4 * workers + 1, 4 * workers + 8
        repeats = -(-(ahead + timed) * 8 // len(samples))
        loader = DataLoader(samples * repeats, batch_size=8, collate_fn=collate, num_workers=workers, pin_memory=True,
                            prefetch_factor=4, persistent_workers=False)
        batches = iter(loader)
        for _ in range(ahead):
            next(batches)
        start, n = time.perf_counter(), 0
        for batch in itertools.islice(batches, timed):
            n += len(batch["input_ids"])
        rates[str(workers)] = round(n / (time.perf_counter() - start), 1)
        del batches
    return dict(name="input_pipeline", samples_per_s_by_workers=rates, cores=os.cpu_count())


def main():
    args = sys.argv[1:]
    json_name = args.pop(args.index("--json") + 1) if "--json" in args else "train_throughput.json"
    names = [n for n in ORDER if n in args] or ORDER
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    root = Path(tempfile.mkdtemp(prefix="pigg_bench_"))
    t = time.time()
    model_dir, data_dir = phone_users_and_8b(root, 8, 12)
    print(f"synthesised 96 samples of 1080x2400 in {time.time() - t:.1f}s", flush=True)
    tokens = 1054
    results = []
    for name in names:
        try:
            if name == "input_pipeline":
                results.append(input_pipeline(model_dir, data_dir))
            elif name == "trl_sft_best":
                results.append(trl_variant(model_dir, data_dir, tokens))
            else:
                results.append(pigg_variant(name, model_dir, data_dir, root, tokens))
        except Exception as e:  # one failing variant must not lose the others
            import traceback

            traceback.print_exc()
            results.append(dict(name=name, error=repr(e)[:500]))
        print("RESULT " + json.dumps(results[-1]), flush=True)
        gc.collect()
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], json_name).write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results):
    print(f"\n{'variant':<34} {'mb x acc':>8} {'ckpt':>5} {'samples/s':>9} {'peak GiB':>8} {'MFU %':>6} {'epoch h':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:<34} error: {r['error'][:80]}")
        elif "samples_per_s" in r:
            mb = f"{r.get('micro_batch', r['settings'].get('micro_batch'))}x{r.get('grad_accum', r['settings'].get('grad_accum'))}"
            ckpt = r.get("checkpointing", r["settings"].get("checkpointing"))
            print(f"{r['name']:<34} {mb:>8} {str(ckpt):>5} {r['samples_per_s']:>9.2f} {r['peak_gib']:>8.1f} "
                  f"{r['mfu_pct']:>6.1f} {r['epoch_hours_90727']:>7.2f}")
        else:
            print(f"{r['name']:<34} {r}")
    seed = next((r for r in results if r["name"] == "seed_lora" and "losses" in r), None)
    fast = next((r for r in results if r["name"] == "pigg_default_lora" and "losses" in r), None)
    if seed and fast:
        diffs = [abs(a - b) for a, b in zip(seed["losses"], fast["losses"])]
        print(f"\nloss, seed recipe vs pigg default (same samples and seed): step 1 {seed['losses'][0]:.4f} vs "
              f"{fast['losses'][0]:.4f}; largest difference over {len(diffs)} steps {max(diffs):.4f}")
        print("  seed:", " ".join(f"{x:.3f}" for x in seed["losses"]))
        print("  pigg:", " ".join(f"{x:.3f}" for x in fast["losses"]))


if __name__ == "__main__":
    main()
