"""Evaluation: greedy answers on held-out users, scored for Click Acc@140 and friends.

One `evaluate()` serves the zero-shot, global and personalized models. Prompts are sorted by
length and answered in batches, by default through `pigg.generation` (no padding mask, a static
cache, the decoding step replayed as a CUDA graph); `fast=False` keeps transformers' generate() on
left-padded batches (decoder-only generation continues from the last position). Predictions are
appended to per-user JSONL files as batches finish, so an interrupted evaluation resumes without
redoing finished samples.

With several processes (`pigg eval --gpus 0,1`) every rank forms the same length-sorted batches and
takes every world-th one (the same batches, hence the same answers, as one process), writes its
predictions under `predictions/rank{r}/`, and rank 0 gathers them into the per-user files and writes
metrics.json once all ranks are done.
"""
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pigg import config as C
from pigg.data.collate import render, rope_positions, sample_length
from pigg.data.samples import Sample, images_of, load_samples, open_image
from pigg.distributed import barrier, end_process_group, is_main, rank, start_process_group, world_size
from pigg.generation import Generator, released
import pigg.grounding.metrics as M


def prompt_and_truth(sample: Sample) -> tuple[Sample, str]:
    """The sample up to its last assistant turn, and that turn's text (the ground truth)."""
    *context, answer = sample.messages
    truth = "".join(item["text"] for item in answer["content"] if item["type"] == "text")
    return Sample(sample.user, sample.index, sample.source, context), truth


def command_of(prompt: Sample) -> str:
    texts = [item["text"] for item in prompt.messages[-1]["content"] if item["type"] == "text"]
    return texts[-1] if texts else ""


class PromptCollator:
    """Prompt batches plus the samples they came from (runs in DataLoader workers). Left-padded for
    transformers' generate(); for `pigg.generation` (`fast`), right-padded with the rotary positions
    the model would compute without a mask (`rope_positions`) and the pixels in `pixel_dtype`, so the
    GPU neither waits for the positions nor copies float32 pixels."""

    def __init__(self, processor, fast: bool = False, pixel_dtype: torch.dtype | None = None):
        self.processor, self.fast, self.pixel_dtype = processor, fast, pixel_dtype

    def __call__(self, items: list[tuple[Sample, str]]):
        texts = [render(self.processor, p.messages, add_generation_prompt=True) for p, _ in items]
        images = [open_image(ref) for p, _ in items for ref in images_of(p)]
        side = "right" if self.fast else "left"
        batch = dict(self.processor(text=texts, images=images, padding=True, padding_side=side, return_tensors="pt"))
        if self.fast:
            grids = batch.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long))
            batch["position_ids"] = rope_positions(batch["mm_token_type_ids"], grids,
                                                   self.processor.image_processor.merge_size)
            if self.pixel_dtype is not None and "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(self.pixel_dtype)
        return batch, items


def split(batches: list[list], pieces: int) -> tuple[list[list], list[int]]:
    """Every batch cut into up to `pieces` smaller ones, and how many each batch became. Each DataLoader
    worker prepares one piece, so a batch is ready after a fraction of one worker's time for a whole
    batch (the processor takes 0.1-0.2 s a 1080x2400 screenshot on one core: 13-26 s for 128); `joined`
    puts the pieces back together before they are answered, so no batch is answered short."""
    if pieces < 2:
        return batches, [1] * len(batches)
    steps = [-(-len(batch) // pieces) for batch in batches]
    cut = [[batch[k:k + step] for k in range(0, len(batch), step)] for batch, step in zip(batches, steps)]
    return [piece for parts in cut for piece in parts], [len(parts) for parts in cut]


def widened(batch: dict, width: int, pad_id: int) -> dict:
    """A right-padded batch with padding added up to `width` columns: pad tokens outside the attention
    mask, and rotary positions (`position_ids`, if given) that continue each row's as text, as
    `pigg.data.collate.rope_positions` gives the padding it finds."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0}
    out = {}
    for key, value in batch.items():
        if key in fill:
            value = F.pad(value, (0, extra), value=fill[key])
        elif key == "position_ids":  # (3, rows, width)
            value = torch.cat([value, value[:, :, -1:] + torch.arange(1, extra + 1)], 2)
        elif key not in ("pixel_values", "image_grid_thw"):
            raise ValueError(f"eval: cannot pad a batch holding {key!r}")
        out[key] = value
    return out


def join(parts: list[tuple[dict, list]], pad_id: int, device=None) -> tuple[dict, list]:
    """One right-padded batch (`PromptCollator(fast=True)`'s) of several, rows in order: rows are padded
    to the widest (`widened`). The pixels are copied piece by piece into one tensor on
    `device` (default: where they are), the way they go anyway, rather than joined on the CPU first."""
    if len(parts) == 1:
        return parts[0]
    width = max(batch["input_ids"].shape[1] for batch, _ in parts)
    batches = [widened(batch, width, pad_id) for batch, _ in parts]
    out = {key: torch.cat([b[key] for b in batches], 1 if key == "position_ids" else 0)
           for key in batches[0] if key != "pixel_values"}
    if "pixel_values" in batches[0]:
        pieces = [b["pixel_values"] for b in batches]
        pixels = pieces[0].new_empty((sum(len(p) for p in pieces), *pieces[0].shape[1:]), device=device)
        for piece, into in zip(pieces, pixels.split([len(p) for p in pieces])):
            into.copy_(piece, non_blocking=True)
        out["pixel_values"] = pixels
    return out, [item for _, items in parts for item in items]


def joined(loader, counts: list[int], pad_id: int, device=None):
    """The loader's pieces joined back into the batches they were cut from (`split`'s counts)."""
    pieces = iter(loader)
    for count in counts:
        yield join([next(pieces) for _ in range(count)], pad_id, device)


def length_batches(prompts: list[tuple[Sample, str]], lengths: list[int], batch_size: int) -> list[list]:
    """Batches of similar length, longest first (an out-of-memory shows up at once, not at the end)."""
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [[prompts[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]


def read_done(pred_dir: Path) -> dict[int, list[dict]]:
    """Records already written; a line cut short by an interruption (or repeated by one while gathering
    ranks' files) is dropped and the file repaired. A clean file is only read."""
    done = {}
    for path in sorted(pred_dir.glob("user_*.jsonl")):
        records, good, seen = [], [], set()
        lines = path.read_text().splitlines()
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                print(f"WARNING: {path}: dropping a line cut short by an interruption")
                continue
            if record["index"] not in seen:
                seen.add(record["index"])
                records.append(record)
                good.append(line)
        if len(good) != len(lines):
            path.write_text("".join(g + "\n" for g in good))
        if records:
            done[records[0]["user"]] = records
    return done


def share_dir(pred_dir: Path, rank: int) -> Path:
    """Where one rank of a data-parallel evaluation appends its predictions (no file has two writers)."""
    return pred_dir / f"rank{rank}"


def gather_shares(pred_dir: Path) -> None:
    """Append the ranks' prediction files to the per-user files and remove them (rank 0 only; its
    read_done right after repairs what an interruption left)."""
    for part in sorted(pred_dir.glob("rank*/user_*.jsonl")):
        with open(pred_dir / part.name, "a") as f:
            f.write("".join(line + "\n" for line in part.read_text().splitlines()))
        part.unlink()  # cut or repeated lines (a crash before this) are dropped by the next read_done
    for folder in pred_dir.glob("rank*"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def by_index(done: dict[int, list[dict]]) -> dict[int, list[dict]]:
    """Each user's records in sample order: metrics must not depend on which batch or rank finished first."""
    return {user: sorted(records, key=lambda r: r["index"]) for user, records in done.items()}


@torch.inference_mode()
def generate_batch(model, processor, batch: dict, max_new_tokens: int, min_new_tokens: int = 0,
                   generator=None) -> list[str]:
    """Greedy answers to one batch: through `generator` (a `pigg.generation.Generator`, the fast path)
    if given, else through transformers' generate() (the former path, `--eval.fast_generation false`)."""
    if generator is not None:
        return generator(batch)
    from transformers import GenerationConfig

    tok = processor.tokenizer
    gen = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id,
                           eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id])
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    out = model.generate(**batch, generation_config=gen)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(model, processor, samples: list[Sample], sizes: dict, out_dir, batch_size: int = 32,
             max_new_tokens: int = 128, workers: int = 4, meta: dict | None = None,
             min_new_tokens: int = 0, benchmark=None, fast: bool = True, liger: bool | None = None) -> dict:
    """Generate, score and write predictions and metrics for `samples`; return the metrics. Under a
    launcher each process takes a share (see the module's docstring). A `benchmark`
    (pigg.grounding.benchmarks) adds its fields to each record and scores the run its way.

    `min_new_tokens` exists for benchmarks, which need the same work per sample from random weights.
    `fast`: answers from `pigg.generation` (static cache, CUDA graph); False: transformers' generate().
    `liger`: Liger's kernels in the fast path's prefill (`fast.liger_kernel`; None: where installed).
    """
    made_group = start_process_group()  # for the barriers, unless training made one already
    try:
        with released(Generator(model, processor, max_new_tokens, min_new_tokens, liger=liger) if fast else None
                      ) as generator:
            return _evaluate(model, processor, samples, sizes, Path(out_dir), batch_size, max_new_tokens, workers,
                             meta, min_new_tokens, benchmark, generator)
    finally:
        end_process_group(made_group)


def _evaluate(model, processor, samples, sizes, out_dir: Path, batch_size, max_new_tokens, workers, meta,
              min_new_tokens, benchmark, generator) -> dict:
    pred_dir = out_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    if is_main():  # repair and gather what an interrupted run left, before any rank reads or writes
        gather_shares(pred_dir)
        done = read_done(pred_dir)
        same_answerer(pred_dir, answerer(meta, max_new_tokens, min_new_tokens), resuming=bool(done))
    barrier()
    if not is_main():
        done = read_done(pred_dir)
    finished = {(r["user"], r["index"]) for records in done.values() for r in records}
    prompts = [prompt_and_truth(s) for s in samples if (s.user, s.index) not in finished]
    if finished:
        print(f"eval: {len(finished)} samples already done in {pred_dir}, {len(prompts)} to go")
    lengths = [sample_length(processor, p, sizes)[0] for p, _ in prompts]
    # Every rank forms the same batches and takes every world-th: shares of similar cost, and the same
    # batches (so the same left padding and answers) as one process.
    batches = length_batches(prompts, lengths, batch_size)[rank()::world_size()]
    write_dir = pred_dir if world_size() == 1 else share_dir(pred_dir, rank())
    write_dir.mkdir(exist_ok=True)
    # The fast path cuts every batch into one piece a DataLoader worker and answers the pieces joined:
    # a batch is ready after a fraction of a worker's time for a whole one, and the next batches are
    # prepared while the GPU answers. The former path has each worker prepare whole batches.
    collate = PromptCollator(processor)
    loader_items, counts = split(batches, workers if generator is not None else 1)
    if generator is not None:
        collate = PromptCollator(processor, fast=True, pixel_dtype=generator.pixel_dtype)
    loader = DataLoader(loader_items, batch_size=None, collate_fn=collate, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None)
    loader = joined(loader, counts, processor.tokenizer.pad_token_id, generator and generator.device)
    from tqdm.auto import tqdm

    model.eval()
    with tqdm(total=sum(len(b) for b in batches), desc="eval", unit="sample", disable=not is_main()) as bar:
        for batch, items in loader:
            answers = generate_batch(model, processor, batch, max_new_tokens, min_new_tokens, generator)
            for (prompt, truth), raw in zip(items, answers):
                record = prediction_record(prompt, truth, raw)
                record = benchmark.annotate(record) if benchmark else record
                with open(write_dir / f"user_{prompt.user}.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(len(items))
    barrier()  # every rank's predictions are on disk
    if is_main():
        gather_shares(pred_dir)
        done = by_index(read_done(pred_dir))
        summary = benchmark.summarize(done) if benchmark else M.aggregate(done)
        metrics = {**(meta or {}), "max_new_tokens": max_new_tokens, **summary}
        write_json_atomic(out_dir / "metrics.json", metrics)
    barrier()  # metrics.json is written
    return metrics if is_main() else json.loads((out_dir / "metrics.json").read_text())


ANSWERER = "answered_by.json"  # in predictions/: what wrote them, checked before a run continues them


def answerer(meta: dict | None, max_new_tokens: int, min_new_tokens: int) -> dict:
    """What answers in a run: its description (`meta` without the label and users), a fingerprint of each
    weight file of the model and adapter it names, and the answers' token limits."""
    described = {k: v for k, v in (meta or {}).items() if k not in ("label", "users")}
    stamps = {}
    for key in ("model", "adapter"):
        folder = described.get(key)
        if folder and Path(folder).is_dir():
            stamps[key] = {f.name: fingerprint(f) for f in sorted(Path(folder).iterdir()) if is_weights(f)}
    now = {**described, "weight_files": stamps, "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens}
    return json.loads(json.dumps(now, default=str))  # as the file will read back


def is_weights(path: Path) -> bool:
    return path.suffix == ".safetensors" or path.name in ("config.json", "adapter_config.json") or (
        path.suffix == ".bin" and path.name.startswith(("pytorch_model", "adapter_model")))


WHOLE_FILE = 64 * 2**20  # a weight file up to this size is hashed whole; a larger one in BLOCKS places
BLOCKS, BLOCK = 64, 2**16


def fingerprint(path: Path) -> str:
    """A weight file's size and the SHA-256 of its bytes: all of them up to WHOLE_FILE (an adapter), else
    its first MiB (the tensors' names and shapes) and BLOCKS blocks spread over the rest, which any new
    training of the weights changes. Content, not modification time: a run that saves the same weights
    again does not count as another model."""
    import hashlib

    size, digest = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_FILE:
            digest.update(f.read())
        else:
            digest.update(f.read(2**20))
            for k in range(BLOCKS):
                f.seek(2**20 + k * (size - 2**20 - BLOCK) // (BLOCKS - 1))
                digest.update(f.read(BLOCK))
    return f"{size}:{digest.hexdigest()[:16]}"


def same_answerer(pred_dir: Path, now: dict, resuming: bool) -> None:
    """Record what answers in `pred_dir`; when continuing predictions that another model, other weights
    or other limits wrote, refuse rather than mix them."""
    path = pred_dir / ANSWERER
    if resuming and path.is_file():
        before = json.loads(path.read_text())
        if before != now:
            changed = "\n".join(f"  {key}: {before.get(key)!r} -> {now.get(key)!r}"
                                for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key))
            raise ValueError(f"{pred_dir} holds predictions of another model or settings; remove it to start over "
                             f"or choose another output folder:\n{changed}")
    write_json_atomic(path, now)


def prediction_record(prompt: Sample, truth: str, raw: str) -> dict:
    images = images_of(prompt)
    image = images[0] if images and isinstance(images[0], str) else None
    try:
        score = M.score_sample(raw, truth)
    except ValueError as e:
        raise ValueError(f"{prompt.where}: ground truth: {e}") from None
    return dict(user=prompt.user, index=prompt.index, source=prompt.source, image=image,
                command=command_of(prompt), raw=raw, **score)


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def format_metrics(metrics: dict) -> str:
    from pigg.grounding.priors import describe

    def pct(x):
        return "  -  " if x is None else f"{100 * x:5.1f}%"

    def num(x):
        return "   -  " if x is None else f"{x:6.1f}"

    head = f"{'user':>6} {'n':>6} {'Acc@140':>8} {'mean L2':>8} {'med L2':>8} {'parse fail':>10} {'ref EM':>7} {'ref F1':>7} {'seed rule':>9}"
    lines = [head, "-" * len(head)]
    rows = [(u, m) for u, m in sorted(metrics["users"].items(), key=lambda kv: int(kv[0]))]
    rows += [("micro", metrics["micro"]), ("macro", {**metrics["macro"], "n": metrics["micro"]["n"]})]

    def row(name, m):
        return (f"{name:>6} {m['n']:>6} {pct(m['click_acc_140']):>8} {num(m['mean_l2']):>8} "
                f"{num(m['median_l2']):>8} {pct(m['parse_failure_rate']):>10} {pct(m['referring_exact']):>7} "
                f"{pct(m['referring_f1']):>7} {pct(m['seed_click_acc_140']):>9}")

    lines += [row(name, m) for name, m in rows]
    for entry in metrics.get("baselines", {}).values():  # constant answers, not models: pigg.grounding.priors
        lines.append(f"baseline {entry['label']}: {describe(entry['baseline'])}")
        if "micro" in entry:
            lines += [row("micro", entry["micro"]), row("macro", {**entry["macro"], "n": entry["micro"]["n"]})]
    lines.append("seed rule: the replaced system's scoring (unparseable answer -> (0, 0), box -> first corner), "
                 "for comparison only")
    return "\n".join(lines)


def default_label(cfg: C.RunConfig) -> str:
    if cfg.eval.label:
        return cfg.eval.label
    source = cfg.eval.checkpoint or cfg.eval.adapter
    return Path(source).resolve().name if source else "vanilla"


def run_eval(cfg: C.RunConfig) -> dict:
    """`pigg eval`: validate the data, load the model (zero-shot or with a checkpoint), evaluate; with
    several processes each takes a share and rank 0 speaks for all."""
    from pigg.distributed import use_local_gpu
    from pigg.logs import quiet_stdout

    C.validate(cfg)
    use_local_gpu()
    if is_main():
        return _run_eval(cfg)
    with quiet_stdout():
        return _run_eval(cfg)


def _run_eval(cfg: C.RunConfig) -> dict:
    from pigg.model.loading import load_for_inference, resolve_checkpoint
    from pigg.data.processor import load_processor
    from pigg.grounding.benchmarks import load_benchmark
    from pigg.grounding.priors import attach as attach_priors, global_prior
    from pigg.model.loading import device

    e = cfg.eval
    explicit_model = cfg.model.name_or_path if cfg.model.name_or_path != C.ModelConfig().name_or_path else None
    cfg.model.name_or_path, adapter = resolve_checkpoint(explicit_model, e.adapter, e.checkpoint)
    label = default_label(cfg)
    out = Path(e.out or Path("eval_runs") / (f"{e.benchmark}-{label}" if e.benchmark else label))
    print(f"eval: {label}: model {cfg.model.name_or_path}" + (f" + adapter {adapter}" if adapter else "") + f" -> {out}")
    bench = e.benchmark and load_benchmark(e.benchmark, e.benchmark_root, e.prompt, cfg.data.validation_workers)
    # every answer is scored, so every point is needed
    samples, sizes = (bench.samples, bench.sizes) if bench else load_samples(cfg.data, scored=True)
    # The global prior baseline beside the model, fitted on the training users the weights record
    # (benchmarks are not user data: no prior); rank 0 alone writes metrics.
    weights = [p for p in (adapter, cfg.model.name_or_path) if p and Path(p).is_dir()]
    prior = None if bench or not is_main() else global_prior(cfg, weights)
    processor_source = next((p for p in (adapter, cfg.model.name_or_path)
                             if p and (Path(p) / "tokenizer_config.json").is_file()), cfg.model.name_or_path)
    processor = load_processor(processor_source, cfg.model.min_pixels, cfg.model.max_pixels)
    model = load_for_inference(cfg.model, adapter, device())
    out.mkdir(parents=True, exist_ok=True)
    if is_main():
        C.save_yaml(cfg, out / "eval_config.yaml")
    meta = dict(label=label, model=cfg.model.name_or_path, adapter=adapter, users=cfg.data.users,
                **(bench.meta if bench else {}))
    metrics = evaluate(model, processor, samples, sizes, out, e.batch_size, e.max_new_tokens, e.workers, meta,
                       benchmark=bench, fast=e.fast_generation, liger=cfg.fast.liger_kernel)
    if prior is not None:
        metrics = attach_priors(out, [prior])
    print(bench.format(metrics) if bench else format_metrics(metrics))
    print(f"predictions and metrics.json in {out}")
    return metrics
