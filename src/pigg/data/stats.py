"""`pigg data stats`: a per-user summary of the data as the model will see it."""
from pigg.data.collate import sample_length
from pigg.data.samples import images_of, load_samples
from pigg.data.processor import load_processor


def user_stats(processor, samples, sizes) -> dict[int, dict]:
    rows = {}
    for s in samples:
        total, image_tokens = sample_length(processor, s, sizes)
        row = rows.setdefault(s.user, dict(file=s.source, samples=0, sizes=set(), image_tokens=[], text_tokens=[], total=[]))
        row["samples"] += 1
        row["sizes"].update(sizes[ref] for ref in images_of(s))
        row["image_tokens"].append(image_tokens)
        row["text_tokens"].append(total - image_tokens)
        row["total"].append(total)
    return rows


def format_stats(rows: dict) -> str:
    def mean(xs):
        return sum(xs) / len(xs)

    head = f"{'user':>5} {'file':<16} {'samples':>7} {'image sizes (WxH)':<23} {'img tok':>7} {'text tok':>8} {'total mean':>10} {'max':>6}"
    lines = [head, "-" * len(head)]
    for user, r in sorted(rows.items()):
        ws, hs = [w for w, _ in r["sizes"]], [h for _, h in r["sizes"]]
        size = f"{min(ws)}x{min(hs)}" + ("" if len(r["sizes"]) == 1 else f"..{max(ws)}x{max(hs)}")
        lines.append(f"{user:>5} {r['file']:<16} {r['samples']:>7} {size:<23} {mean(r['image_tokens']):>7.0f} "
                     f"{mean(r['text_tokens']):>8.0f} {mean(r['total']):>10.0f} {max(r['total']):>6}")
    everything = [x for r in rows.values() for x in r["total"]]
    lines.append(f"{'all':>5} {'':<16} {len(everything):>7} {'':<23} {'':>7} {'':>8} "
                 f"{sum(everything) / len(everything):>10.0f} {max(everything):>6}")
    return "\n".join(lines)


def print_stats(cfg) -> None:
    samples, sizes = load_samples(cfg.data)
    processor = load_processor(cfg.model.name_or_path, cfg.model.min_pixels, cfg.model.max_pixels)
    print(f"token counts with {cfg.model.name_or_path}'s processor, max_pixels={cfg.model.max_pixels}")
    print(format_stats(user_stats(processor, samples, sizes)))
