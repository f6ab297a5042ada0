"""Where a step of pigg's default LoRA training goes on one GPU: torch.profiler over two optimizer
steps (after two warm-up steps) of `pigg.train.train()` on the real 8B architecture with random
weights and 1080x2400 screenshots. Prints the busiest CUDA kernels and the step's CUDA vs wall time
(a wall time well above the CUDA time means the GPU waits on Python, data or synchronisation), and
where the GPU waits: its idle gaps summed by the kernel that ends each one. With OUT set it also
writes the trace, gzipped, for chrome://tracing or Perfetto.

    PYTHONPATH=src python bench/profile_train_step.py [SETTING=VALUE ...]   # writes $OUT/profile_train_step.txt

Settings are train settings given as to the CLI, e.g. torch_compile=true; with any, the output file is
named after them (profile_train_step_torch_compile-true.txt).
"""
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback
import yaml

from phone_8b import phone_users_and_8b
from pigg import config as C
from pigg.train import train

START, STOP = 2, 4  # profile optimizer steps 3 and 4


class Profiler(TrainerCallback):
    def __init__(self):
        self.prof, self.wall = None, None

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        if state.global_step == START:
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True)
            self.prof.__enter__()
            self.wall = time.perf_counter()
        elif state.global_step == STOP:
            self.wall = time.perf_counter() - self.wall
            self.prof.__exit__(None, None, None)


def idle_gaps(kernels, rows: int = 15) -> str:
    """The GPU's idle time between kernels, summed by the kernel that ends the wait (gaps over 20 us)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name[:90]) for e in kernels)
    waits, counts = collections.Counter(), collections.Counter()
    busy_until = spans[0][1]
    for start, end, name in spans[1:]:
        if start - busy_until > 20:
            waits[name] += start - busy_until
            counts[name] += 1
        busy_until = max(busy_until, end)
    lines = [f"GPU idle over 2 steps: {sum(waits.values()) / 1e3:.1f} ms in gaps over 20 us, by the kernel after it:"]
    lines += [f"{us / 1e3:9.2f} ms {counts[name]:6d} x  {name}" for name, us in waits.most_common(rows)]
    return "\n".join(lines)


def main():
    root = Path(tempfile.mkdtemp(prefix="pigg_profile_"))
    model_dir, data_dir = phone_users_and_8b(root, 8, 12)
    cfg = C.RunConfig()
    cfg.model.name_or_path, cfg.model.random_weights = str(model_dir), True
    cfg.data.data_root, cfg.data.users = str(data_dir), "1-8"
    t = cfg.train
    t.max_steps, t.save_steps, t.learning_rate = STOP + 1, 10_000, 1e-4
    t.output_dir, t.log_dir = str(root / "out"), str(root / "logs")
    settings = sys.argv[1:]
    pairs = (setting.partition("=") for setting in settings)
    C.from_dict({"train": {key: yaml.safe_load(value) for key, _, value in pairs}}, cfg, source="command line")
    profiler = Profiler()
    train(cfg, callbacks=[profiler])
    events = profiler.prof.key_averages()
    # kernels only: an op's row repeats the time of the kernels it launched
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    cuda_total = sum(e.self_device_time_total for e in kernels) / 1e3 / (STOP - START)
    text = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    launched = [e for e in profiler.prof.events() if e.device_type == DeviceType.CUDA]
    shapes = profiler.prof.key_averages(group_by_input_shape=True)
    busiest = sorted((e for e in shapes if e.key in ("aten::copy_", "aten::add_", "aten::add")),
                     key=lambda e: -e.self_device_time_total)[:12]
    by_shape = "\n".join(f"{e.self_device_time_total / 1e3:9.2f} ms {e.count:6d} x  {e.key} {e.input_shapes}"
                         for e in busiest)
    summary = (f"optimizer step (8 samples): wall {1e3 * profiler.wall / (STOP - START):.0f} ms, "
               f"CUDA kernels {cuda_total:.0f} ms")
    report = "\n".join([text, "copies and sums by input shape (2 steps):", by_shape, idle_gaps(launched), summary])
    print(report)
    if os.environ.get("OUT"):
        name = "_".join(["profile_train_step", *(s.replace("=", "-") for s in settings)])
        Path(os.environ["OUT"], f"{name}.txt").write_text(report + "\n")
        profiler.prof.export_chrome_trace(str(Path(os.environ["OUT"], f"{name}.json.gz")))  # .gz: gzipped


if __name__ == "__main__":
    main()
