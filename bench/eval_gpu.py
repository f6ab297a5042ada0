"""pigg's evaluate() on the real Qwen3-VL-8B architecture (random weights) on one GPU.

Exactly 40 new tokens a sample (random weights never stop early) on phone screenshots of 1080x2400
(966 image tokens), through pigg's own path: data validation, DataLoader workers running the processor,
length-sorted batches, scoring, JSONL writes. The variants (`--parts`):

- seed_bs1 (`seed`): the seed's loop, one sample at a time through transformers' generate();
- current_bsN (`current`): transformers' generate() on left-padded batches (`--eval.fast_generation
  false`), at the largest batch size asked for;
- pigg_bsN (`pigg`): pigg.generation (the default), at each batch size asked for;
- pigg_noliger_bsN (`noliger`): the same without Liger's kernels in the prefill (`--fast.liger_kernel false`).

Each variant first runs one batch to warm up, then its timed samples: "samples/s" end to end (the
evaluate() call, DataLoader start included), "steady" from the first batch's answers to the last's.
current and pigg at the largest size answer the same samples in the same batches; their answers are
compared (exact text, parsed point). Then, on one batch, where the fast path's time goes (`levers`):
prefill with and without batched vision attention, Liger's kernels and cuDNN attention against
generate()'s prefill (one new token), and 39 decoding steps replayed as a CUDA graph against the same
steps run eagerly. `--trace` adds, per batch, the wait for the DataLoader and the prefill, cache and
decoding times.

    python bench/eval_gpu.py [BATCH_SIZE ...] [--batches 3] [--seed-samples 8] [--parts ...] [--json NAME]
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from phone_8b import phone_users_and_8b
from pigg import config as C
from pigg.data.collate import sample_length
from pigg.data.samples import load_samples
import pigg.evaluate as E
from pigg.evaluate import PromptCollator, evaluate, length_batches, prompt_and_truth, read_done
from pigg.generation import Generator, right_padded
from pigg.model.loading import load_model
from pigg.data.processor import load_processor

NEW_TOKENS = 40


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch_sizes", nargs="*", type=int, default=[128], metavar="BATCH_SIZE",
                        help="batch sizes of the fast path (default: 128); the current path runs at the largest")
    parser.add_argument("--batches", type=int, default=3, help="timed batches of each batched variant")
    parser.add_argument("--seed-samples", type=int, default=8, help="timed samples of the seed's loop")
    parser.add_argument("--parts", default="seed,current,pigg,levers",
                        help="which parts to run, of seed,current,pigg,noliger,levers")
    parser.add_argument("--json", default="eval_gpu.json", help="file name under $OUT for the results")
    parser.add_argument("--trace", action="store_true",
                        help="print where each batch's time goes (wait for the loader, prefill, cache, decoding)")
    parser.add_argument("--no-pin", action="store_true", help="the DataLoader without pinned memory")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers (default: 8)")
    return parser.parse_args(argv)


class Stamps:
    """When each batch's answers come back (wraps evaluate's one generation call); `started` holds when
    each call began, so the time between one call's end and the next one's start is the wait for the loader."""

    def __init__(self):
        self.times, self.started, self.real = [], [], E.generate_batch
        E.generate_batch = self

    def __call__(self, *args, **kw):
        self.started.append(time.time())
        out = self.real(*args, **kw)
        self.times.append((time.time(), len(out)))
        return out

    def clear(self):
        self.times.clear()
        self.started.clear()


class Trace:
    """Per batch of the fast path: the prefill (input copy included), taking the decoding state (a new
    one and its graph capture when the batch's shape is new) and decoding, each timed between two
    synchronisations (the decoding ends with one anyway), with the batch's rows and width."""

    def __init__(self):
        self.parts = []
        for name in ("prefill", "state_for", "decode"):
            self.wrap(name)

    def wrap(self, name):
        real = getattr(Generator, name)

        def timed_part(gen, *args, **kw):
            before = gen.state
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = real(gen, *args, **kw)
            torch.cuda.synchronize()
            part = {name: round(time.perf_counter() - t, 3)}
            if name == "prefill":
                part["rows"], part["width"] = args[0]["input_ids"].shape
            if name == "state_for":
                part["new_state"] = gen.state is not before
            self.parts.append(part)
            return out

        setattr(Generator, name, timed_part)

    def batches(self, stamps: Stamps, start: float) -> list[dict]:
        """One row per answered batch: its wait for the loader and its parts."""
        rows, parts = [], iter(self.parts)
        for k, (began, (ended, n)) in enumerate(zip(stamps.started, stamps.times)):
            row = {"batch": k, "samples": n, "wait_s": round(began - (stamps.times[k - 1][0] if k else start), 3)}
            for _ in range(3):
                row.update(next(parts, {}))
            row["total_s"] = round(ended - began, 3)
            rows.append(row)
        return rows


def run_variant(model, processor, samples, sizes, out: Path, bs: int, n: int, fast: bool, stamps: Stamps,
                trace: Trace | None = None, workers: int = 8, liger: bool | None = None) -> dict:
    evaluate(model, processor, samples[:bs], sizes, out / "warm", bs, NEW_TOKENS, workers, min_new_tokens=NEW_TOKENS,
             fast=fast, liger=liger)
    stamps.clear()
    if trace:
        trace.parts.clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.time()
    evaluate(model, processor, samples[:n], sizes, out / "run", bs, NEW_TOKENS, workers, min_new_tokens=NEW_TOKENS,
             fast=fast, liger=liger)
    torch.cuda.synchronize()
    dt = time.time() - t
    first = stamps.times[0][0]
    times = stamps.times
    steady = sum(k for _, k in times[1:]) / (times[-1][0] - times[0][0]) if len(times) > 1 else n / dt
    res = dict(batch_size=bs, samples=n, seconds=round(dt, 2), samples_per_s=round(n / dt, 2),
               steady_samples_per_s=round(steady, 2), first_answers_s=round(first - t, 2),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
               test_set_minutes_10063=round(10063 / steady / 60, 1))
    if trace and fast:
        res["batches"] = trace.batches(stamps, t)
        if hasattr(torch.cuda, "host_memory_stats"):  # pinned memory: how often and how long it was allocated
            res["host_memory"] = {k: v for k, v in torch.cuda.host_memory_stats().items()
                                  if k.startswith(("num_host_alloc", "host_alloc_time", "allocated_bytes.peak"))}
    return res


def agreement(a: Path, b: Path) -> dict:
    """How often two runs' answers to the same samples agree: exact text, parsed point, and the share of
    each answer's characters before the first difference."""
    ra = {(r["user"], r["index"]): r for rs in read_done(a / "run" / "predictions").values() for r in rs}
    rb = {(r["user"], r["index"]): r for rs in read_done(b / "run" / "predictions").values() for r in rs}
    keys = sorted(ra.keys() & rb.keys())

    def prefix(x, y):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        return n / max(len(x), len(y), 1)

    return dict(samples=len(keys), raw_equal=round(sum(ra[k]["raw"] == rb[k]["raw"] for k in keys) / len(keys), 4),
                point_equal=round(sum(ra[k]["pred_point"] == rb[k]["pred_point"] for k in keys) / len(keys), 4),
                parsed=sum(ra[k]["pred_point"] is not None for k in keys),
                common_prefix=round(sum(prefix(ra[k]["raw"], rb[k]["raw"]) for k in keys) / len(keys), 4))


def timed(fn, repeat: int = 2) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t) / repeat, 3)


def levers(model, processor, samples, sizes, bs: int) -> dict:
    """Where one batch's time goes, fast path against generate()."""
    prompts = [prompt_and_truth(s) for s in samples]
    batch_items = length_batches(prompts, [sample_length(processor, p, sizes)[0] for p, _ in prompts], bs)[0]
    batch, _ = PromptCollator(processor)(batch_items)
    res = {"batch_size": bs, "padding_tokens": int((batch["attention_mask"] == 0).sum())}
    res["generate_prefill_s"] = timed(lambda: E.generate_batch(model, processor, batch, 1, 1), 1)
    right, lengths = right_padded(PromptCollator(processor, fast=True, pixel_dtype=torch.bfloat16)(batch_items)[0])
    with torch.inference_mode():
        gen = Generator(model, processor, NEW_TOKENS, NEW_TOKENS)
        res["fast_prefill_s"] = timed(lambda: gen.prefill(right, lengths), 1)
        for switch, value, name in (("vision_batched", False, "stock_vision"),
                                    ("liger", not gen.liger, "liger" if not gen.liger else "no_liger"),
                                    ("cudnn", True, "cudnn"), ("cudnn", False, "no_cudnn")):
            before = getattr(gen, switch)
            setattr(gen, switch, value)
            res[f"fast_prefill_{name}_s"] = timed(lambda: gen.prefill(right, lengths), 1)
            setattr(gen, switch, before)
        logits, cache, deltas = gen.prefill(right, lengths)
        state = gen.state_for(len(lengths), right["input_ids"].shape[1])
        state.load(cache, lengths.to(gen.device), deltas, logits)
        del cache

        def steps(graph):
            state.index.zero_()
            for _ in range(NEW_TOKENS - 1):
                if graph:
                    state.replay()
                else:
                    state.step()

        res["decode_39_steps_graph_s"] = timed(lambda: steps(True))
        res["decode_39_steps_eager_s"] = timed(lambda: steps(False))
        res["fast_40_s"] = timed(lambda: gen(right), 1)
        gen.close()
    return res


def main(argv=None):
    args = parse_args(argv)
    parts = args.parts.split(",")
    bs = max(args.batch_sizes)
    n = bs * args.batches
    root = Path(tempfile.mkdtemp(prefix="pigg_eval_bench_"))
    t = time.time()
    folder, data_dir = phone_users_and_8b(root, 8, -(-n // 8) + 2, seed=1)
    print(f"synthesised in {time.time() - t:.0f}s; device {torch.cuda.get_device_name()}", flush=True)
    cfg = C.RunConfig()
    cfg.model.name_or_path, cfg.model.random_weights = str(folder), True
    cfg.data.data_root, cfg.data.users = str(data_dir), "1-8"
    samples, sizes = load_samples(cfg.data)
    processor = load_processor(str(folder), None, cfg.model.max_pixels)
    t = time.time()
    model = load_model(cfg.model, "cuda").eval()
    model.config.use_cache = True
    torch.cuda.synchronize()
    results = {"device": torch.cuda.get_device_name(), "new_tokens": NEW_TOKENS,
               "model_build_s": round(time.time() - t, 2)}
    stamps = Stamps()
    trace = Trace() if args.trace else None
    if args.no_pin:
        E.DataLoader = lambda *a, **kw: DataLoader(*a, **{**kw, "pin_memory": False})

    def save():
        if os.environ.get("OUT"):  # after each part: a later one failing keeps the others
            Path(os.environ["OUT"], args.json).write_text(json.dumps(results, indent=1) + "\n")

    runs = [("seed", "seed_bs1", 1, args.seed_samples, False, None),
            ("current", f"current_bs{bs}", bs, n, False, None)]
    runs += [(part, f"{name}_bs{size}", size, size * args.batches, True, liger) for part, name, liger in
             (("pigg", "pigg", None), ("noliger", "pigg_noliger", False)) for size in args.batch_sizes]
    for part, name, size, count, fast, liger in runs:
        if part in parts:
            results[name] = run_variant(model, processor, samples, sizes, root / name, size, count, fast, stamps, trace,
                                        args.workers, liger)
            print(json.dumps({name: results[name]}), flush=True)
            save()
    if "current" in parts and "pigg" in parts:
        results["agreement_current_fast"] = agreement(root / f"current_bs{bs}", root / f"pigg_bs{bs}")
        print(json.dumps({"agreement": results["agreement_current_fast"]}), flush=True)
        save()
    if "levers" in parts:
        results["levers"] = levers(model, processor, samples, sizes, bs)
        print(json.dumps({"levers": results["levers"]}), flush=True)
        save()
    print(f"\n{'variant':<19} {'batch':>5} {'samples/s':>9} {'steady':>7} {'first s':>7} {'peak GiB':>8} "
          f"{'10,063 samples':>15}")
    for _, name, *_ in runs:
        if name in results:
            r = results[name]
            print(f"{name:<19} {r['batch_size']:>5} {r['samples_per_s']:>9.2f} {r['steady_samples_per_s']:>7.2f} "
                  f"{r['first_answers_s']:>7.1f} {r['peak_gib']:>8.1f} {r['test_set_minutes_10063']:>11.1f} min")


if __name__ == "__main__":
    main()
