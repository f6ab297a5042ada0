"""Data-parallel training of the real Qwen3-VL-8B architecture (random weights) on this machine's GPUs,
through `pigg train --gpus` itself, against one GPU and against the seed's device_map="auto".

Every pigg variant is the command a user types (`python -m pigg.cli train ... --gpus 0,1`), run in a
subprocess on synthetic 1080x2400 screenshots: data validation, processor in DataLoader workers,
torchrun, DDP or FSDP2, the final consolidated save. Steps are timed from the TensorBoard events the
run writes (one per optimizer step; the first step is not timed, the rate is the effective batch over the
median step) and peak memory is the run's own
`peak_gpu_gib` log (largest over the processes). Variants, in this order; the whole run keeps to
--budget (8 minutes), so the last ones may be skipped or cut short, and say so:

  lora_1gpu             LoRA on one GPU (pigg's default plan): the reference for scaling
  lora_ddp_{N}gpu       LoRA, DDP over all N GPUs, effective batch 8 (the default rule: a smaller
                        micro-batch per GPU as N grows)
  full_fsdp_{N}gpu      full fine-tuning, FSDP2 over N GPUs, effective batch 8
  lora_ddp_{N}gpu_weak  LoRA, DDP, 8 samples per GPU per step (effective 8N): scaling with the same
                        per-GPU work as one GPU
  (with 4 or more GPUs also lora_ddp_2gpu and full_fsdp_2gpu)
  seed_devicemap_2gpu   the seed's full fine-tuning: device_map="auto" over GPUs 0,1 (one GPU works at a
                        time), batch 1 x accumulation 8, checkpointing, on pre-made batches

MFU per GPU is bench/flops.py's.

    PYTHONPATH=src python bench/train_multi_gpu.py [--budget 480] [--steps 10] [variant ...]

Writes bench/results/train_multi_gpu_{N}gpu.json (and $OUT/ when set) after every variant, so one
variant failing or a run cut short keeps the others' results.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flops import mfu

REPO = Path(__file__).resolve().parent.parent
USERS = "1-8"
SEED_DEVICEMAP_STEPS = 4  # 8 samples a step at ~2.4 samples/s


@dataclass
class Variant:
    name: str
    method: str
    gpus: int
    effective_batch: int = 8
    devicemap: bool = False  # the seed's recipe instead of pigg


def variants(n: int) -> list[Variant]:
    chosen = [Variant("lora_1gpu", "lora", 1)]
    if n >= 2:
        chosen += [Variant(f"lora_ddp_{n}gpu", "lora", n), Variant(f"full_fsdp_{n}gpu", "full", n),
                   Variant(f"lora_ddp_{n}gpu_weak", "lora", n, effective_batch=8 * n)]
    if n >= 4:
        chosen += [Variant("lora_ddp_2gpu", "lora", 2), Variant("full_fsdp_2gpu", "full", 2)]
    if n >= 2:
        chosen.append(Variant("seed_devicemap_2gpu", "full", 2, devicemap=True))
    return chosen


# ---- one pigg variant ---------------------------------------------------------------------------

def pigg_command(v: Variant, model_dir: Path, data_dir: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "pigg.cli", "train", "--model", str(model_dir), "--model.random_weights", "true",
            "--data-root", str(data_dir), "--users", USERS, f"--{v.method}",
            "--gpus", ",".join(str(i) for i in range(v.gpus)), "--effective-batch", str(v.effective_batch),
            "--max-steps", str(steps), "--save-steps", "100000", "--train.logging_steps", "1", "--lr", "1e-5",
            "--output-dir", str(out), "--train.log_dir", str(out / "logs")]


def run_logged(cmd: list[str], log: Path, timeout: float, env=None) -> int:
    """Run `cmd` with its output in `log`; on timeout kill its whole process group (torchrun's workers too)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9


def step_log(folder: Path) -> dict[str, list]:
    """Per optimizer step: wall time and peak memory, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    loss = sorted(events.Scalars("train/loss"), key=lambda e: e.step)
    peak = [e.value for e in events.Scalars("train/peak_gpu_gib")] if "train/peak_gpu_gib" in tags else []
    return {"steps": [e.step for e in loss], "wall": [e.wall_time for e in loss], "loss": [e.value for e in loss],
            "peak_gib": peak}


def run_pigg(v: Variant, model_dir: Path, data_dir: Path, root: Path, steps: int, timeout: float) -> dict:
    try:
        return measure_pigg(v, model_dir, data_dir, root, steps, timeout)
    finally:
        shutil.rmtree(root / v.name, ignore_errors=True)  # a full fine-tuning output is ~17 GB: free the disk


def measure_pigg(v: Variant, model_dir: Path, data_dir: Path, root: Path, steps: int, timeout: float) -> dict:
    out = root / v.name
    log = root / f"{v.name}.log"
    started = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    code = run_logged(pigg_command(v, model_dir, data_dir, out, steps), log, timeout, env)
    result = dict(wall_s=round(time.time() - started, 1), returncode=code)
    text = log.read_text(errors="replace")
    if code != 0:
        return {**result, "error": "timed out" if code == -9 else "failed", "log_tail": text[-3000:]}
    folder = out / f"global_agent_{v.method}"
    timing = step_log(folder)
    tokens = float(re.search(r"tokens per sample: min \d+, mean (\d+)", text).group(1))
    steps_s = [b - a for a, b in zip(timing["wall"], timing["wall"][1:])]
    dt = statistics.median(steps_s)
    sps = v.effective_batch / dt
    plan = re.search(r"^batch plan: (.*)", text, re.M)
    processes = re.search(r"^processes: (.*)", text, re.M)
    saved = (folder / "model.safetensors").is_file() or (folder / "adapter_model.safetensors").is_file()
    return {**result, "samples_per_s": round(sps, 2), "sec_per_optimizer_step": round(dt, 3),
            "peak_gib_per_gpu": max(timing["peak_gib"]) if timing["peak_gib"] else None,
            "mfu_per_gpu": round(mfu(v.method, sps, tokens, v.gpus), 3), "tokens_per_sample": tokens,
            "timed_steps": len(steps_s), "step_seconds": [round(x, 3) for x in steps_s],
            "losses": [round(x, 3) for x in timing["loss"]],
            "batch_plan": plan.group(1) if plan else None, "processes": processes.group(1) if processes else None,
            "final_weights_saved": saved, "epoch_hours_90727": round(90727 / sps / 3600, 2)}


# ---- the seed's device_map="auto" baseline --------------------------------------------------------

def run_devicemap(v: Variant, model_dir: Path, data_dir: Path, root: Path, steps: int, timeout: float) -> dict:
    log = root / f"{v.name}.log"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(v.gpus)),
           "PYTHONPATH": str(REPO / "src")}
    started = time.time()
    code = run_logged([sys.executable, __file__, "--devicemap-child", str(model_dir), str(data_dir), str(steps)],
                      log, timeout, env)
    text = log.read_text(errors="replace")
    result = dict(wall_s=round(time.time() - started, 1), returncode=code)
    found = [line for line in text.splitlines() if line.startswith("{")]
    if code != 0 or not found:
        return {**result, "error": "timed out" if code == -9 else "failed", "log_tail": text[-3000:]}
    measured = json.loads(found[-1])
    return {**result, **measured,
            "mfu_per_gpu": round(mfu("full", measured["samples_per_s"], measured["tokens_per_sample"], v.gpus), 3),
            "epoch_hours_90727": round(90727 / measured["samples_per_s"] / 3600, 2)}


def devicemap_child(model_dir: str, data_dir: str, steps: int) -> None:
    """The seed's multi-GPU full fine-tuning: the model spread over the visible GPUs as
    from_pretrained(device_map="auto") does, batch 1, accumulation 8, checkpointing, AdamW."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    from pigg.data.collate import TrainCollator
    from pigg.config import SEED_MAX_PIXELS, DataConfig
    from pigg.data.samples import load_samples
    from pigg.data.processor import load_processor

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda:0"):  # random init on one GPU, then spread as device_map="auto" would
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    nosplit = model._no_split_modules
    memory = get_balanced_memory(model, no_split_module_classes=nosplit, dtype=torch.bfloat16)
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=nosplit, dtype=torch.bfloat16)
    for name, where in device_map.items():
        (model.get_submodule(name) if name else model).to(f"cuda:{where}")
    model = dispatch_model(model, device_map=device_map)
    model.model.visual.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.01,
                                  fused=True)
    samples, _ = load_samples(DataConfig(data_root=data_dir, users=USERS))
    collate = TrainCollator(load_processor(model_dir, max_pixels=SEED_MAX_PIXELS), 8192)
    batches = [{k: v.to("cuda:0") for k, v in collate([s]).items()} for s in samples[:8]]  # pre-made: free data
    for b in batches:
        b["pixel_values"] = b["pixel_values"].to(torch.bfloat16)
    tokens = sum(b["input_ids"].shape[1] for b in batches) / len(batches)

    def step():
        for b in batches:
            (model(**b).loss / len(batches)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)

    step()  # warm-up, not timed
    synchronize()
    started = time.perf_counter()
    for _ in range(steps - 1):
        step()
    synchronize()
    dt = (time.perf_counter() - started) / (steps - 1)
    print(json.dumps(dict(samples_per_s=round(len(batches) / dt, 2), sec_per_optimizer_step=round(dt, 3),
                          peak_gib_per_gpu=[round(torch.cuda.max_memory_allocated(i) / 2**30, 1)
                                            for i in range(torch.cuda.device_count())],
                          devices_used=sorted(set(device_map.values())), tokens_per_sample=tokens,
                          timed_steps=steps - 1)), flush=True)


# ---- the whole benchmark ------------------------------------------------------------------------

def gpu_names() -> list[str]:
    try:  # nvidia-smi rather than torch: a CUDA context here would take memory from GPU 0's runs
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def prepare(root: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO / "src"))
    from phone_8b import phone_users_and_8b

    return phone_users_and_8b(root, 8, 12)


def add_scaling(results: list[dict]) -> None:
    one = next((r for r in results if r["name"] == "lora_1gpu" and "samples_per_s" in r), None)
    for r in results:
        if one and r["method"] == "lora" and "samples_per_s" in r:
            r["scaling_efficiency_vs_1gpu"] = round(r["samples_per_s"] / (r["gpus"] * one["samples_per_s"]), 3)


def write(results: list[dict], n: int, names: list[str], started: float) -> None:
    add_scaling(results)
    import torch

    record = dict(gpus=n, device=names, torch=torch.__version__, wall_s=round(time.time() - started, 1),
                  results=results)
    text = json.dumps(record, indent=1) + "\n"
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / f"train_multi_gpu_{n}gpu.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"train_multi_gpu_{n}gpu.json").write_text(text)


def print_table(results: list[dict]) -> None:
    print(f"\n{'variant':<22} {'GPUs':>4} {'samples/s':>9} {'s/step':>7} {'peak GiB/GPU':>13} {'MFU/GPU':>8} "
          f"{'scaling':>8} {'epoch h':>8}")
    for r in results:
        if "samples_per_s" not in r:
            print(f"{r['name']:<22} {r['gpus']:>4}   {r.get('error', 'skipped')}")
            continue
        peak = r["peak_gib_per_gpu"]
        peak = "/".join(f"{p:.1f}" for p in peak) if isinstance(peak, list) else "-" if peak is None else f"{peak:.1f}"
        scaling = f"{100 * r['scaling_efficiency_vs_1gpu']:.0f}%" if "scaling_efficiency_vs_1gpu" in r else "-"
        print(f"{r['name']:<22} {r['gpus']:>4} {r['samples_per_s']:>9.2f} {r['sec_per_optimizer_step']:>7.2f} "
              f"{peak:>13} {100 * r['mfu_per_gpu']:>7.1f}% {scaling:>8} {r['epoch_hours_90727']:>8.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="names to run (default: all that suit this machine)")
    parser.add_argument("--budget", type=float, default=480,
                        help="seconds for the whole run; a variant gets what is left (at most --timeout) and none "
                             "starts with less than a minute left")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per pigg variant (the first untimed)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one variant may take")
    parser.add_argument("--devicemap-child", nargs=3, metavar=("MODEL", "DATA", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.devicemap_child:
        model_dir, data_dir, steps = args.devicemap_child
        return devicemap_child(model_dir, data_dir, int(steps))

    started = time.time()
    names = gpu_names()
    n = len(names)
    if n == 0:
        sys.exit("no GPU found (nvidia-smi lists none)")
    chosen = [v for v in variants(n) if not args.variants or v.name in args.variants]
    print(f"{n} x {names[0]}; variants: {', '.join(v.name for v in chosen)}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="pigg_multi_gpu_"))
    model_dir, data_dir = prepare(root)
    print(f"synthesised 1080x2400 users and the 8B config in {time.time() - started:.0f}s", flush=True)
    results = []
    for v in chosen:
        left = args.budget - (time.time() - started)
        record = {**asdict(v)}
        if left < 60:
            record["error"] = f"skipped: less than a minute of the {args.budget:.0f}s budget left"
        else:
            run = run_devicemap if v.devicemap else run_pigg
            steps = SEED_DEVICEMAP_STEPS if v.devicemap else args.steps
            try:
                record.update(run(v, model_dir, data_dir, root, steps, min(args.timeout, left)))
            except Exception as e:  # one variant's surprise must not lose the others' results
                record["error"] = f"{type(e).__name__}: {e}"
        results.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "log_tail"}), flush=True)
        if "log_tail" in record:
            print(record["log_tail"][-1500:], flush=True)
        write(results, n, names, started)
    shutil.rmtree(root, ignore_errors=True)
    print_table(results)


if __name__ == "__main__":
    main()
