"""`pigg report`: one self-contained HTML page that compares `pigg eval` run folders.

The page must open on a machine with no network (a laptop on a plane, a locked-down cluster), so
everything is inline: CSS, SVG charts, and screenshots as base64 JPEG thumbnails. Every string that
comes from the data (commands, model answers, labels, paths) is HTML-escaped, because model answers
are untrusted text. The output depends only on the inputs: no timestamps, sorted users, fixed float
formatting, so two reports of the same runs are byte-identical and diff cleanly.

Prior baselines (pigg.grounding.priors) listed in a run's metrics.json come along: shown beside the
models in every table and chart, tagged "baseline" and drawn dashed, never ranked as best and without
a gallery. The same baseline on the same samples, listed by several runs, is shown once.
"""
import base64
import html
import io
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pigg.grounding.priors import RULE, describe, point_text

HIT_RADIUS = 140  # Click Acc@140: a hit is within 140 units of the GT point in 0-1000 space
RUN_COLOURS = ("#4e79a7", "#f28e2b", "#76b7b2", "#b07aa1", "#edc948", "#9c755f", "#bab0ac", "#59a14f")
BASELINE_COLOURS = ("#3f3f46", "#7e22ce", "#c2410c", "#0f766e")  # dark and drawn dashed, apart from the models
DASH = "7 4"
# Overlay colours are saturated values that synthetic icons and JPEG noise are unlikely to produce
# exactly, so a screenshot test can find them.
GT_COLOUR, PRED_COLOUR, HIT_COLOUR, MISS_COLOUR = "#0050ff", "#ff1744", "#00c853", "#ff1744"
THUMB_BOX = (360, 720)  # max thumbnail size in pixels; keeps a 72-image page to a few MB
JPEG_QUALITY = 80
RAW_CHARS = 240  # model answers longer than this are cut in captions
PLACEHOLDER_SIZE = (180, 400)
WIDE_CHART = 1160  # viewBox width of a full-row chart: about its width on screen in a 1240 px page
REQUIRED_FIELDS = ("user", "index", "image", "command", "raw", "pred_point", "gt_point", "gt_referring",
                   "distance", "hit", "parse_ok")


@dataclass
class Run:
    label: str
    folder: Path
    metrics: dict
    predictions: list  # one dict per sample, users in numeric order, file order within a user
    colour: str = ""
    baseline: dict | None = None  # what a prior baseline answers (its metrics.json "baseline"); None: a model


# ---------------------------------------------------------------------------------------------
# Loading run folders
# ---------------------------------------------------------------------------------------------

def load_run(folder, label: str | None = None) -> Run:
    folder = Path(folder)
    path = folder / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {folder} a `pigg eval` run folder?")
    metrics = json.loads(path.read_text())
    return Run(label or metrics.get("label") or folder.name, folder, metrics, load_predictions(folder),
               baseline=metrics.get("baseline"))


def load_predictions(folder: Path) -> list:
    files = list((folder / "predictions").glob("user_*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{folder / 'predictions'} holds no user_*.jsonl files")
    rows = []
    for path in sorted(files, key=lambda p: _user_key(p.stem.split("_", 1)[1])):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                rows.append(_parse_prediction(path, number, line))
    return rows


def _parse_prediction(path: Path, number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not a JSON object ({e})") from e
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        raise ValueError(f"{path}:{number}: prediction lacks field(s) {missing}")
    return row


def _user_key(user) -> tuple:
    # Numeric order (2 before 10); a non-numeric id still sorts, after the numbers.
    text = str(user)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def load_runs(run_dirs: list, labels: list | None) -> list:
    if not run_dirs:
        raise ValueError("write_report needs at least one run folder")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} run folders")
    given = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    names = [r.label for r in given]
    if len(set(names)) != len(names):
        raise ValueError(f"run labels must differ so the charts can tell them apart, got {names}; pass labels=")
    models = [r for r in given if r.baseline is None]
    baselines = unique_baselines([("", r) for r in given if r.baseline is not None] + listed_baselines(models))
    for i, run in enumerate(models):
        run.colour = RUN_COLOURS[i % len(RUN_COLOURS)]
    for i, run in enumerate(baselines):
        run.colour = BASELINE_COLOURS[i % len(BASELINE_COLOURS)]
        if run.label in {m.label for m in models}:  # the charts key their lines by label
            run.label += " (baseline)"
    return models + baselines


def listed_baselines(models: list) -> list:
    """(the model's label, baseline run) for every available baseline the models' metrics.json list."""
    found = []
    for model in models:
        for entry in model.metrics.get("baselines", {}).values():
            if "folder" in entry:
                found.append((model.label, load_run(model.folder / entry["folder"], entry["label"])))
    return found


def unique_baselines(found: list) -> list:
    """One run per distinct baseline: the same answers to the same samples count once. Distinct ones that
    share a label (runs with different training data) are told apart by the run that lists them."""
    unique = {}
    for owner, run in found:
        answers = tuple((p["user"], p["index"], tuple(p["pred_point"] or ())) for p in run.predictions)
        unique.setdefault((run.label, answers), (owner, run))
    shared = Counter(run.label for _, run in unique.values())
    for owner, run in unique.values():
        if shared[run.label] > 1:
            run.label = f"{run.label} · {owner or run.folder.name}"
    return [run for _, run in unique.values()]


def unavailable_baselines(runs: list) -> list:
    """(label, why) of the baselines a model's metrics.json lists as not available."""
    notes = {(e["label"], e["baseline"].get("unavailable", "")) for r in runs if r.baseline is None
             for e in r.metrics.get("baselines", {}).values() if "folder" not in e}
    return sorted(notes)


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------

def esc(value) -> str:
    return html.escape(str(value), quote=True)


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def num(x) -> str:
    return "—" if x is None else f"{x:.1f}"


def count(x) -> str:
    return "—" if x is None else str(int(x))


def best_of(values: list, better: int) -> set:
    """Indices of the best values (all of them on a tie); none when fewer than two can be compared."""
    known = [v for v in values if v is not None]
    if better == 0 or len(known) < 2:
        return set()
    target = max(known) if better > 0 else min(known)
    return {i for i, v in enumerate(values) if v == target}


def swatch(colour: str) -> str:
    return f'<span class="swatch" style="background:{colour}"></span>'


def mark(run: Run) -> str:
    """A run's key in tables and legends: a colour square for a model, a dashed line for a baseline."""
    if run.baseline is None:
        return swatch(run.colour)
    return (f'<svg class="dash" width="22" height="10" viewBox="0 0 22 10"><line x1="1" y1="5" x2="21" y2="5" '
            f'stroke="{run.colour}" stroke-width="2.5" stroke-dasharray="5 3"/></svg>')


def name_of(run: Run) -> str:
    tag = '<span class="tag">baseline</span>' if run.baseline is not None else ""
    return f"{mark(run)}{esc(run.label)}{tag}"


def cells(values: list, fmt, better: int) -> str:
    best = best_of(values, better)
    return "".join(_cell(v, fmt, i in best) for i, v in enumerate(values))


def run_cells(runs: list, values: list, fmt, better: int) -> str:
    """One cell per run; baseline columns greyed, the best model highlighted."""
    best = best_among_models(runs, values, better)
    return "".join(_cell(v, fmt, i in best, r.baseline is not None) for i, (r, v) in enumerate(zip(runs, values)))


def best_among_models(runs: list, values: list, better: int) -> set:
    # A baseline is a yardstick, not a contender: it is never highlighted.
    return best_of([None if r.baseline is not None else v for r, v in zip(runs, values)], better)


def _cell(value, fmt, best: bool, baseline: bool = False) -> str:
    kind = "best" if best else "baseline" if baseline else ""
    return f'<td class="{kind}">{fmt(value)}</td>' if kind else f"<td>{fmt(value)}</td>"


# ---------------------------------------------------------------------------------------------
# Header and tables
# ---------------------------------------------------------------------------------------------

SUMMARY_ROWS = (  # (row label, metrics key, formatter, +1 higher is better / -1 lower / 0 not ranked)
    ("Click Acc@140", "click_acc_140", pct, 1),
    ("Mean L2 (0-1000 units)", "mean_l2", num, -1),
    ("Median L2 (0-1000 units)", "median_l2", num, -1),
    ("Parse-failure rate", "parse_failure_rate", pct, -1),
    ("Referring exact match", "referring_exact", pct, 1),
    ("Referring token F1", "referring_f1", pct, 1),
    ("Seed rule Click Acc@140 (replaced system's scoring)", "seed_click_acc_140", pct, 0),
)


def runs_section(runs: list) -> str:
    rows = "".join(
        f"<tr><td>{swatch(r.colour)}<b>{esc(r.label)}</b></td><td>{esc(r.metrics.get('model', '—'))}</td>"
        f"<td>{esc(r.metrics.get('adapter') or 'none (base weights)')}</td>"
        f"<td>{esc(r.metrics.get('max_new_tokens', '—'))}</td><td><code>{esc(r.folder)}</code></td></tr>"
        for r in runs if r.baseline is None)
    return ('<section><h2>Runs compared</h2><table id="runs"><thead><tr><th>Run</th><th>Model</th>'
            "<th>Adapter</th><th>max_new_tokens</th><th>Folder</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>{baselines_table(runs)}</section>")


def baselines_table(runs: list) -> str:
    baselines, missing = [r for r in runs if r.baseline is not None], unavailable_baselines(runs)
    if not baselines and not missing:
        return ('<p class="note">No prior baselines: these runs\' metrics.json list none (runs from before '
                "pigg scored them, or benchmarks).</p>")
    rows = "".join(f"<tr><td>{name_of(r)}</td><td>{esc(describe(r.baseline))}</td>"
                   f"<td>{training_of(r.baseline)}</td><td><code>{esc(r.folder)}</code></td></tr>" for r in baselines)
    rows += "".join(f'<tr class="unavailable"><td>{esc(label)}<span class="tag">baseline</span></td>'
                    f'<td colspan="3">not available: {esc(why)}</td></tr>' for label, why in missing)
    return ('<h3>Baselines</h3><table id="baselines"><thead><tr><th>Baseline</th><th>Answers</th>'
            f"<th>Fitted on</th><th>Folder</th></tr></thead><tbody>{rows}</tbody></table>"
            f'<p class="note">A baseline answers the same point whatever the screen and the command: {esc(RULE)}. '
            "It is fitted on training data only and scored like the models, on exactly their samples; it names "
            "no element, so its referring scores are 0. A model that does not beat it has learned where targets "
            "usually are, not how to find them.</p>")


def training_of(info: dict) -> str:
    """The baseline's training data, in a table cell."""
    fitted = info.get("fitted_on")
    if isinstance(fitted, dict):
        seen = fitted.get("evaluated_users_among_them")
        return (f"{fitted['users']} ({esc(fitted['chosen_by'])}) in <code>{esc(fitted['data_root'])}</code>; "
                f"training Click Acc@140 {pct(info['train_click_acc_140'])}"
                + (f'; <span class="warn">includes evaluated users {esc(seen)}</span>' if seen else ""))
    folds = info.get("folds", {})
    points = "; ".join(f"user {esc(u)}: " + " ".join(point_text(f["point"]) for _, f in sorted(folds[u].items()))
                       for u in sorted(folds, key=_user_key))
    return f'{esc(fitted)}<div class="points">{points}</div>'


def summary_section(runs: list) -> str:
    head = "".join(f'<th colspan="2"{_baseline_class(r)}>{name_of(r)}</th>' for r in runs)
    sub = "".join(f"<th{_baseline_class(r)}>micro</th><th{_baseline_class(r)}>macro</th>" for r in runs)
    body = ""
    in_box = [IN_BOX_ROW] if any("in_box" in r.metrics.get("micro", {}) for r in runs) else []
    for name, key, fmt, better in in_box + list(SUMMARY_ROWS):
        micro = [r.metrics.get("micro", {}).get(key) for r in runs]
        macro = [r.metrics.get("macro", {}).get(key) for r in runs]
        best_micro, best_macro = best_among_models(runs, micro, better), best_among_models(runs, macro, better)
        row = "".join(_cell(micro[i], fmt, i in best_micro, r.baseline is not None) +
                      _cell(macro[i], fmt, i in best_macro, r.baseline is not None) for i, r in enumerate(runs))
        body += f'<tr class="{key}"><th>{esc(name)}</th>{row}</tr>'
    sizes = "".join(f"<td>{count(r.metrics.get('micro', {}).get('n'))} samples</td>"
                    f"<td>{count(r.metrics.get('macro', {}).get('n_users'))} users</td>" for r in runs)
    body += f'<tr class="n"><th>n</th>{sizes}</tr>'
    return (f'<section><h2>Overall</h2><div class="scroll"><table id="summary"><thead><tr><th rowspan="2">Metric'
            f"</th>{head}</tr><tr>{sub}</tr></thead><tbody>{body}</tbody></table></div>"
            '<p class="note">Micro pools every sample; macro averages the per-user values, so each user '
            "counts once. Click Acc@140: the predicted point lies within 140 units of the ground truth in "
            "0-1000 space; unparsed answers count as misses. The seed rule row scores the same answers the "
            "way the replaced seed scripts did; it is shown only to compare with their old numbers. "
            "Highlighted: best model in the row." + (" Grey columns tagged baseline always answer one point (see "
            "Baselines above); they are never highlighted." if any(r.baseline is not None for r in runs) else "")
            + "</p></section>")


def _baseline_class(run: Run) -> str:
    return ' class="baseline"' if run.baseline is not None else ""


IN_BOX_ROW = ("In the target box (benchmark metric)", "in_box", pct, 1)


def benchmark_section(runs: list) -> str:
    """In-box accuracy of the benchmark runs by each breakdown of metrics.json (pigg.grounding.benchmarks);
    nothing when no run is a benchmark run."""
    shown = [r for r in runs if "breakdown" in r.metrics]
    if not shown:
        return ""
    head = "".join(f"<th>{swatch(r.colour)}{esc(r.label)}<br>{esc(r.metrics.get('benchmark', ''))}</th>" for r in shown)
    body = ""
    for label, key in (("micro: every sample", "micro"), ("macro: mean of the cells", "macro")):
        values = [r.metrics["breakdown"][key]["in_box"] for r in shown]
        body += f'<tr class="{key}"><th>{esc(label)}</th>{cells(values, pct, 1)}</tr>'
    dimensions = list(dict.fromkeys(d for r in shown for d in r.metrics["breakdown"]["by"]))
    for dim in sorted(dimensions, key=lambda d: " x " not in d):  # the benchmarks' table columns first
        body += f'<tr class="dimension"><th colspan="{len(shown) + 1}">by {esc(dim)}</th></tr>'
        for name in sorted({n for r in shown for n in r.metrics["breakdown"]["by"].get(dim, {})}):
            groups = [r.metrics["breakdown"]["by"].get(dim, {}).get(name, {}) for r in shown]
            sizes = " / ".join(sorted({count(g.get("n")) for g in groups}))
            body += (f'<tr><th>{esc(name)} <span class="k">n {esc(sizes)}</span></th>'
                     f'{cells([g.get("in_box") for g in groups], pct, 1)}</tr>')
    return (f'<section><h2>Benchmark</h2><table id="benchmark"><thead><tr><th>In the target box</th>{head}</tr>'
            f"</thead><tbody>{body}</tbody></table>"
            '<p class="note">The benchmarks\' metric: the predicted point, taken from 0-1000 to the image\'s pixels, '
            "lies inside the target box (edges included). Macro is the mean over the cells of the first "
            "breakdown (the columns of the benchmarks' tables). On a benchmark run the other tables' \"users\" "
            "are the benchmark's files and Click Acc@140 takes the box's centre as the true point.</p></section>")


def all_users(runs: list) -> list:
    return sorted({u for r in runs for u in r.metrics.get("users", {})}, key=_user_key)


def user_metric(run: Run, user: str, key: str):
    return run.metrics.get("users", {}).get(user, {}).get(key)


def per_user_section(runs: list, users: list) -> str:
    models = [r for r in runs if r.baseline is None]  # a baseline always parses: no parse-failure column

    def labels(shown):
        return "".join(f"<th{_baseline_class(r)}>{name_of(r)}</th>" for r in shown)

    head = (f'<tr><th rowspan="2">User</th><th colspan="{len(runs)}">Click Acc@140</th>'
            f'<th colspan="{len(runs)}">Median L2</th><th colspan="{len(models)}">Parse failures</th>'
            f'<th rowspan="2">n</th></tr><tr>{labels(runs) * 2}{labels(models)}</tr>')
    body = ""
    for user in users:
        row = "".join(run_cells(shown, [user_metric(r, user, key) for r in shown], fmt, better)
                      for shown, key, fmt, better in ((runs, "click_acc_140", pct, 1), (runs, "median_l2", num, -1),
                                                      (models, "parse_failure_rate", pct, -1)))
        sizes = [count(user_metric(r, user, "n")) for r in runs]
        # Runs normally share a test set; differing counts are worth seeing, so show them all then.
        n = sizes[0] if len(set(sizes)) == 1 else " / ".join(sizes)
        body += f'<tr data-user="{esc(user)}"><th>{esc(user)}</th>{row}<td>{n}</td></tr>'
    return (f'<section><h2>Per user</h2><div class="scroll"><table id="per-user"><thead>{head}</thead>'
            f"<tbody>{body}</tbody></table></div>"
            '<p class="note">Highlighted: the best model for that user and metric (all of them on a tie); '
            "baselines are not ranked.</p></section>")


# ---------------------------------------------------------------------------------------------
# Charts (inline SVG; coordinates rounded to 0.1 px so the output is stable)
# ---------------------------------------------------------------------------------------------

def legend(runs: list, notes: list | None = None) -> str:
    items = "".join(f"<span>{mark(r)}{esc(r.label)}{' (baseline)' if r.baseline is not None else ''}"
                    f"{esc(notes[i]) if notes else ''}</span>" for i, r in enumerate(runs))
    return f'<div class="legend">{items}</div>'


def _f(x: float) -> str:
    return f"{x:.1f}"


def bar_chart(runs: list, users: list) -> str:
    """Grouped bars of per-user Click Acc@140, one colour per model; each baseline a dashed line across
    the user's bars."""
    models = [r for r in runs if r.baseline is None]
    # Few users share a row with the CDF; more get the full row, drawn at about 1:1 so the text keeps
    # its size, and scroll sideways once bars would get thinner than ~10 px.
    needed = 70 + len(users) * (len(models) * 10 + 8)
    width = 600 if needed <= 600 else max(WIDE_CHART, needed)
    height, left, right, top, bottom = 340, 56, 12, 20, 52
    plot_w, plot_h = width - left - right, height - top - bottom
    group = plot_w / max(1, len(users))
    bar = group * 0.8 / max(1, len(models))
    parts = _y_grid(left, top, plot_w, plot_h, [(i / 5, f"{20 * i}%") for i in range(6)])
    label_every = math.ceil(24 / group)  # thin the user labels so they never overlap
    for g, user in enumerate(users):
        x0 = left + g * group + group * 0.1
        parts += _bar_group(models, user, x0, bar, top + plot_h, plot_h)
        parts += _baseline_marks([r for r in runs if r.baseline is not None], user, x0, group * 0.8, top + plot_h,
                                 plot_h)
        if g % label_every == 0:
            parts.append(f'<text x="{_f(left + (g + 0.5) * group)}" y="{height - bottom + 16}" '
                         f'text-anchor="middle">{esc(user)}</text>')
    parts += _axis_titles(width, height, left, top, plot_h, "user", "Click Acc@140")
    wide = " wide" if width > 600 else ""
    scroll = f' style="min-width:{width}px"' if width > WIDE_CHART else ""
    return (f'<figure class="chart{wide}"><figcaption>Click Acc@140 per user</figcaption>{legend(runs)}'
            f'<svg id="bar-chart" viewBox="0 0 {width} {height}"{scroll} role="img">{"".join(parts)}</svg></figure>')


def _bar_group(runs: list, user: str, x0: float, bar: float, base: float, plot_h: float) -> list:
    parts = []
    for i, run in enumerate(runs):
        acc = user_metric(run, user, "click_acc_140")
        if acc is None:
            continue  # the user is not in this run: no bar, rather than a misleading 0%
        h = plot_h * acc
        parts.append(f'<rect class="bar" data-user="{esc(user)}" data-run="{esc(run.label)}" '
                     f'x="{_f(x0 + i * bar)}" y="{_f(base - h)}" width="{_f(bar)}" height="{_f(h)}" '
                     f'fill="{run.colour}"><title>user {esc(user)}, {esc(run.label)}: {pct(acc)}</title></rect>')
        if bar >= 34:  # value labels only where they fit over the bar
            parts.append(f'<text class="value" x="{_f(x0 + (i + 0.5) * bar)}" y="{_f(base - h - 4)}" '
                         f'text-anchor="middle">{pct(acc)}</text>')
    return parts


def _baseline_marks(baselines: list, user: str, x0: float, span: float, base: float, plot_h: float) -> list:
    parts = []
    for run in baselines:
        acc = user_metric(run, user, "click_acc_140")
        if acc is not None:
            y = _f(base - plot_h * acc)
            parts.append(f'<line class="prior" data-user="{esc(user)}" data-run="{esc(run.label)}" x1="{_f(x0 - 2)}" '
                         f'y1="{y}" x2="{_f(x0 + span + 2)}" y2="{y}" stroke="{run.colour}" stroke-width="2.5" '
                         f'stroke-dasharray="{DASH}"><title>user {esc(user)}, {esc(run.label)} (baseline): '
                         f"{pct(acc)}</title></line>")
    return parts


def _y_grid(left, top, plot_w, plot_h, ticks) -> list:
    parts = []
    for fraction, label in ticks:
        y = top + plot_h * (1 - fraction)
        parts.append(f'<line class="grid" x1="{left}" y1="{_f(y)}" x2="{left + plot_w}" y2="{_f(y)}"/>'
                     f'<text x="{left - 6}" y="{_f(y + 4)}" text-anchor="end">{label}</text>')
    parts.append(f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/>'
                 f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>')
    return parts


def _axis_titles(width, height, left, top, plot_h, x_title, y_title) -> list:
    return [f'<text class="title" x="{_f(left + (width - left) / 2)}" y="{height - 8}" '
            f'text-anchor="middle">{esc(x_title)}</text>',
            f'<text class="title" transform="translate(14 {_f(top + plot_h / 2)}) rotate(-90)" '
            f'text-anchor="middle">{esc(y_title)}</text>']


CDF_X_CAP = 1500  # the CDF's x axis ends here at the latest


def cdf_steps(distances: list, n_total: int) -> list:
    """Corners of the empirical CDF: y at x is the fraction of ALL n_total samples with distance <= x.

    Unparsed answers have no distance but stay in n_total, so a run that fails to parse never
    reaches 1; that is the honest picture of how many clicks land within x.
    """
    points, below = [(0.0, 0.0)], 0
    for d, k in sorted(Counter(distances).items()):
        below += k
        points += [(float(d), points[-1][1]), (float(d), below / n_total)]
    return points


def cdf_chart(runs: list) -> str:
    distances = {r.label: [p["distance"] for p in r.predictions if p["distance"] is not None] for r in runs}
    longest = max((max(d) for d in distances.values() if d), default=0)
    # 0-1000 space allows up to ~1414 between two points on the screen; an answer off the screen (a
    # model can write [83383, 8333]) is drawn at the right edge instead of squeezing the rest to nothing
    x_max = max(1000, math.ceil(min(longest, CDF_X_CAP) / 100) * 100)
    beyond = sum(d > x_max for ds in distances.values() for d in ds)
    width, height, left, right, top, bottom = 600, 340, 56, 16, 16, 52
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x, y):
        return f"{_f(left + plot_w * x / x_max)},{_f(top + plot_h * (1 - y))}"

    parts = _y_grid(left, top, plot_w, plot_h, [(i / 5, f"{i / 5:.1f}") for i in range(6)])
    for x in range(0, x_max + 1, 100 if x_max <= 1000 else 200):
        parts.append(f'<text x="{_f(left + plot_w * x / x_max)}" y="{height - bottom + 16}" '
                     f'text-anchor="middle">{x}</text>')
    marker = left + plot_w * HIT_RADIUS / x_max
    parts.append(f'<line class="marker" x1="{_f(marker)}" y1="{top}" x2="{_f(marker)}" y2="{top + plot_h}"/>'
                 f'<text class="marker-label" x="{_f(marker + 4)}" y="{top + 12}">{HIT_RADIUS}</text>')
    notes, lines = [], []
    for run in runs:
        steps = cdf_steps(distances[run.label], len(run.predictions)) if run.predictions else [(0.0, 0.0)]
        steps.append((float(x_max), steps[-1][1]))
        dash = f' stroke-dasharray="{DASH}"' if run.baseline is not None else ""
        points = " ".join(px(min(x, x_max), y) for x, y in steps)
        lines.append((run.baseline is None, f'<polyline class="cdf" data-run="{esc(run.label)}" fill="none" '
                      f'stroke="{run.colour}" stroke-width="2"{dash} points="{points}"/>'))
        # a baseline always answers a point: its parsed share says nothing
        notes.append("" if run.baseline is not None else f" — parsed {pct(steps[-1][1])}")
    parts += [line for _, line in sorted(lines, key=lambda kv: kv[0])]  # baselines first, models drawn over them
    parts += _axis_titles(width, height, left, top, plot_h, "L2 distance to ground truth (0-1000 units)",
                          "fraction of all samples")
    return (f'<figure class="chart"><figcaption>CDF of L2 distance</figcaption>{legend(runs, notes)}'
            f'<svg id="cdf-chart" viewBox="0 0 {width} {height}" role="img">{"".join(parts)}</svg>'
            '<p class="note">y = fraction of ALL samples whose prediction lies within distance x of the ground '
            "truth. Unparsed answers have no distance but stay in the denominator, so a run with parse "
            f"failures never reaches 1. The dashed black line marks {HIT_RADIUS}, the Click Acc radius; dashed "
            "coloured lines are baselines."
            + (f" {beyond} answer(s) lie farther than {x_max} (off the screen): the curves reach them at the "
               "right edge." if beyond else "") + "</p></figure>")


def charts_section(runs: list, users: list) -> str:
    return f'<section><h2>Charts</h2><div class="charts">{bar_chart(runs, users)}{cdf_chart(runs)}</div></section>'


# ---------------------------------------------------------------------------------------------
# Gallery
# ---------------------------------------------------------------------------------------------

def worst_first(predictions: list) -> list:
    """Unparsed answers first, then misses by falling distance; user and index break ties."""
    return sorted(predictions, key=lambda p: (p["distance"] is not None, -(p["distance"] or 0),
                                              _user_key(p["user"]), p["index"]))


def find_image(folder: Path, image: str) -> Path:
    path = Path(image)
    if path.is_absolute() or path.is_file():
        return path
    return folder / path  # relative paths that are not relative to the cwd may be relative to the run


def thumbnail(path: Path, cache: dict):
    """(data URI, width, height) of a JPEG thumbnail, or an error string when the file can't be read."""
    key = str(path)
    if key not in cache:
        cache[key] = _encode_thumbnail(path)
    return cache[key]


def _encode_thumbnail(path: Path):
    if not path.is_file():
        return f"image not found: {path}"
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except OSError as e:
        return f"image unreadable: {path} ({e})"
    im.thumbnail(THUMB_BOX)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), im.width, im.height


def overlay_svg(p: dict, thumb) -> str:
    """The screenshot with GT (blue), prediction (red) and the 140-unit hit region around the GT.

    The region is a circle in 0-1000 space, which on a non-square screen is an ellipse in pixels:
    x and y are scaled by width and height separately.
    """
    if isinstance(thumb, str):
        w, h = PLACEHOLDER_SIZE
        back = (f'<rect class="placeholder" width="{w}" height="{h}" fill="#e5e7eb"/>'
                f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" fill="#6b7280">image missing</text>')
    else:
        uri, w, h = thumb
        back = f'<image href="{uri}" width="{w}" height="{h}"/>'
    gx, gy = p["gt_point"][0] * w / 1000, p["gt_point"][1] * h / 1000
    ring = HIT_COLOUR if p["hit"] else MISS_COLOUR
    dot = max(3.0, 0.028 * w)
    parts = [back, f'<ellipse class="region" cx="{_f(gx)}" cy="{_f(gy)}" rx="{_f(HIT_RADIUS * w / 1000)}" '
                   f'ry="{_f(HIT_RADIUS * h / 1000)}" fill="none" stroke="{ring}" stroke-width="2.5"/>']
    if p["pred_point"] is not None:
        px, py = p["pred_point"][0] * w / 1000, p["pred_point"][1] * h / 1000
        parts.append(f'<line x1="{_f(gx)}" y1="{_f(gy)}" x2="{_f(px)}" y2="{_f(py)}" stroke="#111" '
                     f'stroke-width="1" stroke-dasharray="3 2"/>'
                     f'<circle class="pred" cx="{_f(px)}" cy="{_f(py)}" r="{_f(dot)}" fill="{PRED_COLOUR}"/>')
    parts.append(f'<circle class="gt" cx="{_f(gx)}" cy="{_f(gy)}" r="{_f(dot)}" fill="{GT_COLOUR}"/>')
    if p.get("gt_box") and p.get("image_size"):  # a benchmark's target box, in the image's pixels
        sx, sy = w / p["image_size"][0], h / p["image_size"][1]
        x1, y1, x2, y2 = p["gt_box"]
        parts.append(f'<rect class="box" x="{_f(x1 * sx)}" y="{_f(y1 * sy)}" width="{_f((x2 - x1) * sx)}" '
                     f'height="{_f((y2 - y1) * sy)}" fill="none" stroke="{GT_COLOUR}" stroke-width="1.5"/>')
    return f'<svg class="shot" viewBox="0 0 {w} {h}">{"".join(parts)}</svg>'


def status_of(p: dict) -> tuple:
    if p["distance"] is None:
        return "unparsed", "unparsed answer"
    return ("hit", f"hit · L2 {p['distance']:.1f}") if p["hit"] else ("miss", f"miss · L2 {p['distance']:.1f}")


def card(run: Run, p: dict, cache: dict) -> str:
    # pigg eval records no path for images that were stored in the pickle as bytes
    thumb = thumbnail(find_image(run.folder, p["image"]), cache) if p["image"] else "no image path recorded"
    kind, status = status_of(p)
    if "in_box" in p and p["parse_ok"]:  # a benchmark's sample
        status += " · in the box" if p["in_box"] else " · outside the box"
    raw = p["raw"] if len(p["raw"]) <= RAW_CHARS else p["raw"][:RAW_CHARS] + "…"
    pred = "—" if p["pred_point"] is None else f"{p.get('pred_referring') or '—'} · {p['pred_point']}"
    missing = f'<div class="warn">{esc(thumb)}</div>' if isinstance(thumb, str) else ""
    return (f'<figure class="card" data-user="{esc(p["user"])}" data-index="{esc(p["index"])}">'
            f"{overlay_svg(p, thumb)}<figcaption>"
            f'<div class="status {kind}">{status}</div>'
            f'<div><b>user {esc(p["user"])}</b> · sample {esc(p["index"])}</div>'
            f'<div class="cmd">{esc(p["command"])}</div>'
            f'<div><span class="k">GT</span> {esc(p["gt_referring"] or "—")} · {esc(p["gt_point"])}</div>'
            f'<div><span class="k">pred</span> {esc(pred)}</div>'
            f"<pre>{esc(raw)}</pre>{missing}</figcaption></figure>")


def gallery_section(run: Run, per_run: int, cache: dict) -> str:
    shown = worst_first(run.predictions)[:per_run]
    kinds = Counter(status_of(p)[0] for p in run.predictions)
    summary = (f"showing {len(shown)} of {len(run.predictions)} samples, worst first "
               f"({kinds['unparsed']} unparsed, {kinds['miss']} misses, {kinds['hit']} hits)")
    cards = "".join(card(run, p, cache) for p in shown)
    return (f'<section class="gallery" data-run="{esc(run.label)}"><h3>{swatch(run.colour)}{esc(run.label)}</h3>'
            f'<p class="note">{summary}</p><div class="cards">{cards}</div></section>')


def gallery_key() -> str:
    return (f'<p class="note">Blue dot: ground truth. Red dot: prediction (none when the answer had no '
            f"parseable point). Ring: {HIT_RADIUS} units around the ground truth in 0-1000 space (an ellipse "
            "on a non-square screen), green for a hit, red for a miss. Blue rectangle: a benchmark's target box.</p>")


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;
background:#f7f8fa;color:#1f2328;font-size:14px;line-height:1.4}
main{max-width:1240px;margin:0 auto;padding:20px 24px 48px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #d0d7de;
padding-bottom:4px}h3{font-size:16px;margin:20px 0 4px}
table{border-collapse:collapse;background:#fff;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8dee4;padding:4px 10px;text-align:right;white-space:nowrap}
thead th{background:#eaeef2;text-align:center}tbody th{text-align:left;font-weight:600}
#runs td{text-align:left}tbody tr:nth-child(even){background:#f3f5f8}
td.best{background:#d7f5dd;font-weight:700}
td.baseline,th.baseline{background:#eeeeea;color:#3f3f46}td.baseline{font-style:italic}
.tag{display:inline-block;margin-left:6px;padding:0 5px;border:1px solid #8c959f;border-radius:8px;font-size:10.5px;
font-weight:600;font-style:normal;color:#57606a;line-height:15px;vertical-align:1px}
.dash,.chart svg.dash{display:inline;width:22px;height:10px;vertical-align:0;margin-right:5px}
#baselines{width:100%}#baselines td{text-align:left;white-space:normal}#baselines td:first-child{white-space:nowrap}
#baselines td:nth-child(2){width:30%}#baselines code{overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%}#summary tbody th{white-space:normal;min-width:200px}
#baselines .points{color:#57606a;font-size:12px;margin-top:2px}tr.unavailable td{color:#9a6700}
.note{color:#57606a;font-size:12.5px;max-width:980px}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:16px}
.chart{margin:0;background:#fff;border:1px solid #d8dee4;border-radius:6px;padding:10px 12px}
.chart.wide{grid-column:1/-1;overflow-x:auto}.chart>figcaption{font-weight:600;font-size:15px}
.chart svg{width:100%;height:auto;display:block}
.chart text{font-size:11px;fill:#424a53}.chart text.value{font-size:10px;fill:#1f2328}
.chart text.title{font-size:12px;fill:#1f2328}
.grid{stroke:#e1e4e8}.axis{stroke:#57606a}.marker{stroke:#1f2328;stroke-dasharray:5 4}
.chart text.marker-label{fill:#1f2328;font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;margin:6px 0;font-size:12.5px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.card{margin:0;background:#fff;border:1px solid #d8dee4;border-radius:6px;padding:8px;overflow:hidden}
.shot{width:100%;height:auto;display:block;border-radius:3px;background:#eee}
.shot ellipse,.shot line,.shot circle{vector-effect:non-scaling-stroke}
.shot circle{stroke:#fff;stroke-width:1.5}
.card figcaption{font-size:12px;margin-top:6px;overflow-wrap:anywhere}
.card .cmd{font-style:italic;margin:2px 0}.k{color:#57606a;font-size:11px;text-transform:uppercase}
.card pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f8fa;border-radius:3px;padding:4px;
margin:4px 0 0;font-size:11px;max-height:9em;overflow:auto}
.status{font-weight:700}.status.hit{color:#1a7f37}.status.miss{color:#cf222e}.status.unparsed{color:#8250df}
.warn{color:#9a6700;font-weight:600}
code{font-size:12px}
"""


def render_page(runs: list, gallery_per_run: int) -> str:
    users = all_users(runs)
    cache = {}  # runs usually share screenshots: encode each once
    models = [r for r in runs if r.baseline is None]  # a baseline's answers are one point: no gallery
    galleries = "".join(gallery_section(r, gallery_per_run, cache) for r in models)
    title = "pigg evaluation report: " + " vs ".join(r.label for r in models)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{esc(title)}</h1>{runs_section(runs)}{summary_section(runs)}{benchmark_section(runs)}"
            f"{per_user_section(runs, users)}{charts_section(runs, users)}"
            f"<section><h2>Gallery</h2>{gallery_key()}{galleries}</section></main></body></html>\n")


def write_report(run_dirs: list, out_html=None, labels: list[str] | None = None, gallery_per_run: int = 24) -> Path:
    """Write one self-contained HTML page comparing `pigg eval` run folders; return its path.

    labels default to each run's metrics.json "label", else its folder name; out_html defaults to
    report.html in the first run's folder.
    """
    runs = load_runs(run_dirs, labels)
    out = Path(out_html) if out_html is not None else Path(run_dirs[0]) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(render_page(runs, gallery_per_run).encode("utf-8"))  # bytes: no newline translation
    return out
