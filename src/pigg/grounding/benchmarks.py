"""Public GUI grounding benchmarks, read from their published files as they are: ScreenSpot,
ScreenSpot-v2 and ScreenSpot-Pro (`pigg eval --benchmark NAME --benchmark-root DIR`).

Layouts under DIR, as the benchmarks are published:

    screenspot      screenspot_{mobile,desktop,web}.json      images in screenspot_imgs/
    screenspot-v2   screenspot_{mobile,desktop,web}_v2.json   images in screenspotv2_image/
    screenspot-pro  annotations/*.json                         images in images/

A ScreenSpot entry is {img_filename, instruction, bbox: [left, top, width, height] in pixels, data_type
(text or icon), data_source}; a ScreenSpot-Pro entry is {img_filename, instruction, bbox: [x1, y1, x2,
y2] in pixels, img_size: [width, height], application, platform, group, ui_type}. Other keys are
ignored. Every file is checked before a model loads; a missing image or a malformed box (wrong
length, not numbers, negative size, lying wholly outside the image, an img_size that is not the image's)
is reported with its file, index and field, all problems at once.

Each target becomes a pigg Sample, so the same `evaluate()` (batching, resume, predictions/*.jsonl,
metrics.json) and `pigg report` serve it: the sample's "user" is its file (ScreenSpot's split, e.g.
"mobile"; ScreenSpot-Pro's annotation file, e.g. "vscode_macos"), its index the position in the
file. The prompt is pigg's instruction prompt (the one the training data carries) or, with
`--prompt qwen`, Qwen3-VL's own JSON pointing format; the answer is read by pigg's parser.

Scoring (`Benchmark.summarize`), per sample:
- in_box, the benchmarks' own metric: the predicted point, taken from 0-1000 to the image's pixels
  (x * width / 1000, y * height / 1000), lies inside the target box, edges included. An answer with
  no readable point is a miss.
- click_acc_140 beside it: the box's centre, in 0-1000, is the ground-truth point.
Over samples: "micro" pools every sample (the benchmarks' published average); "macro" is the plain
mean over the cells of split (ScreenSpot: platform; ScreenSpot-Pro: group) x ui_type, the columns of
the benchmarks' tables, each weighing the same. metrics.json's "breakdown" holds both and every
breakdown; its "users"/"micro"/"macro" are evaluate()'s usual summaries with the files as users.
"""
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import pigg.grounding.metrics as M
from pigg.data.samples import DataError, Problem, Sample, check_images
from pigg.grounding.prompts import make_prompt

NAMES = ("screenspot", "screenspot-v2", "screenspot-pro")
PROMPTS = ("pigg", "qwen")
SPLITS = ("mobile", "desktop", "web")
IMAGE_DIRS = {"screenspot": "screenspot_imgs", "screenspot-v2": "screenspotv2_image", "screenspot-pro": "images"}
QWEN_PROMPT = ('Locate the element of this screenshot that the instruction below refers to. Answer in JSON as '
               '{{"point_2d": [x, y], "label": "<the element>"}}, with x and y relative coordinates from 0 to '
               "1000.\nInstruction: {command}")
SCORE_KEYS = ("in_box", "click_acc_140", "parse_failure_rate")


def ask(command: str, prompt: str) -> str:
    """The user turn's text that asks for `command` in the chosen prompt style."""
    return make_prompt(command) if prompt == "pigg" else QWEN_PROMPT.format(command=command)


@dataclass(frozen=True)
class Target:
    box: tuple  # (x1, y1, x2, y2) in the image's pixels
    size: tuple | None  # (width, height) in pixels; ScreenSpot's comes from the image once decoded
    instruction: str
    tags: dict  # what the breakdowns group by: platform or group, ui_type, data_source or application

    @property
    def centre(self) -> tuple:
        """The box's centre in 0-1000 space: the ground-truth point of Click Acc@140."""
        return M.to_relative(((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2), self.size)


@dataclass
class Benchmark:
    name: str
    root: Path
    prompt: str
    primary: str  # the tag the macro average's cells pair with ui_type
    samples: list = field(default_factory=list)
    sizes: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)  # (user, index) -> Target

    @property
    def meta(self) -> dict:
        return {"benchmark": self.name, "benchmark_root": str(self.root), "prompt": self.prompt}

    def annotate(self, record: dict) -> dict:
        """A prediction record with the benchmark's fields: the box, the point in pixels, in_box, the tags."""
        target = self.targets.get((record["user"], record["index"]))
        if target is None:
            raise ValueError(f"a prediction for {record['user']} sample {record['index']} is not a {self.name} target: "
                             "the output folder holds another run's predictions (give a new --out)")
        pixel = None if record["pred_point"] is None else M.to_pixels(record["pred_point"], target.size)
        return {**record, "command": target.instruction, "gt_box": list(target.box), "image_size": list(target.size),
                "pred_pixel": None if pixel is None else list(pixel), "in_box": M.in_box(pixel, target.box),
                **target.tags}

    def summarize(self, done: dict) -> dict:
        """evaluate()'s summaries with in_box added (there is no true name, so no referring scores) and
        the breakdowns. Records are annotated again from the benchmark, not trusted from the files."""
        per_file = {user: [self.annotate(r) for r in records] for user, records in done.items()}
        pooled = [r for records in per_file.values() for r in records]
        metrics = M.aggregate(per_file)
        groups = [(metrics["micro"], pooled), *((metrics["users"][str(u)], rs) for u, rs in per_file.items())]
        for summary, records in groups:
            summary.update(in_box=share(records, "in_box"), referring_exact=None, referring_f1=None)
        values = [u["in_box"] for u in metrics["users"].values() if u["in_box"] is not None]
        metrics["macro"].update(in_box=sum(values) / len(values) if values else None,
                                referring_exact=None, referring_f1=None)
        metrics["breakdown"] = breakdown(pooled, self.primary)
        return metrics

    def format(self, metrics: dict) -> str:
        return format_breakdown(metrics["breakdown"], self.name)


def share(records: list, key: str) -> float | None:
    return sum(bool(r[key]) for r in records) / len(records) if records else None


def scores(records: list) -> dict:
    return {"n": len(records), "in_box": share(records, "in_box"), "click_acc_140": share(records, "hit"),
            "parse_failure_rate": sum(not r["parse_ok"] for r in records) / len(records)}


def group_by(records: list, *keys) -> dict:
    groups = {}
    for r in records:
        groups.setdefault("/".join(str(r[k]) for k in keys), []).append(r)
    return {name: scores(groups[name]) for name in sorted(groups)}


def breakdown(records: list, primary: str) -> dict:
    """micro, macro (mean over the primary x ui_type cells) and the scores by each tag."""
    tags = [k for k in ("platform", "group", "ui_type", "data_source", "application") if records and k in records[0]]
    by = {tag: group_by(records, tag) for tag in tags}
    cells_name = f"{primary} x ui_type"
    by[cells_name] = group_by(records, primary, "ui_type")
    cells = list(by[cells_name].values())
    macro = {key: sum(c[key] for c in cells) / len(cells) if cells else None for key in SCORE_KEYS}
    return {"micro": scores(records) if records else {"n": 0, **dict.fromkeys(SCORE_KEYS)},
            "macro": {**macro, "cells": len(cells), "over": cells_name}, "by": by}


def format_breakdown(b: dict, name: str) -> str:
    def pct(x):
        return "  -  " if x is None else f"{100 * x:5.1f}%"

    cells = b["macro"]["over"]
    head = f"{name + ': ' + cells:<28} {'n':>6} {'in box':>7} {'Acc@140':>8} {'parse fail':>10}"
    lines = [head, "-" * len(head)]
    primary = cells.split(" x ")[0]
    rows = list(b["by"][cells].items()) + list(b["by"][primary].items()) + list(b["by"]["ui_type"].items())
    rows += [("micro (every sample)", b["micro"]), (f"macro (mean of {b['macro']['cells']} cells)", b["macro"])]
    for label, s in rows:
        n = s.get("n", "")
        lines.append(f"{label:<28} {n:>6} {pct(s['in_box']):>7} {pct(s['click_acc_140']):>8} "
                     f"{pct(s['parse_failure_rate']):>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading the published files
# ---------------------------------------------------------------------------------------------

def load_benchmark(name: str | None, root: str | None, prompt: str = "pigg", workers: int = 8) -> Benchmark:
    """Read, check and turn into samples every target of a benchmark; raise one DataError (or ValueError
    for the settings) listing every problem."""
    bad = []
    if name not in NAMES:
        bad.append(f"eval.benchmark must be one of {', '.join(NAMES)}, got {name!r}")
    if not root:
        bad.append("eval.benchmark_root is needed with eval.benchmark (the folder with the benchmark's files)")
    if prompt not in PROMPTS:
        bad.append(f"eval.prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
    if bad:
        raise ValueError("invalid benchmark settings:\n  - " + "\n  - ".join(bad))
    root = Path(root).resolve()
    images = root / IMAGE_DIRS[name]
    entries, problems = read_pro(root, images) if name == "screenspot-pro" else read_screenspot(root, images, name)
    if not images.is_dir():
        problems.append(Problem(str(root), None, "", f"no image folder {IMAGE_DIRS[name]}/ (unpack the benchmark's "
                                                     "images there)"))
        raise DataError(problems)
    sizes, bad_images = check_images([_image_only(e) for e in entries], workers)
    problems += [Problem(p.source, p.index, "img_filename", p.message) for p in bad_images]
    bench = Benchmark(name, root, prompt, "group" if name == "screenspot-pro" else "platform", sizes=sizes)
    for user, source, index, image, target in entries:
        target = _sized(target, sizes.get(str(image)), source, index, problems)
        if target is None:
            continue
        truth = f"```grounding\n[{_num(target.centre[0])}, {_num(target.centre[1])}]\n```"
        messages = [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                  {"type": "text", "text": ask(target.instruction, prompt)}]},
                    {"role": "assistant", "content": [{"type": "text", "text": truth}]}]
        bench.samples.append(Sample(user, index, source, messages))
        bench.targets[(user, index)] = target
    if problems:
        raise DataError(problems)
    print(f"benchmark: {name}: {len(bench.samples)} targets in {len({s.user for s in bench.samples})} files, "
          f"{len(sizes)} images, all decoded; prompt {prompt}")
    return bench


def _image_only(entry) -> Sample:
    user, source, index, image, _ = entry
    return Sample(user, index, source, [{"role": "user", "content": [{"type": "image", "image": str(image)}]}])


def _num(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _sized(target: Target, actual: tuple | None, source: str, index: int, problems: list) -> Target | None:
    """The target with its image's size, once the box is checked against it (and ScreenSpot-Pro's
    img_size against the image); None when the image could not be read or the box is wrong."""
    if actual is None:
        return None
    if target.size is not None and tuple(target.size) != tuple(actual):
        problems.append(Problem(source, index, "img_size", f"{list(target.size)} but the image is "
                                                           f"{actual[0]}x{actual[1]}"))
        return None
    x1, y1, x2, y2 = target.box
    # A box may overhang the edge (an element cut off by the screen's border): its visible part is still
    # a target, and the in-box test needs no clipping. A box with no part on the image is a wrong annotation.
    if x2 <= 0 or y2 <= 0 or x1 >= actual[0] or y1 >= actual[1]:
        shown = ", ".join(_num(v) for v in target.box)
        problems.append(Problem(source, index, "bbox", f"box [{shown}] (x1, y1, x2, y2 in pixels) lies outside "
                                                       f"the {actual[0]}x{actual[1]} image"))
        return None
    return replace(target, size=tuple(actual))


def _load_json_list(path: Path, shown: str, problems: list) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.append(Problem(shown, None, "", f"cannot be read as JSON: {e}"))
        return []
    if not isinstance(data, list):
        problems.append(Problem(shown, None, "", f"holds a {type(data).__name__}, expected a list of targets"))
        return []
    return data


def _text(entry: dict, key: str, bad) -> str | None:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        bad(key, f"expected a non-empty string, got {_short(value)}")
        return None
    return value


def _numbers(entry: dict, key: str, length: int, bad) -> list | None:
    value = entry.get(key)
    if not isinstance(value, list) or len(value) != length or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        bad(key, f"expected a list of {length} numbers, got {_short(value)}")
        return None
    return value


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_screenspot(root: Path, images: Path, name: str) -> tuple[list, list]:
    """(user, source, index, image path, Target) of every entry of the three split files, and the problems."""
    suffix = "_v2" if name == "screenspot-v2" else ""
    entries, problems = [], []
    for split in SPLITS:
        shown = f"screenspot_{split}{suffix}.json"
        if not (root / shown).is_file():
            problems.append(Problem(str(root), None, "", f"no {shown} (the benchmark has mobile, desktop and web "
                                                         "files)"))
            continue
        for index, entry in enumerate(_load_json_list(root / shown, shown, problems)):
            def bad(key, message, index=index, shown=shown):
                problems.append(Problem(shown, index, key, message))

            if not isinstance(entry, dict):
                bad("", f"expected an object, got {_short(entry)}")
                continue
            file, instruction = _text(entry, "img_filename", bad), _text(entry, "instruction", bad)
            ui_type, source = _text(entry, "data_type", bad), _text(entry, "data_source", bad)
            box = _numbers(entry, "bbox", 4, bad)
            if box is not None and (box[2] < 0 or box[3] < 0):
                bad("bbox", f"negative size in {box} (left, top, width, height)")
                continue
            if None in (file, instruction, ui_type, source, box):
                continue
            # ScreenSpot states no image size: the image's own is filled in after decoding (_sized)
            target = Target((box[0], box[1], box[0] + box[2], box[1] + box[3]), None, instruction,
                            {"platform": split, "ui_type": ui_type, "data_source": source})
            entries.append((split, shown, index, images / file, target))
    return entries, problems


def read_pro(root: Path, images: Path) -> tuple[list, list]:
    """(user, source, index, image path, Target) of every entry of annotations/*.json, and the problems."""
    files = sorted((root / "annotations").glob("*.json"))
    if not files:
        return [], [Problem(str(root), None, "", "no annotations/*.json (ScreenSpot-Pro's annotation files)")]
    entries, problems = [], []
    for path in files:
        shown = f"annotations/{path.name}"
        for index, entry in enumerate(_load_json_list(path, shown, problems)):
            def bad(key, message, index=index, shown=shown):
                problems.append(Problem(shown, index, key, message))

            if not isinstance(entry, dict):
                bad("", f"expected an object, got {_short(entry)}")
                continue
            texts = [_text(entry, key, bad) for key in ("img_filename", "instruction", "application", "platform",
                                                         "group", "ui_type")]
            box, size = _numbers(entry, "bbox", 4, bad), _numbers(entry, "img_size", 2, bad)
            if box is not None and (box[2] < box[0] or box[3] < box[1]):
                bad("bbox", f"negative size in {box} (x1, y1, x2, y2)")
                continue
            if size is not None and not all(v > 0 and v == int(v) for v in size):
                bad("img_size", f"expected two positive whole numbers, got {size}")
                continue
            if None in texts or box is None or size is None:
                continue
            file, instruction, application, platform, group, ui_type = texts
            target = Target(tuple(box), (int(size[0]), int(size[1])), instruction,
                            {"group": group, "ui_type": ui_type, "platform": platform, "application": application})
            entries.append((path.stem, shown, index, images / file, target))
    return entries, problems
