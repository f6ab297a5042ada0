"""Training throughput on one GPU: the seed recipe, pigg's default, each lever on its own, TRL's peer.

Every pigg variant runs `pigg.train.train()` end to end on the real Qwen3-VL-8B architecture with
random weights and synthetic 1080x2400 phone screenshots (~1,054 tokens a sample): data
validation, processor, freezing, LoRA or full FT, the Trainer, DataLoader workers. A lever is the
seed recipe with one setting changed, so each is measured on its own; `pigg_default_lora` and
`pigg_default_full` are pigg with no setting given, `_80gb` plans for (and caps PyTorch's allocator at) an
80 GB card's 79.2 GiB, and the other `pigg_default_*` change one thing more. The seed recipe and pigg's
default LoRA run 16 optimizer steps on the same samples and seed, so their loss curves can be compared;
the others 6 to 16 (PIGG below). The first step is warm-up, not timed; a variant's rate is 8 samples over
its median step.

The peer is TRL's SFTTrainer (needs trl, datasets and liger-kernel) on the same model, samples and LoRA
configuration, configured as well as TRL allows: no checkpointing, 8 DataLoader workers, Liger, micro-batch
4 x 2 (`trl_sft_best`, the largest that fits in 80 GB) or 8 x 1 (`trl_sft_whole_gpu`). `input_pipeline`
times decode + resize + tokenize + collate alone.

Liger patches transformers' Qwen3-VL functions for the rest of the process, and pigg's default uses it
where installed: run each variant in a process of its own to measure it alone (bench/run_1gpu.sh does).

    python bench/train_throughput.py VARIANT [...] [--json NAME]     # writes $OUT/NAME when OUT is set
"""
import argparse
import gc
import itertools
import json
import os
import shutil
import statistics
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

# "section.field" sets that config field; a bare name is a train setting
SEED_RECIPE = {"batch_size": 1, "grad_accum": 8, "gradient_checkpointing": True, "dataloader_workers": 0,
               "optimizer": "adamw_torch", "fast.logits_on_labels_only": False, "fast.liger_kernel": False,
               "fast.torch_compile": False, "fast.lora_input_fp32": True, "fast.fused_lora": False,
               "fast.padding_mask": True, "fast.pad_to_multiple": 1, "fast.batched_vision_attention": False,
               "fast.vision_without_autocast": False}
PIGG_DEFAULT = {}  # nothing given: batch plan from memory, labels-only logits, 8 workers, Liger, fused AdamW
LEVERS = {  # one change to the seed recipe each
    "micro_batch_from_memory": {"batch_size": None, "grad_accum": None, "gradient_checkpointing": None},
    "no_checkpointing": {"gradient_checkpointing": False},
    "logits_on_labels_only": {"fast.logits_on_labels_only": True},
    "workers_8": {"dataloader_workers": 8},
    "liger": {"fast.liger_kernel": True},
    "fused_adamw": {"optimizer": "adamw_torch_fused"},
    "torch_compile": {"fast.torch_compile": True},
    "bf16_adapter_inputs": {"fast.lora_input_fp32": False},
    # pigg.fast.lora's fused adapters take bf16 inputs: with the seed's float32 cast PEFT's forward runs
    "fused_lora": {"fast.fused_lora": True, "fast.lora_input_fp32": False},
}
PIGG = {  # name: (method, settings, optimizer steps)
    "seed_lora": ("lora", SEED_RECIPE, 16),
    "pigg_default_lora": ("lora", PIGG_DEFAULT, 16),
    "pigg_default_lora_80gb": ("lora", {"gpu_memory_gib": 79.2}, 12),
    "seed_full": ("full", SEED_RECIPE, 6),
    "pigg_default_full": ("full", PIGG_DEFAULT, 6),
    "pigg_default_full_80gb": ("full", {"gpu_memory_gib": 79.2}, 6),
    **{f"lever_{k}": ("lora", {**SEED_RECIPE, **v}, 6) for k, v in LEVERS.items()},
    # Compiled decoder layers (fast.torch_compile). Their first step includes compilation and is not timed;
    # with 16 steps the next few may still compile a variant of the inputs, so compare their median.
    "pigg_default_lora_compiled": ("lora", {"fast.torch_compile": True}, 16),
    "pigg_default_full_compiled": ("full", {"fast.torch_compile": True}, 6),
    # Without LoRA dropout the compiled and eager curves should agree step by step (bench/compile_grads.py
    # looks for why they differ with it)
    "pigg_default_lora_no_dropout": ("lora", {"lora.dropout": 0.0}, 16),
    "pigg_default_lora_compiled_no_dropout": ("lora", {"fast.torch_compile": True, "lora.dropout": 0.0}, 16),
    # Attention without cuDNN's kernels (Flash without padding, memory-efficient with; bench/attention_grads.py)
    "pigg_default_lora_no_cudnn_attention": ("lora", {"fast.cudnn_attention": False}, 16),
    # Other plans on a card larger than 80 GB, where pigg plans micro-batch 8 without checkpointing:
    # micro-batch 4 x 2, and micro-batch 8 with every layer recomputed
    "pigg_default_lora_mb4": ("lora", {"batch_size": 4}, 8),
    "pigg_default_lora_mb8_checkpointing": ("lora", {"batch_size": 8, "gradient_checkpointing": True}, 8),
    # Each speed switch of pigg's default turned off on its own (docs/performance.md lists them)
    "pigg_default_lora_peft": ("lora", {"fast.fused_lora": False}, 16),
    "pigg_default_lora_80gb_peft": ("lora", {"gpu_memory_gib": 79.2, "fast.fused_lora": False}, 12),
    "pigg_default_lora_80gb_padding_mask": ("lora", {"gpu_memory_gib": 79.2, "fast.padding_mask": True}, 12),
    "pigg_default_lora_80gb_per_image_attention": (
        "lora", {"gpu_memory_gib": 79.2, "fast.batched_vision_attention": False}, 12),
    "pigg_default_lora_80gb_vision_autocast": (
        "lora", {"gpu_memory_gib": 79.2, "fast.vision_without_autocast": False}, 12),
    "pigg_default_lora_80gb_torch_dropout": ("lora", {"gpu_memory_gib": 79.2, "fast.lora_kernels": False}, 12),
}
TRL = {"trl_sft_best": (4, 2), "trl_sft_whole_gpu": (8, 1)}  # name: (micro-batch, accumulation)
VARIANTS = [*PIGG, *TRL, "input_pipeline"]  # every name the command line takes, in the order they run
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
    method, settings, steps = PIGG[name]
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
    sections = {}
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


def trl_variant(name, model_dir, data_dir, root, tokens) -> dict:
    """TRL's SFTTrainer with pigg's LoRA settings, no checkpointing, 8 workers and Liger, at the micro-batch
    and accumulation of TRL[name]."""
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
    micro_batch, grad_accum = TRL[name]
    args = SFTConfig(output_dir=str(root / name), per_device_train_batch_size=micro_batch,
                     gradient_accumulation_steps=grad_accum,
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
    result = dict(name=name, method="lora", settings=dict(workers=8, liger=True), micro_batch=micro_batch,
                  grad_accum=grad_accum, checkpointing=0, samples_per_s=round(rate, 2),
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
    f = C.FastConfig()
    collate = TrainCollator(load_processor(str(model_dir)), 8192, f.padding_mask, f.pad_to_multiple, torch.bfloat16,
                            supervised_index=f.logits_on_labels_only, grid_on_cpu=f.batched_vision_attention)
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help=f"what to run, in this order (default: all): {', '.join(VARIANTS)}")
    parser.add_argument("--json", default="train_throughput.json",
                        help="file name under $OUT for the results, rewritten after each variant (OUT unset: none)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    names, json_name = args.variants or VARIANTS, args.json
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
            elif name in TRL:
                results.append(trl_variant(name, model_dir, data_dir, root, tokens))
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
            mb = f"{r['micro_batch']}x{r['grad_accum']}"
            print(f"{r['name']:<34} {mb:>8} {r['checkpointing']:>5} {r['samples_per_s']:>9.2f} {r['peak_gib']:>8.1f} "
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
