"""Public benchmarks: the published files read as they are, the boxes checked, in-box scoring against
hand-computed values, and `pigg eval --benchmark` / `pigg report` end to end on the tiny model."""
import json
import shutil

import pytest
from PIL import Image

from pigg.data.samples import DataError
from pigg.evaluate import prediction_record, prompt_and_truth
from pigg.grounding import metrics as M
from pigg.grounding.benchmarks import QWEN_PROMPT, load_benchmark
from pigg.grounding.parser import parse_answer

# Image sizes per split: tall, wide and square, so x and y scale differently.
SIZES = {"mobile": (300, 600), "desktop": (640, 360), "web": (500, 500)}
# [left, top, width, height] in pixels; boxes at the corners and touching the right and bottom edges.
SCREENSPOT = {
    "mobile": [("m0.png", "Open the menu", [30, 60, 60, 120], "icon", "android"),
               ("m0.png", "Tap the bottom-right corner", [270, 540, 30, 60], "text", "ios")],
    "desktop": [("d0.png", "Close the window", [0, 0, 64, 36], "icon", "windows")],
    "web": [("w0.png", "Search", [100, 200, 50, 25], "text", "shop"),
            ("w1.png", "Log in", [450, 0, 50, 50], "text", "forum")],
}
PRO_SIZES = {"vscode_macos/a.png": (1000, 400), "autocad_windows/b.png": (800, 800)}
PRO = {
    "vscode_macos": [("vscode_macos/a.png", "Run the file", [900, 0, 1000, 40], "icon", "Dev", "macos", "vscode"),
                     ("vscode_macos/a.png", "Open settings", [10, 300, 110, 400], "text", "Dev", "macos", "vscode")],
    "autocad_windows": [("autocad_windows/b.png", "Draw a line", [0, 0, 80, 80], "icon", "CAD", "windows",
                         "autocad")],
}


def write_screenspot(root, suffix="_v2", images="screenspotv2_image", entries=SCREENSPOT):
    (root / images).mkdir(parents=True, exist_ok=True)
    for split, rows in entries.items():
        for file, *_ in rows:
            Image.new("RGB", SIZES[split], (200, 210, 220)).save(root / images / file)
        data = [{"img_filename": f, "bbox": box, "instruction": text, "data_type": kind, "data_source": source}
                for f, text, box, kind, source in rows]
        (root / f"screenspot_{split}{suffix}.json").write_text(json.dumps(data))
    return root


def write_pro(root, entries=PRO):
    for file, size in PRO_SIZES.items():
        (root / "images" / file).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (30, 30, 30)).save(root / "images" / file)
    (root / "annotations").mkdir(exist_ok=True)
    for name, rows in entries.items():
        data = [{"img_filename": f, "bbox": box, "img_size": list(PRO_SIZES[f]), "instruction": text,
                 "application": app, "platform": platform, "group": group, "ui_type": kind, "id": f"{name}_{i}"}
                for i, (f, text, box, kind, group, platform, app) in enumerate(rows)]
        (root / "annotations" / f"{name}.json").write_text(json.dumps(data))
    return root


def answer(x, y) -> str:
    return f"```referring\nthe thing\n```\n```grounding\n[{x}, {y}]\n```"


def test_conversions_between_0_1000_and_pixels():
    assert M.to_pixels((500, 250), (1920, 1080)) == (960.0, 270.0)
    assert M.to_pixels((1000, 1000), (300, 600)) == (300.0, 600.0)
    assert M.to_relative((960, 270), (1920, 1080)) == (500.0, 250.0)
    box = (30, 60, 90, 180)
    assert M.in_box((30.0, 60.0), box) and M.in_box((90.0, 180.0), box)  # edges count
    assert not M.in_box((29.97, 60.0), box) and not M.in_box((90.0, 180.3), box)
    assert not M.in_box(None, box)


def test_screenspot_v2_files_become_samples(tmp_path):
    bench = load_benchmark("screenspot-v2", str(write_screenspot(tmp_path)), workers=1)
    assert [(s.user, s.index, s.source) for s in bench.samples] == [
        ("mobile", 0, "screenspot_mobile_v2.json"), ("mobile", 1, "screenspot_mobile_v2.json"),
        ("desktop", 0, "screenspot_desktop_v2.json"), ("web", 0, "screenspot_web_v2.json"),
        ("web", 1, "screenspot_web_v2.json")]
    # [30, 60, 60, 120] on 300x600: pixels (30, 60)-(90, 180), centre (60, 120) = (200, 200) in 0-1000
    first = bench.targets[("mobile", 0)]
    assert first.box == (30, 60, 90, 180) and first.size == (300, 600) and first.centre == (200.0, 200.0)
    assert first.tags == {"platform": "mobile", "ui_type": "icon", "data_source": "android"}
    prompt, truth = prompt_and_truth(bench.samples[0])
    assert parse_answer(truth).point == (200.0, 200.0) and parse_answer(truth).referring is None
    image, text = prompt.messages[0]["content"]
    assert image["image"] == str(tmp_path.resolve() / "screenspotv2_image" / "m0.png")
    assert "following instruction: Open the menu\n\nThink step-by-step" in text["text"]
    # [100, 200, 50, 25] on 500x500: centre (125, 212.5) px = (250, 425); [0, 0, 64, 36] on 640x360 -> (50, 50)
    assert bench.targets[("web", 0)].centre == (250.0, 425.0)
    assert bench.targets[("desktop", 0)].centre == (50.0, 50.0)
    assert bench.sizes[image["image"]] == (300, 600)


def test_screenspot_v1_layout_and_qwen_prompt(tmp_path):
    write_screenspot(tmp_path, suffix="", images="screenspot_imgs")
    bench = load_benchmark("screenspot", str(tmp_path), prompt="qwen", workers=1)
    assert len(bench.samples) == 5 and bench.samples[0].source == "screenspot_mobile.json"
    assert bench.samples[0].messages[0]["content"][1]["text"] == QWEN_PROMPT.format(command="Open the menu")
    with pytest.raises(DataError, match="no screenspot_mobile_v2.json"):
        load_benchmark("screenspot-v2", str(tmp_path), workers=1)


def test_screenspot_pro_files_become_samples(tmp_path):
    bench = load_benchmark("screenspot-pro", str(write_pro(tmp_path)), workers=1)
    assert sorted(bench.targets) == [("autocad_windows", 0), ("vscode_macos", 0), ("vscode_macos", 1)]
    run = bench.targets[("vscode_macos", 0)]  # x1, y1, x2, y2 = 900, 0, 1000, 40 on 1000x400, at the right edge
    assert run.box == (900, 0, 1000, 40) and run.size == (1000, 400) and run.centre == (950.0, 50.0)
    assert run.tags == {"group": "Dev", "ui_type": "icon", "platform": "macos", "application": "vscode"}
    assert bench.samples[0].source == "annotations/autocad_windows.json"
    assert bench.samples[0].messages[0]["content"][0]["image"].endswith("images/autocad_windows/b.png")


def test_every_malformed_target_is_named_at_once(tmp_path):
    rows = {split: list(rows) for split, rows in SCREENSPOT.items()}
    rows["mobile"][1] = ("m0.png", "x", [10, 10, -5, 20], "text", "ios")  # negative width
    rows["desktop"] = [("d0.png", "x", [640, 0, 41, 36], "icon", "windows"),  # left edge 640: none of it on the image
                       ("d0.png", "x", [1, 2, 3], "icon", "windows"),  # wrong length
                       ("d0.png", "x", [600, 0, 60, 36], "icon", "windows")]  # overhangs the right edge: kept
    rows["web"] = [("w0.png", "x", [0, 0, 5, "5"], "text", "shop")]  # not numbers
    write_screenspot(tmp_path, entries=rows)
    (tmp_path / "screenspotv2_image" / "m0.png").unlink()
    with pytest.raises(DataError) as e:
        load_benchmark("screenspot-v2", str(tmp_path), workers=1)
    problems = [str(p) for p in e.value.problems]
    assert len(problems) == 5, problems
    assert problems[0].startswith("screenspot_mobile_v2.json sample 1, field bbox: negative size")
    assert any(p.startswith("screenspot_desktop_v2.json sample 0, field bbox: box [640, 0, 681, 36]") and
               "outside the 640x360 image" in p for p in problems)
    assert not any("desktop_v2.json sample 2" in p for p in problems)
    assert "screenspot_desktop_v2.json sample 1, field bbox: expected a list of 4 numbers, got [1, 2, 3]" in problems
    assert any(p.startswith("screenspot_web_v2.json sample 0, field bbox: expected a list of 4 numbers")
               for p in problems)
    assert any(p.startswith("screenspot_mobile_v2.json sample 0, field img_filename: file not found")
               for p in problems)


def test_pro_size_and_box_problems(tmp_path):
    rows = {"vscode_macos": [PRO["vscode_macos"][0], ("vscode_macos/a.png", "x", [50, 10, 40, 20], "icon", "Dev",
                                                       "macos", "vscode")],
            "autocad_windows": PRO["autocad_windows"]}
    write_pro(tmp_path, rows)
    data = json.loads((tmp_path / "annotations" / "autocad_windows.json").read_text())
    data[0]["img_size"] = [800, 801]
    del data[0]["group"]
    (tmp_path / "annotations" / "autocad_windows.json").write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        load_benchmark("screenspot-pro", str(tmp_path), workers=1)
    problems = [str(p) for p in e.value.problems]
    assert problems == [
        "annotations/autocad_windows.json sample 0, field group: expected a non-empty string, got None",
        "annotations/vscode_macos.json sample 1, field bbox: negative size in [50, 10, 40, 20] (x1, y1, x2, y2)"]
    del data[0]["img_size"]
    data[0]["group"] = "CAD"
    data.append(dict(data[0], img_size=[800, 801]))
    (tmp_path / "annotations" / "autocad_windows.json").write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        load_benchmark("screenspot-pro", str(tmp_path), workers=1)
    problems = [str(p) for p in e.value.problems]
    assert "annotations/autocad_windows.json sample 0, field img_size: expected a list of 2 numbers, got None" \
        in problems
    assert "annotations/autocad_windows.json sample 1, field img_size: [800, 801] but the image is 800x800" in problems


def test_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="eval.benchmark must be one of") as e:
        load_benchmark("screenspot-v3", None, prompt="mine")
    assert "eval.benchmark_root is needed" in str(e.value) and "eval.prompt must be one of" in str(e.value)
    shutil.rmtree(write_screenspot(tmp_path) / "screenspotv2_image")
    with pytest.raises(DataError, match="no image folder screenspotv2_image/"):
        load_benchmark("screenspot-v2", str(tmp_path), workers=1)


def scored(bench, answers: dict) -> dict:
    """The benchmark's metrics for fabricated answers {(user, index): text}."""
    done = {}
    for sample in bench.samples:
        prompt, truth = prompt_and_truth(sample)
        record = bench.annotate(prediction_record(prompt, truth, answers[(sample.user, sample.index)]))
        done.setdefault(sample.user, []).append(record)
    return bench.summarize(done)


def test_in_box_scores_by_hand(tmp_path):
    bench = load_benchmark("screenspot-v2", str(write_screenspot(tmp_path)), workers=1)
    answers = {
        ("mobile", 0): answer(100, 100),  # (30, 60) px: the box's top-left corner -> in; 141.4 from (200, 200)
        ("mobile", 1): answer(1000, 1000),  # (300, 600) px: corner of the box at the image's corner -> in
        ("desktop", 0): answer(101, 50),  # (64.64, 18) px: just right of x2 = 64 -> out; 51 from (50, 50)
        ("web", 0): "no idea",  # unparsed -> out, a parse failure
        ("web", 1): answer(899, 50),  # (449.5, 25) px: left of x1 = 450 -> out; 51 from (950, 50): a hit
    }
    metrics = scored(bench, answers)
    pred = {(u, r["index"]): r for u in ("mobile", "desktop", "web")
            for r in [bench.annotate(prediction_record(*prompt_and_truth(s), answers[(s.user, s.index)]))
                      for s in bench.samples if s.user == u]}
    assert pred[("mobile", 0)]["pred_pixel"] == [30.0, 60.0] and pred[("mobile", 0)]["in_box"]
    assert pred[("mobile", 0)]["gt_box"] == [30, 60, 90, 180] and pred[("mobile", 0)]["image_size"] == [300, 600]
    assert not pred[("mobile", 0)]["hit"]  # 141.4 units from the centre: outside Acc@140, inside the box
    assert pred[("mobile", 0)]["command"] == "Open the menu" and pred[("mobile", 0)]["ui_type"] == "icon"
    assert pred[("desktop", 0)]["pred_pixel"] == [64.64, 18.0] and not pred[("desktop", 0)]["in_box"]
    assert pred[("web", 1)]["hit"] and not pred[("web", 1)]["in_box"]
    b = metrics["breakdown"]
    assert b["micro"] == {"n": 5, "in_box": 2 / 5, "click_acc_140": 3 / 5, "parse_failure_rate": 1 / 5}
    cells = b["by"]["platform x ui_type"]
    assert {k: v["in_box"] for k, v in cells.items()} == {
        "desktop/icon": 0.0, "mobile/icon": 1.0, "mobile/text": 1.0, "web/text": 0.0}
    assert b["macro"]["in_box"] == 0.5 and b["macro"]["cells"] == 4 and b["macro"]["over"] == "platform x ui_type"
    # Acc@140 per cell: desktop/icon 1, mobile/icon 0, mobile/text 1, web/text 1/2
    assert b["macro"]["click_acc_140"] == (1 + 0 + 1 + 0.5) / 4
    assert b["by"]["platform"]["web"] == {"n": 2, "in_box": 0.0, "click_acc_140": 0.5, "parse_failure_rate": 0.5}
    assert b["by"]["ui_type"]["text"]["in_box"] == 1 / 3 and b["by"]["data_source"]["ios"]["in_box"] == 1.0
    assert metrics["micro"]["in_box"] == 2 / 5 and metrics["micro"]["click_acc_140"] == 3 / 5
    assert metrics["users"]["mobile"]["in_box"] == 1.0 and metrics["macro"]["in_box"] == (1 + 0 + 0) / 3
    assert metrics["micro"]["referring_f1"] is None  # the benchmarks name no elements


def test_pro_scores_by_hand(tmp_path):
    bench = load_benchmark("screenspot-pro", str(write_pro(tmp_path)), workers=1)
    metrics = scored(bench, {
        ("vscode_macos", 0): answer(900, 100),  # (900, 40) px on 1000x400: corner of (900, 0, 1000, 40) -> in
        ("vscode_macos", 1): answer(950, 100),  # far from (10, 300, 110, 400) -> out
        ("autocad_windows", 0): '{"point_2d": [100, 100], "label": "line"}',  # (80, 80) px: corner -> in
    })
    b = metrics["breakdown"]
    assert b["micro"]["in_box"] == 2 / 3
    assert {k: v["in_box"] for k, v in b["by"]["group x ui_type"].items()} == {
        "CAD/icon": 1.0, "Dev/icon": 1.0, "Dev/text": 0.0}
    assert b["macro"]["in_box"] == 2 / 3 and b["by"]["application"]["vscode"]["in_box"] == 0.5
    assert b["by"]["platform"]["windows"]["n"] == 1


def test_predictions_of_another_run_are_refused(tmp_path):
    bench = load_benchmark("screenspot-v2", str(write_screenspot(tmp_path)), workers=1)
    with pytest.raises(ValueError, match="not a screenspot-v2 target"):
        bench.summarize({"1": [{"user": 1, "index": 0, "pred_point": None}]})


@pytest.mark.parametrize("name", ["screenspot-v2", "screenspot-pro"])
def test_eval_and_report_on_a_benchmark(name, tiny_dir, tmp_path, monkeypatch):
    from pigg.cli import main

    monkeypatch.chdir(tmp_path)
    root = write_screenspot(tmp_path / "bench") if name == "screenspot-v2" else write_pro(tmp_path / "bench")
    argv = ["eval", "--benchmark", name, "--benchmark-root", str(root), "--model", str(tiny_dir),
            "--out", str(tmp_path / "ev"), "--batch-size", "2", "--max-new-tokens", "8", "--workers", "0",
            "--max-pixels", str(200 * 400), "--data.validation_workers", "1"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    files = {"screenspot-v2": ["desktop", "mobile", "web"], "screenspot-pro": ["autocad_windows", "vscode_macos"]}
    assert metrics["benchmark"] == name and sorted(metrics["users"]) == files[name]
    assert metrics["prompt"] == "pigg" and metrics["benchmark_root"] == str(root.resolve())
    b = metrics["breakdown"]
    assert b["micro"]["n"] == (5 if name == "screenspot-v2" else 3)
    primary = "platform" if name == "screenspot-v2" else "group"
    assert b["macro"]["over"] == f"{primary} x ui_type" and set(b["by"]) >= {primary, "ui_type", "platform"}
    records = [json.loads(line) for f in sorted((tmp_path / "ev" / "predictions").glob("user_*.jsonl"))
               for line in f.read_text().splitlines()]
    assert len(records) == b["micro"]["n"]
    assert b["micro"]["in_box"] == sum(r["in_box"] for r in records) / len(records)
    for r in records:
        assert r["in_box"] == M.in_box(r["pred_pixel"], r["gt_box"])

    # Resumed: nothing left to generate, the same metrics.
    monkeypatch.setattr("pigg.evaluate.generate_batch", lambda *a, **k: pytest.fail("nothing should be generated"))
    assert main(argv) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == metrics

    assert main(["report", str(tmp_path / "ev"), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert 'id="benchmark"' in page and "In the target box" in page and f"by {primary} x ui_type" in page
    assert all(f"<th>{cell} " in page for cell in b["by"][f"{primary} x ui_type"])
    assert page.count('class="box"') == len(records)  # each card draws its target box
