"""User data: find, load, normalise and validate per-user sample files before any model is loaded.

A sample is a list of messages ({"role", "content"}); content is a string or a list of
{"type": "image", "image": path-or-bytes} / {"type": "text", "text": str} items. 'system' turns
become 'user' turns (the seed's data put the screenshot and command in a system turn). Every
problem names the file, the sample index and the field, and all problems are reported at once.
"""
import io
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pigg.data.pickles import load_pickle
from pigg.data.users import format_users, parse_users

SUFFIXES = (".pkl", ".jsonl")


@dataclass
class Sample:
    user: int
    index: int
    source: str
    messages: list

    @property
    def where(self) -> str:
        return f"{self.source} sample {self.index}"


@dataclass
class Problem:
    source: str
    index: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.source if self.index is None else f"{self.source} sample {self.index}"
        return f"{where}, field {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class DataError(ValueError):
    def __init__(self, problems: list[Problem], hint: str = ""):
        self.problems = problems
        lines = "\n  ".join(str(p) for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the data:\n  {lines}" + (f"\n{hint}" if hint else ""))


def user_file(data_root, user: int) -> Path | None:
    for suffix in SUFFIXES:
        path = Path(data_root) / f"user_{user}{suffix}"
        if path.is_file():
            return path
    return None


def find_user_files(data_root, users, skip_missing: bool = False, log=print) -> dict[int, Path]:
    """Map each selected user to its file; a missing file is an error unless skipping was asked for."""
    if not Path(data_root).is_dir():
        raise DataError([Problem(str(data_root), None, "", "data root is not a folder")])
    files = {u: user_file(data_root, u) for u in parse_users(users)}
    missing = [u for u, p in files.items() if p is None]
    if missing and not skip_missing:
        raise DataError([Problem(str(data_root), None, "", f"no user_{u}.pkl or user_{u}.jsonl") for u in missing],
                        hint="Pass --skip-missing-users to train on the users that have files.")
    if missing:
        log(f"WARNING: skipping {len(missing)} user(s) with no file in {data_root}: {format_users(missing)}")
    found = {u: p for u, p in files.items() if p is not None}
    if not found:
        raise DataError([Problem(str(data_root), None, "", f"none of users {users} has a file")])
    return found


def read_user_file(path: Path, trust_pickle: bool = False) -> list:
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError([Problem(path.name, len(rows), "", f"line {n + 1} is not JSON: {e}")]) from None
        return rows
    data = load_pickle(path, trust=trust_pickle)
    if not isinstance(data, list):
        raise DataError([Problem(path.name, None, "", f"holds a {type(data).__name__}, expected a list of samples")])
    return data


def normalize_sample(raw, source: str, index: int, image_root: Path) -> tuple[list, list[Problem]]:
    """Check one sample's structure; return it with 'system' -> 'user' and image paths resolved."""
    problems = []

    def bad(field, message):
        problems.append(Problem(source, index, field, message))

    if not isinstance(raw, list) or not raw:
        bad("messages", f"expected a non-empty list of messages, got {type(raw).__name__}")
        return [], problems
    messages = []
    for m, msg in enumerate(raw):
        at = f"messages[{m}]"
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            bad(at, "expected a dict with 'role' and 'content'")
            continue
        role = msg["role"]
        if role not in ("system", "user", "assistant"):
            bad(f"{at}.role", f"unknown role {role!r}")
            continue
        role = "user" if role == "system" else role
        content = _normalize_content(msg["content"], role, f"{at}.content", image_root, bad)
        messages.append({"role": role, "content": content})
    if problems:
        return messages, problems
    if messages[0]["role"] != "user":
        bad("messages[0].role", "a sample must start with a user (or system) turn")
    if messages[-1]["role"] != "assistant":
        bad(f"messages[{len(messages) - 1}].role", "a training sample must end with an assistant turn")
    if not any(item["type"] == "image" for msg in messages for item in msg["content"]):
        bad("messages", "no image in the sample")
    return messages, problems


def _normalize_content(content, role, at, image_root, bad) -> list:
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        bad(at, f"expected a string or a list of items, got {type(content).__name__}")
        return []
    items = []
    for i, item in enumerate(content):
        where = f"{at}[{i}]"
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            items.append({"type": "text", "text": item["text"]})
        elif kind == "image" and role == "assistant":
            bad(where, "an assistant turn cannot hold an image")
        elif kind == "image" and isinstance(item.get("image"), str):
            path = Path(item["image"])
            items.append({"type": "image", "image": str(path if path.is_absolute() else image_root / path)})
        elif kind == "image" and isinstance(item.get("image"), (bytes, bytearray)):
            items.append({"type": "image", "image": bytes(item["image"])})
        else:
            bad(where, f"expected {{'type': 'text', 'text': str}} or {{'type': 'image', 'image': path or bytes}}, got {_short(item)}")
    if role == "assistant" and not "".join(x["text"] for x in items if x["type"] == "text").strip():
        bad(at, "assistant answer is empty")
    return items


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def open_image(ref) -> Image.Image:
    image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
    return image.convert("RGB")


def images_of(sample: Sample) -> list:
    return [item["image"] for msg in sample.messages for item in msg["content"] if item["type"] == "image"]


def _decode(ref):
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as image:
            image.load()
            return image.size, None
    except FileNotFoundError:
        return None, "file not found"
    except Exception as e:  # PIL raises many types for broken files; all mean "cannot decode"
        return None, f"cannot decode image: {type(e).__name__}: {e}"


def check_images(samples: list[Sample], workers: int = 8) -> tuple[dict, list[Problem]]:
    """Decode every distinct image once (in parallel); return {image: (w, h)} and the problems."""
    refs = list(dict.fromkeys(ref for s in samples for ref in images_of(s) if isinstance(ref, str)))
    if workers > 1 and len(refs) > 64:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_decode, refs, chunksize=64))
    else:
        results = [_decode(r) for r in refs]
    sizes = {ref: size for ref, (size, _) in zip(refs, results)}
    errors = {ref: err for ref, (_, err) in zip(refs, results) if err}
    problems = []
    for s in samples:
        for m, msg in enumerate(s.messages):
            for i, item in enumerate(msg["content"]):
                if item["type"] != "image":
                    continue
                ref = item["image"]
                if isinstance(ref, bytes):
                    sizes[ref], err = _decode(ref)
                else:
                    err = errors.get(ref)
                if err:
                    shown = "<bytes>" if isinstance(ref, bytes) else ref
                    problems.append(Problem(s.source, s.index, f"messages[{m}].content[{i}].image", f"{err}: {shown}"))
    return sizes, problems


def load_samples(data_cfg, log=print) -> tuple[list[Sample], dict]:
    """Load, normalise and validate every selected sample; raise one DataError listing all problems.

    Returns the samples and the decoded image sizes ({image: (w, h)}).
    """
    image_root = Path(data_cfg.image_root or data_cfg.data_root)
    files = find_user_files(data_cfg.data_root, data_cfg.users, data_cfg.skip_missing_users, log)
    samples, problems = [], []
    for user, path in files.items():
        try:
            raw = read_user_file(path, data_cfg.trust_pickle)
        except DataError as e:
            problems.extend(e.problems)
            continue
        if not raw:
            problems.append(Problem(path.name, None, "", "holds no samples"))
        for index, item in enumerate(raw):
            messages, bad = normalize_sample(item, path.name, index, image_root)
            problems.extend(bad)
            if not bad:
                samples.append(Sample(user, index, path.name, messages))
    sizes, bad_images = check_images(samples, data_cfg.validation_workers)
    problems.extend(bad_images)
    if problems:
        raise DataError(problems)
    log(f"data: {len(samples)} samples from {len(files)} users ({format_users(list(files))}), "
        f"{len(sizes)} distinct images, all decoded")
    return samples, sizes
