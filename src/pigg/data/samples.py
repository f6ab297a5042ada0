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

from pigg.data.pickles import CUT_SHORT, UnsafePickleError, loads, why_unreadable
from pigg.data.users import format_users, parse_users
from pigg.grounding.parser import parse_answer

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
    """The file's raw samples. A file that cannot be read at all raises a DataError with one problem
    that names it and says what is wrong, so the caller can go on to the other files."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _unreadable(path, e.strerror or str(e)) from None
    if not data:
        raise _unreadable(path, "the file is empty (0 bytes; copy it again)")
    rows = _read_jsonl(path, data) if path.suffix == ".jsonl" else _read_pickle(path, data, trust_pickle)
    if not isinstance(rows, list):
        raise DataError([Problem(path.name, None, "", f"holds a {type(rows).__name__}, expected a list of samples")])
    return rows


def _unreadable(path: Path, reason: str) -> DataError:
    return DataError([Problem(path.name, None, "", f"cannot be read: {reason}")])


def _read_pickle(path: Path, data: bytes, trust: bool):
    try:
        return loads(data, path.name, trust)
    except UnsafePickleError as e:
        raise DataError([Problem(path.name, None, "", e.reason)]) from None
    except Exception as e:  # a damaged pickle can make the unpickler raise almost any type
        raise _unreadable(path, why_unreadable(e, data)) from None


def _read_jsonl(path: Path, data: bytes) -> list:
    try:
        text = data.decode("utf-8-sig")  # JSON is UTF-8; a leading byte-order mark is harmless
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise _unreadable(path, f"not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8") from None
    # split on newlines only: str.splitlines also breaks at U+2028 and friends, which JSON strings may hold
    lines = text.split("\n")
    rows, bad = [], []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than json can follow
                bad.append((n, e))
    if not bad:
        return rows
    n, e = bad[0]
    reason = f"line {n} is not JSON ({e})"
    if len(bad) > 1:
        more = ", ".join(str(m) for m, _ in bad[1:11]) + (", ..." if len(bad) > 11 else "")
        reason += f"; line {more} is not JSON either" if len(bad) == 2 else f"; lines {more} are not JSON either"
    last = max(m for m, line in enumerate(lines, 1) if line.strip())
    if bad[-1][0] == last and not text.endswith("\n"):
        reason += f" ({CUT_SHORT})"
    raise _unreadable(path, reason)


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


def answer_problem(raw: list, messages: list, source: str, index: int) -> Problem | None:
    """A problem when the last answer holds no point that evaluation's parser reads, else None.

    The truth is read as evaluation reads it (evaluate.prompt_and_truth): the last turn's text items
    joined. `raw` is the sample as stored and `messages` its normalised form, item for item.
    """
    items = messages[-1]["content"]
    truth = "".join(item["text"] for item in items if item["type"] == "text")
    if parse_answer(truth).point is not None:
        return None
    at = f"messages[{len(messages) - 1}].content"
    texts = [i for i, item in enumerate(items) if item["type"] == "text"]
    if not isinstance(raw[-1]["content"], str) and len(texts) == 1:
        at += f"[{texts[0]}].text"
    return Problem(source, index, at, f"no point in the ground-truth answer: {_short(truth, 120)}")


def load_samples(data_cfg, log=print, scored: bool = False) -> tuple[list[Sample], dict]:
    """Load, normalise and validate every selected sample; raise one DataError listing all problems.

    A file that cannot be read is one problem and the other files are still checked. An answer without
    a point is a problem too; training may take such samples when data.allow_unparseable_answers is set
    (they are listed as a warning), but `scored` callers (eval, personalize) need every point to score.
    Returns the samples and the decoded image sizes ({image: (w, h)}).
    """
    image_root = Path(data_cfg.image_root or data_cfg.data_root)
    files = find_user_files(data_cfg.data_root, data_cfg.users, data_cfg.skip_missing_users, log)
    allow_pointless = data_cfg.allow_unparseable_answers and not scored
    samples, problems, pointless = [], [], []
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
            no_point = None if bad else answer_problem(item, messages, path.name, index)
            if no_point:
                pointless.append(no_point)
                bad = [] if allow_pointless else [no_point]
            problems.extend(bad)
            if not bad:
                samples.append(Sample(user, index, path.name, messages))
    sizes, bad_images = check_images(samples, data_cfg.validation_workers)
    problems.extend(bad_images)
    if problems:
        raise DataError(problems, _pointless_hint(scored) if pointless and not allow_pointless else "")
    if pointless:
        log(f"WARNING: training on {len(pointless)} sample(s) whose answer has no point "
            "(data.allow_unparseable_answers):\n  " + "\n  ".join(str(p) for p in pointless))
    log(f"data: {len(samples)} samples from {len(files)} users ({format_users(list(files))}), "
        f"{len(sizes)} distinct images, all decoded")
    return samples, sizes


def _pointless_hint(scored: bool) -> str:
    if scored:
        return ("Evaluation scores every answer against its point, so these samples cannot be evaluated "
                "(data.allow_unparseable_answers applies to training only).")
    return ("Each answer needs a point that evaluation can read, e.g. a ```grounding block holding [x, y]; to "
            "train on such samples anyway, pass --data.allow_unparseable_answers true.")
