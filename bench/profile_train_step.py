"""Where a step of pigg's default LoRA training goes on one GPU: torch.profiler over two optimizer
steps (after two warm-up steps) of `pigg.train.train()` on the real 8B architecture with random
weights and 1080x2400 screenshots. Prints the busiest CUDA kernels and the step's CUDA vs wall time
(a wall time well above the CUDA time means the GPU waits on Python, data or synchronisation), and
where the GPU waits: its idle gaps summed by the kernel that ends each one and by what the CPU thread
that launched that kernel was doing meanwhile (from the trace), and what the caching allocator did (a retry frees
cached blocks and synchronises the device). With OUT set it also writes the trace there (else in a temporary
folder), gzipped, for chrome://tracing or Perfetto.

    python bench/profile_train_step.py [SECTION.SETTING=VALUE ...] [--stack] [--gpu-only]
    # writes $OUT/profile_train_step[...].txt and .json.gz when OUT is set

Settings are given as in a YAML file, e.g. train.gpu_memory_gib=79.2 or fast.torch_compile=true (a bare
name is a train setting); with any, the output files are named after them
(profile_train_step_train.gpu_memory_gib-79.2.txt). --stack records Python's calls too (with_stack=True:
"python_function" events in the trace), adds _stack to the file names and prints the Python functions with
the most self time; with Python's calls recorded a step's Python takes far longer than without, so read
its gaps as where Python runs, not as what it costs unprofiled. --gpu-only records the GPU's activity alone
(no CPU ops or shapes), adds _gpu_only to the file names and names each long gap by the device ops before
and after it instead of the CPU's work. Any profiling lengthens a step: compare rates with
bench/train_throughput.py, not with this.
"""
import argparse
import bisect
import collections
import gzip
import json
import os
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
ALLOCATOR_COUNTS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
DEVICE_CATS = {"kernel", "gpu_memset", "gpu_memcpy"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
CPU_CATS = {"cpu_op", "python_function", "user_annotation", "cuda_runtime"}
MIN_GAP_US = 20
NO_OP = "(no op: Python or other threads)"
NO_LAUNCH = "(launch not in the trace)"


class Profiler(TrainerCallback):
    def __init__(self, with_stack: bool = False, gpu_only: bool = False):
        self.with_stack, self.gpu_only = with_stack, gpu_only
        self.prof, self.wall, self.memory = None, None, {}

    def on_step_end(self, args, state, control, **kw):
        if state.global_step in (START, STOP):  # only there: a wait at every step would idle the GPU
            torch.cuda.synchronize()
        if state.global_step == START:
            self.memory["start"] = torch.cuda.memory_stats()
            activities = [ProfilerActivity.CUDA] if self.gpu_only else [ProfilerActivity.CPU, ProfilerActivity.CUDA]
            self.prof = profile(activities=activities, record_shapes=not self.gpu_only, with_stack=self.with_stack)
            self.prof.__enter__()
            self.wall = time.perf_counter()
        elif state.global_step == STOP:
            self.wall = time.perf_counter() - self.wall
            self.prof.__exit__(None, None, None)
            self.memory["end"] = torch.cuda.memory_stats()


def allocator_counts(start: dict, end: dict) -> str:
    """How often the caching allocator retried (freed its cache at the memory cap and synchronised the device),
    asked the device for memory and gave it back, between two `torch.cuda.memory_stats()`."""
    counts = ", ".join(f"{key} {end.get(key, 0) - start.get(key, 0)}" for key in ALLOCATOR_COUNTS)
    return f"caching allocator over {STOP - START} steps: {counts}"


def device_gaps(events: list) -> list:
    """The GPU's idle gaps over MIN_GAP_US between its kernels, memsets and memcpys (all streams together),
    as (start, end, the device event that ends the gap), in time order."""
    ops = sorted((e for e in events if e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"])
    gaps, busy_until = [], ops[0]["ts"] if ops else 0.0
    for e in ops:
        if e["ts"] - busy_until > MIN_GAP_US:
            gaps.append((busy_until, e["ts"], e))
        busy_until = max(busy_until, e["ts"] + e.get("dur", 0))
    return gaps


def thread_stretches(events: list):
    """Yield (start, end, stack) for the stretches of one thread's time line, from -inf to inf, over which
    its open events do not change; stack names the innermost open event and up to 3 enclosing ones,
    innermost first (the innermost is the one opened last, the shorter one of two opened together)."""
    events = sorted((e for e in events if e.get("dur", 0) > 0), key=lambda e: (e["ts"], -e["dur"]))
    # at one time an event's end comes before another's start; starts in the order above
    points = sorted([(e["ts"], 1, i) for i, e in enumerate(events)]
                    + [(e["ts"] + e["dur"], 0, i) for i, e in enumerate(events)])
    open_events, last = [], float("-inf")
    for t, opens, i in points:
        if t > last:
            yield last, t, tuple(events[j]["name"][:60] for j in reversed(open_events[-4:]))
            last = t
        if opens:
            open_events.append(i)
        else:
            open_events.remove(i)
    yield last, float("inf"), ()


def split_gaps(stretches, gaps: list):
    """Yield (gap, us, stack) for each overlap of time-ordered stretches (start, end, stack) with
    time-ordered disjoint gaps (start, end, gap); a gap's first overlap is the stretch at its start."""
    first = 0
    for start, end, stack in stretches:
        while first < len(gaps) and gaps[first][1] <= start:
            first += 1
        for i in range(first, len(gaps)):
            gap_start, gap_end, gap = gaps[i]
            if gap_start >= end:
                break
            overlap = min(end, gap_end) - max(start, gap_start)
            if overlap > 0:
                yield gap, overlap, stack


def tally(shares: list, rows: int) -> list:
    """Lines for the `rows` keys with the most time in (gap, key, us) shares: ms and the number of gaps."""
    total, gaps = collections.Counter(), collections.Counter()
    for _, key, us in shares:
        total[key] += us
    gaps.update(key for _, key in {(gap, key) for gap, key, _ in shares})
    return [f"{us / 1e3:9.2f} ms {gaps[key]:6d} x  {key}" for key, us in total.most_common(rows)]


def gap_neighbours(trace: dict, rows: int = 20) -> str:
    """The GPU's idle gaps over MIN_GAP_US summed by the device op before each and listed longest first
    with the ops on either side: where in the step the GPU waits, from a trace of its activity alone."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gaps = device_gaps(events)
    if not gaps:
        return f"GPU idle: no gaps over {MIN_GAP_US} us"
    ops = sorted((e for e in events if e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"] + e.get("dur", 0))
    ends = [e["ts"] + e.get("dur", 0) for e in ops]
    before = [ops[max(0, bisect.bisect_right(ends, start) - 1)] for start, _, _ in gaps]
    idle = sum(end - start for start, end, _ in gaps)
    origin = min(e["ts"] for e in ops)
    lines = [f"GPU idle: {idle / 1e3:.2f} ms in {len(gaps)} gaps over {MIN_GAP_US} us",
             "by the device op before the gap (ms, gaps):",
             *tally([(i, op["name"][:90], end - start) for i, ((start, end, _), op) in enumerate(zip(gaps, before))],
                    rows),
             "longest gaps: start (ms from the first kernel), length (ms), op before | op after"]
    for i in sorted(range(len(gaps)), key=lambda i: gaps[i][0] - gaps[i][1])[:rows]:
        start, end, after = gaps[i]
        lines.append(f"{(start - origin) / 1e3:9.3f} {(end - start) / 1e3:8.3f}  {before[i]['name'][:60]}  |  "
                     f"{after['name'][:60]}")
    return "\n".join(lines)


def idle_cpu(trace: dict, rows: int = 20) -> str:
    """What the CPU did while the GPU sat idle, from a Chrome trace of torch.profiler: each idle gap over
    MIN_GAP_US is split over the innermost CPU event open at each moment on the thread that launched the
    kernel ending the gap, and summed by that event's name and by its stack (it and 3 enclosing events).
    Also how late those launches came (after the gap began), and the longest gaps."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gaps = device_gaps(events)
    if not gaps:
        return f"GPU idle: no gaps over {MIN_GAP_US} us"
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    launch = [launches.get(op.get("args", {}).get("correlation")) for _, _, op in gaps]
    late = [None if run is None or run["ts"] <= start else run["ts"] - start
            for (start, _, _), run in zip(gaps, launch)]
    by_thread = collections.defaultdict(list)
    for i, ((start, end, _), run) in enumerate(zip(gaps, launch)):
        if run is not None:
            by_thread[run["pid"], run["tid"]].append((start, end, i))
    cpu = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in CPU_CATS and (e.get("pid"), e.get("tid")) in by_thread:
            cpu[e["pid"], e["tid"]].append(e)
    names, stacks, at_start = [], [], {}
    for thread, thread_gaps in by_thread.items():
        for gap, us, stack in split_gaps(thread_stretches(cpu[thread]), thread_gaps):
            at_start.setdefault(gap, stack)
            names.append((gap, stack[0] if stack else NO_OP, us))
            stacks.append((gap, " < ".join(stack) if stack else NO_OP, us))
    for gap, run in enumerate(launch):
        if run is None:
            names.append((gap, NO_LAUNCH, gaps[gap][1] - gaps[gap][0]))
            stacks.append(names[-1])
    idle = sum(end - start for start, end, _ in gaps)
    lates = [us for us in late if us is not None]
    lines = [f"GPU idle: {idle / 1e3:.2f} ms in {len(gaps)} gaps over {MIN_GAP_US} us; the kernel after the gap "
             f"launched after it began in {len(lates)} gaps, {sum(lates) / 1e3:.2f} ms late in all",
             "by the kernel after the gap (ms, gaps):",
             *tally([(i, op["name"][:90], end - start) for i, (start, end, op) in enumerate(gaps)], rows),
             "CPU on the launching thread during the gaps, by the innermost event (ms, gaps):",
             *tally(names, rows),
             "the same by stack (innermost < 3 enclosing events):",
             *tally(stacks, rows),
             "longest gaps: start (ms from the first kernel), length and lateness of the launch (ms), "
             "kernel after, stack at the start"]
    origin = min(e["ts"] for e in events if e.get("cat") in DEVICE_CATS)
    for i in sorted(range(len(gaps)), key=lambda i: gaps[i][0] - gaps[i][1])[:10]:
        start, end, op = gaps[i]
        lateness = "-" if late[i] is None else f"{late[i] / 1e3:.3f}"
        stack = " < ".join(at_start.get(i, ())) or (NO_OP if launch[i] else NO_LAUNCH)
        lines.append(f"{(start - origin) / 1e3:9.3f} {(end - start) / 1e3:8.3f} {lateness:>8}  "
                     f"{op['name'][:60]}  |  {stack}")
    return "\n".join(lines)


def python_self_time(trace: dict, rows: int = 25) -> str:
    """With --stack: the Python functions with the most self time (their time less that of the events
    they enclose, ops included) on the thread that launched the most kernels, by function and caller.
    A call that waits for another thread counts its wait: autograd's backward (`run_backward`) runs and
    launches on a thread of its own."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    threads = collections.Counter((e["pid"], e["tid"]) for e in events if e.get("cat") in LAUNCH_CATS)
    if not threads:
        return "Python self time: no launches in the trace"
    main_thread = threads.most_common(1)[0][0]
    ordered = sorted((e for e in events if e.get("cat") in CPU_CATS and (e["pid"], e["tid"]) == main_thread),
                     key=lambda e: (e["ts"], -e.get("dur", 0)))
    self_us, callers, stack = collections.Counter(), {}, []
    for e in ordered:
        while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) <= e["ts"]:
            stack.pop()
        if stack and id(stack[-1]) in callers:  # a Python call's time less what it encloses
            self_us[id(stack[-1])] -= e.get("dur", 0)
        if e.get("cat") == "python_function":
            self_us[id(e)] += e.get("dur", 0)
            callers[id(e)] = (e["name"][:70], stack[-1]["name"][:70] if stack else "")
        stack.append(e)
    by_key = collections.Counter()
    for key, us in self_us.items():
        by_key[callers[key]] += us
    total = sum(by_key.values())
    lines = [f"Python self time on the launching thread: {total / 1e3:.2f} ms over {STOP - START} steps; "
             "the most, by function < caller (ms):"]
    lines += [f"{us / 1e3:9.2f} ms  {name} < {caller}" for (name, caller), us in by_key.most_common(rows)]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", metavar="SECTION.SETTING=VALUE",
                        help="config settings of the profiled run (a bare name: a train setting)")
    parser.add_argument("--stack", action="store_true", help="record Python's calls and list their self time")
    parser.add_argument("--gpu-only", action="store_true", help="record the GPU's activity alone")
    args = parser.parse_args(argv)
    bad = [s for s in args.settings if "=" not in s]
    if bad:
        parser.error(f"settings are SECTION.SETTING=VALUE, got: {', '.join(bad)}")
    return args


def settings_dict(settings: list[str]) -> dict:
    """{section: {field: value}} from SECTION.SETTING=VALUE strings, values read as YAML."""
    sections = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        section, _, field = key.rpartition(".")
        sections.setdefault(section or "train", {})[field] = yaml.safe_load(value)
    return sections


def main(argv=None):
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="pigg_profile_"))
    model_dir, data_dir = phone_users_and_8b(root, 8, 12)
    cfg = C.RunConfig()
    cfg.model.name_or_path, cfg.model.random_weights = str(model_dir), True
    cfg.data.data_root, cfg.data.users = str(data_dir), "1-8"
    t = cfg.train
    t.max_steps, t.save_steps, t.learning_rate = STOP + 1, 10_000, 1e-4
    t.output_dir, t.log_dir = str(root / "out"), str(root / "logs")
    settings, with_stack, gpu_only = args.settings, args.stack, args.gpu_only
    C.from_dict(settings_dict(settings), cfg, source="command line")
    profiler = Profiler(with_stack, gpu_only)
    train(cfg, callbacks=[profiler])
    events = profiler.prof.key_averages()
    # kernels only: an op's row repeats the time of the kernels it launched
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    cuda_total = sum(e.self_device_time_total for e in kernels) / 1e3 / (STOP - START)
    text = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    shapes = profiler.prof.key_averages(group_by_input_shape=True)
    busiest = sorted((e for e in shapes if e.key in ("aten::copy_", "aten::add_", "aten::add")),
                     key=lambda e: -e.self_device_time_total)[:12]
    by_shape = "\n".join(f"{e.self_device_time_total / 1e3:9.2f} ms {e.count:6d} x  {e.key} {e.input_shapes}"
                         for e in busiest)
    summary = (f"optimizer step (8 samples): wall {1e3 * profiler.wall / (STOP - START):.0f} ms, "
               f"CUDA kernels {cuda_total:.0f} ms")
    flagged = [flag for flag, on in (("gpu_only", gpu_only), ("stack", with_stack)) if on]
    name = "_".join(["profile_train_step", *(s.replace("=", "-") for s in settings), *flagged])
    trace = Path(os.environ.get("OUT") or root, f"{name}.json.gz")
    profiler.prof.export_chrome_trace(str(trace))  # .gz: gzipped
    with gzip.open(trace, "rt") as f:
        trace_events = json.load(f)
    cpu = (gap_neighbours if gpu_only else idle_cpu)(trace_events)
    if with_stack:
        cpu += "\n" + python_self_time(trace_events)
    report = "\n".join([text, "copies and sums by input shape (2 steps):", by_shape, summary,
                        allocator_counts(profiler.memory["start"], profiler.memory["end"]), cpu])
    print(report)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{name}.txt").write_text(report + "\n")


if __name__ == "__main__":
    main()
