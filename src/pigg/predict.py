"""`pigg predict`: ask a model where to click on screenshots, with no data root.

One screenshot (`--image PATH --command TEXT`) or many (`--input FILE.jsonl`, one {"image", "command"}
a line, relative paths taken from the file's folder). The model (zero-shot, `--adapter` or
`--checkpoint`) is asked as on a benchmark, with pigg's instruction prompt or `--prompt qwen`,
greedily, in batches through evaluate's collator and fast generation (pigg.generation); pigg's parser reads
the answer. Printed: the referring text and the point in 0-1000 and in the screenshot's pixels, or
with `--json` one JSON object a line.

`--draw` writes the screenshot with the point and the region Click Acc@140 counts as a hit around
it: 140 units of 0-1000 space on each axis, so a circle in 0-1000 space and an ellipse in pixels on a
non-square screenshot (x and y scale by the width and the height separately).
"""
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from pigg import config as C
from pigg.data.samples import DataError, Problem, Sample, open_image
from pigg.evaluate import PromptCollator, generate_batch
from pigg.generation import Generator, released
from pigg.grounding.benchmarks import PROMPTS, ask
from pigg.grounding.metrics import RADIUS, to_pixels
from pigg.grounding.parser import parse_answer

POINT_COLOUR = (255, 23, 68)  # the report's prediction red
RING_COLOUR = (255, 196, 0)  # amber: visible on light and dark screens, unlike the dot's red on red UIs
HALO_COLOUR = (255, 255, 255)


@dataclass(frozen=True)
class Request:
    image: str
    command: str
    where: str  # for messages: "--image" or "FILE.jsonl line N"


def read_requests(image: str | None, command: str | None, input_file: str | None) -> list[Request]:
    """The screenshots and commands to answer, each image checked; one DataError lists every problem."""
    if bool(input_file) == bool(image or command):
        raise ValueError("give --image PATH and --command TEXT, or --input FILE.jsonl (not both)")
    if input_file:
        requests, problems = _read_jsonl(Path(input_file))
    elif not (image and command and command.strip()):
        raise ValueError("--image and --command go together: give both")
    else:
        requests, problems = [Request(image, command, "--image")], []
    for r in requests:
        field = "" if r.where == "--image" else "image"
        try:
            with Image.open(r.image) as im:
                im.load()
        except FileNotFoundError:
            problems.append(Problem(r.where, None, field, f"file not found: {r.image}"))
        except Exception as e:  # PIL raises many types for broken files; all mean "cannot decode"
            problems.append(Problem(r.where, None, field, f"cannot decode {r.image}: {type(e).__name__}: {e}"))
    if problems:
        raise DataError(problems)
    return requests


def _read_jsonl(path: Path) -> tuple[list[Request], list[Problem]]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as e:
        return [], [Problem(str(path), None, "", f"cannot be read: {e.strerror or e}")]
    requests, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.append(Problem(where, None, "", f"not JSON ({e})"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(where, None, "", 'expected an object {"image": PATH, "command": TEXT}'))
            continue
        bad = [key for key in ("image", "command") if not isinstance(row.get(key), str) or not row[key].strip()]
        problems += [Problem(where, None, key, "expected a non-empty string") for key in bad]
        if not bad:
            image = Path(row["image"])
            requests.append(Request(str(image if image.is_absolute() else path.parent / image), row["command"], where))
    if not requests and not problems:
        problems.append(Problem(str(path), None, "", "holds no requests"))
    return requests, problems


def predict(model, processor, requests: list[Request], prompt: str = "pigg", batch_size: int = 8,
            max_new_tokens: int = 128, liger: bool | None = None) -> list[dict]:
    """One record per request, in order: the raw answer, the referring text and the point, in 0-1000
    and in the screenshot's pixels (None when the answer holds no point)."""
    samples = [Sample(0, i, r.where, [{"role": "user", "content": [
        {"type": "image", "image": r.image}, {"type": "text", "text": ask(r.command, prompt)}]}])
        for i, r in enumerate(requests)]
    collate, answers = PromptCollator(processor), []
    model.eval()
    with released(Generator(model, processor, max_new_tokens, liger=liger)) as generator:  # evaluation's fast path
        for start in range(0, len(samples), batch_size):
            batch, _ = collate([(s, "") for s in samples[start:start + batch_size]])
            answers += generate_batch(model, processor, batch, max_new_tokens, generator=generator)
    records = []
    for r, raw in zip(requests, answers):
        with Image.open(r.image) as im:
            size = im.size
        parsed = parse_answer(raw)
        point = None if parsed.point is None else list(parsed.point)
        records.append({"image": r.image, "command": r.command, "referring": parsed.referring, "point": point,
                        "pixel": None if point is None else list(to_pixels(point, size)), "image_size": list(size),
                        "raw": raw})
    return records


def draw(image: str, point, out) -> Path:
    """Write the screenshot with `point` (0-1000) and its 140-unit region marked; unmarked when None."""
    im = open_image(image).copy()
    if point is not None:
        w, h = im.size
        x, y = to_pixels(point, (w, h))
        rx, ry = RADIUS * w / 1000, RADIUS * h / 1000  # 140 units per axis: an ellipse unless w == h
        pen = max(2, round(min(w, h) / 250))
        dot = max(4.0, min(w, h) / 90)
        d = ImageDraw.Draw(im)
        d.ellipse([x - rx, y - ry, x + rx, y + ry], outline=RING_COLOUR, width=pen)
        d.ellipse([x - dot - pen, y - dot - pen, x + dot + pen, y + dot + pen], fill=HALO_COLOUR)
        d.ellipse([x - dot, y - dot, x + dot, y + dot], fill=POINT_COLOUR)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out, format="PNG")
    return out


def describe(record: dict) -> str:
    lines = [f"{record['image']}: {record['command']!r}"]
    if record["point"] is None:
        raw = record["raw"] if len(record["raw"]) <= 200 else record["raw"][:200] + "..."
        lines.append(f"  no point in the answer: {raw!r}")
    else:
        (x, y), (px, py) = record["point"], record["pixel"]
        w, h = record["image_size"]
        lines.append(f"  referring: {record['referring'] or '(none)'}")
        lines.append(f"  point: ({x:g}, {y:g}) in 0-1000 = ({px:.1f}, {py:.1f}) px of {w}x{h}")
    if record.get("drawn"):
        lines.append(f"  drawn: {record['drawn']}")
    return "\n".join(lines)


def drawing_path(draw_to: str, index: int, image: str, many: bool) -> Path:
    return Path(draw_to) / f"{index:04d}_{Path(image).stem}.png" if many else Path(draw_to)


def load_model(cfg: C.RunConfig):
    """The model to ask (base, adapter or checkpoint, as `pigg eval` resolves them) and its processor."""
    from pigg.data.processor import load_processor
    from pigg.model.loading import device, load_for_inference, resolve_checkpoint

    e = cfg.eval
    explicit_model = cfg.model.name_or_path if cfg.model.name_or_path != C.ModelConfig().name_or_path else None
    cfg.model.name_or_path, adapter = resolve_checkpoint(explicit_model, e.adapter, e.checkpoint)
    processor_source = next((p for p in (adapter, cfg.model.name_or_path)
                             if p and (Path(p) / "tokenizer_config.json").is_file()), cfg.model.name_or_path)
    processor = load_processor(processor_source, cfg.model.min_pixels, cfg.model.max_pixels)
    return load_for_inference(cfg.model, adapter, device()), processor


def run_predict(cfg: C.RunConfig, image=None, command=None, input_file=None, as_json=False, draw_to=None) -> list:
    """`pigg predict`: check the requests, load the model, answer, print, draw."""
    C.validate(cfg)
    if cfg.eval.prompt not in PROMPTS:
        raise C.ConfigError(f"eval.prompt must be one of {', '.join(PROMPTS)}, got {cfg.eval.prompt!r}")
    requests = read_requests(image, command, input_file)
    model, processor = load_model(cfg)
    records = predict(model, processor, requests, cfg.eval.prompt, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                      cfg.fast.liger_kernel)
    for i, record in enumerate(records):
        record["drawn"] = None if not draw_to else str(
            draw(record["image"], record["point"], drawing_path(draw_to, i, record["image"], bool(input_file))))
        print(json.dumps(record) if as_json else describe(record))
    return records
