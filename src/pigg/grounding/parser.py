"""Read an answer (a model's or the ground truth's, with the same function) into a name and a point.

The canonical answer is a ```referring block with the element's name and a ```grounding block with
its point in relative 0-1000 coordinates. Models drift from it, zero-shot Qwen3-VL most of all, so
`parse_answer` accepts, in this order of preference:

1. Qwen3-VL's JSON: `{"point_2d": [x, y]}` or `{"bbox_2d": [x1, y1, x2, y2]}`, alone, in a list or
   in a ```json fence; its "label" is the referring when there is no referring block.
2. `[x1, y1] to [x2, y2]` (or round brackets) and bracketed tuples `[x, y]`, `[x1, y1, x2, y2]`,
   whichever comes first; a "to" pair wins over its own first corner.
3. Bare `x, y` and `x1, y1, x2, y2` with no brackets, only when nothing bracketed was found.

A box counts as its centre: the element is inside it, its first corner usually is not.

Where points are looked for: only inside the ```grounding block when there is one, so numbers in the
element's name ("button 2, 3") or the reasoning never pass for the answer; an answer whose grounding
block holds no point is a parse failure even if numbers appear elsewhere. Without a grounding block
the whole answer is searched.

Decisions:
- Coordinates are read as written, negative ones and ones above 1000 included, never clamped: an
  answer at (-5, 10) pointed somewhere, and the distance metric judges how far off it was.
- In JSON too, two numbers are a point and four a box, whatever the key says.
- A tuple of any other length (one number, three, five) is not a point. A number glued to letters or
  dots ("v2", "1.2.3", "12px") is not a coordinate. Non-finite values (a 400-digit number) are dropped.
- Anything else gives `point=None`, never a stand-in (0, 0); no input string makes this module raise.
- An empty referring block counts as absent.

`seed_point` keeps the replaced system's rule only so reports can show its numbers next to ours.
"""
import json
import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Parsed:
    referring: str | None
    """Text of the referring block (or the JSON label when that block is missing), stripped."""
    point: tuple[float, float] | None
    """(x, y) in 0-1000 space; None when no point could be read."""
    kind: str | None
    """How the point was read, for debugging: point, box, box_to, bare_point, bare_box, point_2d, bbox_2d."""


def _block(name: str) -> re.Pattern:
    # An unclosed block runs to the end: generation often stops at max_new_tokens before the fence.
    return re.compile(r"```[ \t]*" + name + r"\b[ \t]*\n?(.*?)(?:```|\Z)", re.IGNORECASE | re.DOTALL)


REFERRING_BLOCK = _block("referring")
GROUNDING_BLOCK = _block("grounding")
# The lookarounds keep digits out of words, versions and units; a '-' after a word is a hyphen, not a sign.
NUMBER = re.compile(r"(?<![\w.\-])-?\d+(?:\.\d+)?(?![\w]|\.\d)")
COMMA = re.compile(r"\s*,\s*")
TO = re.compile(r"\s*to\s*", re.IGNORECASE)
JSON_OBJECT = re.compile(r"\{[^{}]*")  # up to the next brace, so a truncated object still counts
JSON_COORDS = re.compile(r"""["'](point_2d|bbox_2d)["']\s*:\s*\[([^\[\]]*)\]""")
JSON_LABEL = re.compile(r""""label"\s*:\s*"((?:[^"\\]|\\.)*)"|'label'\s*:\s*'([^']*)'""")
SEED_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class _Run:
    """Numbers joined only by commas, with the bracket positions around them (-1 when bare)."""
    values: tuple[float, ...]
    start: int
    end: int
    open: int
    close: int


def parse_answer(text: str) -> Parsed:
    if not isinstance(text, str):
        return Parsed(None, None, None)
    referring = _block_text(REFERRING_BLOCK, text)
    grounding = _block_text(GROUNDING_BLOCK, text, strip=False)
    region = text if grounding is None else grounding
    point, kind, label = _json_point(region)
    if point is None:
        point, kind = _tuple_point(region)
        label = None
    return Parsed(referring if referring is not None else label, point, kind)


def seed_point(text: str) -> tuple[float, float]:
    """The replaced system's rule: the first two numbers of the grounding block (or the whole text),
    (0, 0) when there are fewer. A box thus gives its first corner. For comparison only."""
    if not isinstance(text, str):
        return (0.0, 0.0)
    block = _block_text(GROUNDING_BLOCK, text, strip=False)
    numbers = SEED_NUMBER.findall(text if block is None else block)
    if len(numbers) < 2:
        return (0.0, 0.0)
    return (float(numbers[0]), float(numbers[1]))


def _block_text(pattern: re.Pattern, text: str, strip: bool = True) -> str | None:
    m = pattern.search(text)
    if m is None:
        return None
    if not strip:
        return m.group(1)
    return m.group(1).strip() or None


def _as_point(values, kind: str):
    """A point from 2 values, a box centre from 4; None for other lengths or non-finite results."""
    if len(values) == 2:
        point = (values[0], values[1])
    elif len(values) == 4:
        point = ((values[0] + values[2]) / 2, (values[1] + values[3]) / 2)
    else:
        return None, None
    if not all(math.isfinite(v) for v in point):
        return None, None
    return point, kind


def _json_point(region: str):
    """The first JSON object (or bare key) with a well-formed point_2d/bbox_2d, and its label."""
    for segment in [m.group() for m in JSON_OBJECT.finditer(region)] or [region]:
        m = JSON_COORDS.search(segment)
        if m is None:
            continue
        key, inside = m.groups()
        runs = _runs(inside)
        # The list must be nothing but its numbers, so [1, 2, "x"] is not read as a point.
        if len(runs) != 1 or inside.strip() != inside[runs[0].start:runs[0].end]:
            continue
        # The count, not the key, says point or box: a "point_2d" of four numbers is still a box.
        point, kind = _as_point(runs[0].values, key)
        if point is not None:
            return point, kind, _json_label(segment)
    return None, None, None


def _json_label(segment: str) -> str | None:
    m = JSON_LABEL.search(segment)
    if m is None:
        return None
    if m.group(2) is not None:
        return m.group(2).strip() or None
    try:
        label = json.loads('"' + m.group(1) + '"')
    except ValueError:  # a malformed escape: keep the raw text rather than lose the label
        label = m.group(1)
    return label.strip() or None


def _tuple_point(region: str):
    runs = _runs(region)
    bracketed = [r for r in runs if r.open >= 0]
    for i, run in enumerate(bracketed):
        after = bracketed[i + 1] if i + 1 < len(bracketed) else None
        if after is not None and len(run.values) == 2 == len(after.values) \
                and TO.fullmatch(region, run.close + 1, after.open):
            point, kind = _as_point(run.values + after.values, "box_to")
        else:
            point, kind = _as_point(run.values, "box" if len(run.values) == 4 else "point")
        if point is not None:
            return point, kind
    for run in runs:
        if run.open < 0:
            point, kind = _as_point(run.values, "bare_box" if len(run.values) == 4 else "bare_point")
            if point is not None:
                return point, kind
    return None, None


def _runs(region: str) -> list[_Run]:
    """Group the numbers of `region` into comma-joined runs and note the brackets around each."""
    groups = []
    for m in NUMBER.finditer(region):
        if groups and COMMA.fullmatch(region, groups[-1][-1].end(), m.start()):
            groups[-1].append(m)
        else:
            groups.append([m])
    runs = []
    for group in groups:
        start, end = group[0].start(), group[-1].end()
        open_at, close_at = _bracket_before(region, start), _bracket_after(region, end)
        if open_at < 0 or close_at < 0:
            open_at = close_at = -1
        runs.append(_Run(tuple(float(m.group()) for m in group), start, end, open_at, close_at))
    return runs


def _bracket_before(region: str, i: int) -> int:
    i -= 1
    while i >= 0 and region[i].isspace():
        i -= 1
    return i if i >= 0 and region[i] in "[(" else -1


def _bracket_after(region: str, i: int) -> int:
    while i < len(region) and region[i].isspace():
        i += 1
    return i if i < len(region) and region[i] in "])" else -1
