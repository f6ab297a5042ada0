import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from pigg.grounding import report
from report_fixtures import GLOBAL_PRIOR, PLANS, attach_priors, make_data, prior_metrics, user_prior_points, write_run

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT = "<script>alert(1)</script>"
RAW = 'no point here <img src="x" onerror="alert(2)">'


def hostile(row):
    """Untrusted text in the places the page shows it."""
    if (row["user"], row["index"]) == (1, 1):
        return {**row, "command": SCRIPT}
    if (row["user"], row["index"]) == (2, 0):
        return {**row, "raw": RAW}
    return row


def missing_image(row):
    if (row["user"], row["index"]) == (3, 0):
        return {**row, "image": "/nonexistent/screen.png"}
    if (row["user"], row["index"]) == (1, 2):
        return {**row, "image": None}  # what pigg eval writes for images stored as bytes
    return row


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("report")
    return [write_run(root / "vanilla", "vanilla", data, PLANS["vanilla"], hostile),
            write_run(root / "global", "global", data, PLANS["global"], missing_image),
            write_run(root / "personalized", "personalized", data, PLANS["personalized"])]


@pytest.fixture(scope="module")
def page(runs):
    out = report.write_report(runs)
    assert out == runs[0] / "report.html"
    return out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def prior_runs(tmp_path_factory, runs, data):
    """The three runs, each listing the same global and user prior (as personalization writes them)."""
    root = tmp_path_factory.mktemp("with_priors")
    return [attach_priors(shutil.copytree(r, root / r.name), data) for r in runs]


@pytest.fixture(scope="module")
def prior_page(prior_runs):
    return report.write_report(prior_runs, prior_runs[0].parent / "report.html").read_text(encoding="utf-8")


class Tables(HTMLParser):
    """Body rows of every <table id=...>: {id: [[(text, is_best), ...], ...]}; each cell's class in
    `classes`, the same shape."""

    def __init__(self):
        super().__init__()
        self.tables, self.table, self.row, self.cell, self.in_body = {}, None, None, None, False
        self.classes, self.class_row = {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table = self.tables.setdefault(attrs.get("id"), [])
            self.class_table = self.classes.setdefault(attrs.get("id"), [])
        elif tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.row, self.class_row = [], []
            self.table.append(self.row)
            self.class_table.append(self.class_row)
        elif tag in ("td", "th") and self.row is not None:
            self.cell = ["", attrs.get("class") == "best"]
            self.class_row.append(attrs.get("class"))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.row.append((self.cell[0].strip(), self.cell[1]))
            self.cell = None
        elif tag == "tr":
            self.row = None
        elif tag == "tbody":
            self.in_body = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[0] += data


def tables_of(page, classes=False):
    parser = Tables()
    parser.feed(page)
    return (parser.tables, parser.classes) if classes else parser.tables


def section(page, start_marker, end_marker):
    return page[page.index(start_marker):page.index(end_marker, page.index(start_marker))]


def test_page_is_self_contained(page):
    assert page.startswith("<!DOCTYPE html>") and page.count("<html") == 1 and page.rstrip().endswith("</html>")
    assert "<link" not in page and "<script" not in page  # no JS at all; the one in the data is escaped
    references = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert references and all(r.startswith("data:image/jpeg;base64,") for r in references)
    assert not re.search(r"url\(", page)
    assert len(page) < 1_500_000


def test_summary_table_values(page):
    rows = {r[0][0]: [text for text, _ in r[1:]] for r in tables_of(page)["summary"]}
    # micro/macro per run: vanilla 7/17 hits, users 2/6, 2/5, 3/6; global 13/17; personalized 15/17
    assert rows["Click Acc@140"] == ["41.2%", "41.1%", "76.5%", "76.7%", "88.2%", "87.8%"]
    # vanilla parses 14 of 17; users 1/6, 2/5, 0/6 unparsed
    assert rows["Parse-failure rate"][:2] == ["17.6%", "18.9%"]
    assert rows["n"] == ["17 samples", "3 users"] * 3
    seed = [k for k in rows if k.startswith("Seed rule")]
    assert seed == ["Seed rule Click Acc@140 (replaced system's scoring)"]


def test_per_user_table_has_hand_computed_values_and_best_runs(page):
    rows = tables_of(page)["per-user"]
    assert [r[0][0] for r in rows] == ["1", "2", "3"]
    acc = [r[1:4] for r in rows]
    assert acc == [
        [("33.3%", False), ("83.3%", False), ("100.0%", True)],
        [("40.0%", False), ("80.0%", True), ("80.0%", True)],  # a tie highlights both
        [("50.0%", False), ("66.7%", False), ("83.3%", True)],
    ]
    # vanilla user 1 parsed distances 300, 200, 10, 150, 0: median 150; lowest median is best
    assert rows[0][4] == ("150.0", False) and rows[0][6] == ("0.0", True)
    assert [r[7][0] for r in rows] == ["16.7%", "40.0%", "0.0%"]  # vanilla parse failures
    assert [r[-1][0] for r in rows] == ["6", "5", "6"]


def test_bar_chart_has_one_bar_per_user_and_run(page):
    chart = section(page, '<svg id="bar-chart"', "</svg>")
    bars = re.findall(r'<rect class="bar" data-user="(\d+)" data-run="(\w+)"[^>]* height="([\d.]+)"', chart)
    assert [(u, r) for u, r, _ in bars] == [(u, r) for u in "123" for r in ("vanilla", "global", "personalized")]
    height = {(u, r): float(h) for u, r, h in bars}
    assert height[("1", "personalized")] == pytest.approx(2 * height[("3", "vanilla")], abs=0.1)  # 100% vs 50%
    for tick in ("0%", "20%", "40%", "60%", "80%", "100%"):
        assert f">{tick}</text>" in chart
    assert "Click Acc@140</text>" in chart and ">user</text>" in chart


def test_user_missing_from_a_run_gets_a_dash_and_no_bar(runs, data, tmp_path):
    partial = write_run(tmp_path / "partial", "partial", data, {1: PLANS["global"][1], 3: PLANS["global"][3]})
    page = report.write_report([runs[0], partial], tmp_path / "r.html").read_text()
    user_2 = tables_of(page)["per-user"][1]
    assert user_2[0][0] == "2" and user_2[1:3] == [("40.0%", False), ("—", False)] and user_2[-1][0] == "5 / —"
    bars = re.findall(r'<rect class="bar" data-user="(\d+)" data-run="(\w+)"', page)
    assert bars == [("1", "vanilla"), ("1", "partial"), ("2", "vanilla"), ("3", "vanilla"), ("3", "partial")]


def test_cdf_steps_count_unparsed_in_the_denominator():
    assert report.cdf_steps([200, 10, 10], 4) == [(0.0, 0.0), (10.0, 0.0), (10.0, 0.5), (200.0, 0.5), (200.0, 0.75)]


def test_cdf_chart_ends_at_the_parsed_fraction(page):
    chart = section(page, '<svg id="cdf-chart"', "</svg>")
    ys = {}
    for run, points in re.findall(r'<polyline class="cdf" data-run="(\w+)"[^>]* points="([^"]+)"', chart):
        ys[run] = [float(p.split(",")[1]) for p in points.split()]
    zero, one = ys["personalized"][0], ys["personalized"][-1]  # personalized parses everything
    assert (zero - ys["vanilla"][-1]) / (zero - one) == pytest.approx(14 / 17, abs=0.002)
    assert (zero - ys["global"][-1]) / (zero - one) == pytest.approx(16 / 17, abs=0.002)
    assert 'class="marker"' in chart and ">140</text>" in chart
    assert "parsed 82.4%" in page and "never reaches 1" in page


def test_cdf_chart_draws_answers_off_the_screen_at_its_edge(tmp_path):
    far = report.Run(label="far", folder=tmp_path, metrics={}, colour="#000",
                     predictions=[{"distance": 83000.0}, {"distance": 10.0}])
    chart = report.cdf_chart([far])
    ticks = [int(t) for t in re.findall(r'text-anchor="middle">(\d+)</text>', chart)]
    assert ticks == list(range(0, report.CDF_X_CAP + 1, 200))  # not 415 labels up to 83,000
    xs = [float(p.split(",")[0]) for p in re.search(r'points="([^"]+)"', chart).group(1).split()]
    assert max(xs) == pytest.approx(600 - 16)  # the plot's right edge, not 55 times beyond it
    assert "1 answer(s) lie farther than 1500 (off the screen)" in chart


def cards_of(page, run):
    gallery = section(page, f'<section class="gallery" data-run="{run}"', "</section>")
    found = re.findall(r'<figure class="card" data-user="(\d+)" data-index="(\d+)"', gallery)
    return [(int(u), int(i)) for u, i in found]


def test_gallery_lists_unparsed_then_worst_misses(page):
    # vanilla: unparsed (1,0) (2,0) (2,1); then distances 500 (3,0), 400 (2,2), 300 (1,1), 250 (3,2)
    assert cards_of(page, "vanilla")[:7] == [(1, 0), (2, 0), (2, 1), (3, 0), (2, 2), (1, 1), (3, 2)]
    assert len(cards_of(page, "vanilla")) == 17
    assert cards_of(page, "personalized")[:2] == [(3, 5), (2, 4)]  # 480, 450


def test_gallery_limit(runs, tmp_path):
    page = report.write_report(runs, tmp_path / "r.html", gallery_per_run=4).read_text()
    assert cards_of(page, "global") == [(3, 0), (2, 1), (1, 2), (3, 4)]  # unparsed, then 450, 200, 150
    assert "showing 4 of 17 samples, worst first (1 unparsed, 3 misses, 13 hits)" in page


def card_html(page, run, user, index):
    gallery = section(page, f'<section class="gallery" data-run="{run}"', "</section>")
    return section(gallery, f'data-user="{user}" data-index="{index}"', "</figure>")


def test_overlay_geometry(page):
    # personalized user 2 sample 4: GT [500, 380], prediction 450 units right at [950, 380]. On the
    # 180x400 screenshot that is (90, 152) and (171, 152); 140 units are 25.2 px across, 56 px down.
    card = card_html(page, "personalized", 2, 4)
    assert "[500, 380]" in card and "[950, 380]" in card
    assert (f'<ellipse class="region" cx="90.0" cy="152.0" rx="25.2" ry="56.0" fill="none" '
            f'stroke="{report.MISS_COLOUR}"') in card
    assert '<circle class="pred" cx="171.0" cy="152.0"' in card and '<circle class="gt" cx="90.0" cy="152.0"' in card
    assert "miss · L2 450.0" in card
    hit = card_html(page, "personalized", 1, 0)
    assert f'stroke="{report.HIT_COLOUR}"' in hit and "hit · L2 0.0" in hit
    unparsed = card_html(page, "vanilla", 1, 0)
    assert 'class="pred"' not in unparsed and 'class="gt"' in unparsed and "unparsed answer" in unparsed


def test_untrusted_text_is_escaped(page):
    assert SCRIPT not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img" not in page and "&lt;img src=&quot;x&quot; onerror=&quot;alert(2)&quot;&gt;" in page


def test_missing_image_gives_a_placeholder(page):
    card = card_html(page, "global", 3, 0)
    assert 'class="placeholder"' in card and "image not found: /nonexistent/screen.png" in card
    card = card_html(page, "global", 1, 2)
    assert 'class="placeholder"' in card and "no image path recorded" in card
    assert page.count('class="placeholder"') == 2


def test_output_is_deterministic(runs, tmp_path):
    a = report.write_report(runs, tmp_path / "a.html").read_bytes()
    b = report.write_report(runs, tmp_path / "b.html").read_bytes()
    assert a == b


def test_labels_and_bad_input(runs, tmp_path):
    page = report.write_report(runs[:2], tmp_path / "r.html", labels=["zero-shot", "<b>ft</b>"]).read_text()
    assert "zero-shot" in page and "&lt;b&gt;ft&lt;/b&gt;" in page and "<b>ft</b>" not in page
    with pytest.raises(ValueError, match="labels must differ"):
        report.write_report(runs[:2], tmp_path / "r.html", labels=["a", "a"])
    with pytest.raises(ValueError, match="2 labels for 3"):
        report.write_report(runs, tmp_path / "r.html", labels=["a", "b"])
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        report.write_report([tmp_path], tmp_path / "r.html")


def test_unparseable_prediction_line_names_file_and_line(runs, tmp_path):
    run = tmp_path / "broken"
    shutil.copytree(runs[0], run)
    path = run / "predictions" / "user_2.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"user_2\.jsonl:6: not a JSON object"):
        report.write_report([run])


def test_baselines_sit_beside_the_models_in_the_summary(prior_page, data):
    tables, classes = tables_of(prior_page, classes=True)
    rows = {r[0][0]: [text for text, _ in r[1:]] for r in tables["summary"]}
    glob = prior_metrics(data, PLANS["vanilla"], lambda user: GLOBAL_PRIOR)
    firsts = user_prior_points(data)
    own = prior_metrics(data, PLANS["vanilla"], lambda user: firsts[user])
    # three models, then each baseline once although all three runs list them
    expected = [f"{100 * m[s]['click_acc_140']:.1f}%" for m in (glob, own) for s in ("micro", "macro")]
    assert rows["Click Acc@140"] == ["41.2%", "41.1%", "76.5%", "76.7%", "88.2%", "87.8%", *expected]
    assert rows["Median L2 (0-1000 units)"][6:] == [f"{m[s]['median_l2']:.1f}" for m in (glob, own)
                                                    for s in ("micro", "macro")]
    assert rows["Parse-failure rate"][6:] == ["0.0%"] * 4 and rows["Referring exact match"][6:] == ["0.0%"] * 4
    assert rows["n"][6:] == ["17 samples", "3 users"] * 2
    click = next(i for i, r in enumerate(tables["summary"]) if r[0][0] == "Click Acc@140")
    assert classes["summary"][click][7:] == ["baseline"] * 4  # greyed, never "best"
    head = section(prior_page, '<table id="summary"', "</thead>")
    assert head.count('class="tag">baseline</span>') == 2
    assert "global prior" in head and "user prior" in head


def test_baselines_table_says_what_each_answers(prior_page, data):
    rows = tables_of(prior_page)["baselines"]
    assert [r[0][0] for r in rows] == ["global priorbaseline", "user priorbaseline"]
    assert rows[0][1][0] == "always [500, 500], the densest of 40 training targets (users 5-16)"
    assert rows[0][2][0].startswith("5-16 (runs/global/provenance.json) in demo/data; training Click Acc@140 25.0%")
    firsts = user_prior_points(data)
    assert rows[1][1][0] == "per user and fold, the densest of the targets in that user's training folds"
    assert f"user 1: [{firsts[1][0]}, {firsts[1][1]}] [{firsts[1][0]}, {firsts[1][1]}]" in rows[1][2][0]
    assert "fitted on training data only" in prior_page and "densest training point" in prior_page


def test_baselines_are_dashed_in_the_charts_and_have_no_gallery(prior_page, data):
    cdf = section(prior_page, '<svg id="cdf-chart"', "</svg>")
    lines = re.findall(r'<polyline class="cdf" data-run="([\w ]+)"[^>]*?( stroke-dasharray="[^"]+")? points=', cdf)
    # baselines drawn first, so the models lie over them
    assert lines == [("global prior", ' stroke-dasharray="7 4"'), ("user prior", ' stroke-dasharray="7 4"'),
                     ("vanilla", ""), ("global", ""), ("personalized", "")]
    bars = section(prior_page, '<svg id="bar-chart"', "</svg>")
    marks = re.findall(r'<line class="prior" data-user="(\d)" data-run="([\w ]+)"[^>]* y1="([\d.]+)"', bars)
    assert [(u, r) for u, r, _ in marks] == [(u, r) for u in "123" for r in ("global prior", "user prior")]
    glob = prior_metrics(data, PLANS["vanilla"], lambda user: GLOBAL_PRIOR)
    base, plot_h = 340 - 52, 340 - 20 - 52  # the chart's bottom edge and height
    for user, run, y in marks:
        if run == "global prior":
            assert float(y) == pytest.approx(base - plot_h * glob["users"][user]["click_acc_140"], abs=0.06)
    assert re.findall(r'<section class="gallery" data-run="([\w ]+)"', prior_page) == ["vanilla", "global",
                                                                                     "personalized"]
    assert "<title>pigg evaluation report: vanilla vs global vs personalized</title>" in prior_page


def test_a_baseline_is_never_highlighted_even_when_best(runs, data, tmp_path):
    from pigg.grounding.priors import Prior

    truth = {(u, i): tuple(s["gt_point"]) for u, samples in data.items() for i, s in enumerate(samples)}
    oracle = Prior("oracle", "oracle", {"rule": "the truth", "fitted_on": "nothing"}, lambda u, i: truth[(u, i)])
    run = attach_priors(shutil.copytree(runs[2], tmp_path / "personalized"), data, extra=[oracle])
    tables, classes = tables_of(report.write_report([runs[1], run], tmp_path / "r.html").read_text(), classes=True)
    user_1 = tables["per-user"][0]
    # global 83.3%, personalized 100.0% (best), then the baselines: global prior, user prior, oracle 100.0%
    assert user_1[1] == ("83.3%", False) and user_1[2] == ("100.0%", True) and user_1[5] == ("100.0%", False)
    assert classes["per-user"][0][3:6] == ["baseline"] * 3


def test_each_distinct_baseline_is_shown_once_and_unavailable_ones_are_named(runs, data, tmp_path):
    from pigg.grounding.priors import RULE, Prior, attach

    vanilla = attach_priors(shutil.copytree(runs[0], tmp_path / "vanilla"), data, global_point=(100, 900))
    tuned = attach_priors(shutil.copytree(runs[1], tmp_path / "global"), data)
    page = report.write_report([vanilla, tuned], tmp_path / "r.html").read_text()
    labels = [r[0][0] for r in tables_of(page)["baselines"]]
    # the user priors answer the same samples alike: one; the global priors differ: one each, named by run
    assert labels == ["global prior · vanillabaseline", "user priorbaseline", "global prior · globalbaseline"]
    # a baseline folder given by hand is a baseline too, and the same as the one its run lists
    page = report.write_report([tuned, tuned / "baselines" / "global_prior"], tmp_path / "r.html").read_text()
    assert [r[0][0] for r in tables_of(page)["baselines"]] == ["global priorbaseline", "user priorbaseline"]
    gone = Prior("global_prior", "global prior", {"rule": RULE, "unavailable": "no training data: look elsewhere"})
    attach(vanilla, [gone])
    page = report.write_report([vanilla], tmp_path / "r.html").read_text()
    assert tables_of(page)["baselines"] == [[("global priorbaseline", False),
                                             ("not available: no training data: look elsewhere", False)]]


def test_runs_without_baselines_say_so(page):
    assert "No prior baselines: these runs' metrics.json list none" in page and 'id="baselines"' not in page


def colour_pixels(png: Path) -> dict:
    counts = {colour: n for n, colour in Image.open(png).convert("RGB").getcolors(1 << 24)}
    rgb = {name: tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))
           for name, c in (("gt", report.GT_COLOUR), ("pred", report.PRED_COLOUR), ("hit", report.HIT_COLOUR),
                           ("second_baseline", report.BASELINE_COLOURS[1]), ("baseline_cell", "#eeeeea"))}
    return {name: counts.get(value, 0) for name, value in rgb.items()} | {"distinct": len(counts)}


def run_chromium(command: list, timeout: int = 20, attempts: int = 2) -> tuple:
    """Run headless Chromium; a run that times out is tried once more. It takes ~2 s, but once in a
    fresh-clone CI run (2026-12-02) it hung at start-up for the whole 20 s. A page that blocks (a
    script left unescaped can open an alert) times out every time, so it still fails."""
    for _ in range(attempts):
        # Its own process group, so that on a timeout the renderer and helper processes go down with
        # the browser.
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=timeout)
            return process.returncode, stderr
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            _, stderr = process.communicate()
    return f"timed out {attempts} times after {timeout}s", stderr


def test_page_renders_in_chromium(prior_runs, tmp_path):
    assert CHROMIUM.exists(), "headless Chromium is needed for this test: apt-get install -y chromium"
    # Personalized first: its gallery opens with two misses and then hits, so all three overlay
    # colours are in the window. The baselines add a table, columns and dashed lines above it.
    html = report.write_report([prior_runs[2], prior_runs[0]], tmp_path / "browser.html")
    png = tmp_path / "page.png"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,3200", "--hide-scrollbars",
               f"--screenshot={png}", html.as_uri()]
    rc, stderr = run_chromium(command)
    assert png.is_file(), f"chromium wrote no screenshot (rc {rc}): {stderr[-2000:]}"
    assert Image.open(png).size == (1280, 3200)
    seen = colour_pixels(png)
    assert seen["distinct"] > 500, seen
    # ~20 dots and rings in view; the key above the gallery has none of these colours
    assert seen["gt"] > 300 and seen["pred"] > 300 and seen["hit"] > 100, seen
    # the user prior's dashed lines (legend, bars, CDF) and the greyed baseline columns are drawn
    assert seen["second_baseline"] > 300 and seen["baseline_cell"] > 20_000, seen
