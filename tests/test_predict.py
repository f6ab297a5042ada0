"""`pigg predict` on the tiny model: requests checked, the JSON fields, pixels, and the drawing."""
import json

import pytest
from PIL import Image

from pigg.cli import main
from pigg.data.samples import DataError
from pigg.grounding.metrics import to_pixels
from pigg.predict import POINT_COLOUR, RING_COLOUR, read_requests

BACKGROUND = (200, 210, 220)


@pytest.fixture()
def screens(tmp_path):
    """A tall and a wide screenshot, and a JSONL file asking about both (one path relative)."""
    Image.new("RGB", (300, 600), BACKGROUND).save(tmp_path / "tall.png")
    Image.new("RGB", (640, 360), BACKGROUND).save(tmp_path / "wide.png")
    lines = [{"image": "tall.png", "command": "Open the menu"},
             {"image": str(tmp_path / "wide.png"), "command": "Close the window"}]
    (tmp_path / "asks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return tmp_path


def model_flags(tiny_dir):
    return ["--model", str(tiny_dir), "--max-pixels", str(200 * 400), "--max-new-tokens", "8"]


def test_requests_are_checked_all_at_once(screens):
    with pytest.raises(ValueError, match="not both"):
        read_requests(str(screens / "tall.png"), "x", str(screens / "asks.jsonl"))
    with pytest.raises(ValueError, match="give both"):
        read_requests(str(screens / "tall.png"), None, None)
    (screens / "bad.jsonl").write_text('{"image": "tall.png", "command": "ok"}\nnot json\n\n'
                                       '{"image": "gone.png", "command": "x"}\n{"image": "tall.png"}\n[1]\n')
    with pytest.raises(DataError) as e:
        read_requests(None, None, str(screens / "bad.jsonl"))
    problems = [str(p) for p in e.value.problems]
    assert problems[0].startswith("bad.jsonl line 2: not JSON")
    assert problems[1:3] == ["bad.jsonl line 5, field command: expected a non-empty string",
                             'bad.jsonl line 6: expected an object {"image": PATH, "command": TEXT}']
    assert problems[3] == f"bad.jsonl line 4, field image: file not found: {screens / 'gone.png'}"
    assert len(problems) == 4


def test_predict_on_the_tiny_model(tiny_dir, screens, capsys):
    """Random weights answer anything: the plumbing, the fields and the file are what is tested."""
    out = screens / "drawn.png"
    assert main(["predict", "--image", str(screens / "tall.png"), "--command", "Open the menu", "--json",
                 "--draw", str(out), *model_flags(tiny_dir)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) == {"image", "command", "referring", "point", "pixel", "image_size", "raw", "drawn"}
    assert record["command"] == "Open the menu" and record["image_size"] == [300, 600]
    assert record["drawn"] == str(out) and Image.open(out).size == (300, 600)
    if record["point"] is None:
        assert record["pixel"] is None
    else:
        assert record["pixel"] == list(to_pixels(record["point"], (300, 600)))


ANSWERS = ["```referring\nmenu button\n```\n```grounding\n[250, 750]\n```", '{"point_2d": [500, 100], "label": "x"}']


@pytest.fixture()
def canned(monkeypatch):
    """generate_batch answering fixed points, and the prompts it was given."""
    prompts = []

    def answer(model, processor, batch, max_new_tokens, min_new_tokens=0, generator=None):
        texts = processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        prompts.extend(texts)
        return ANSWERS[len(prompts) - len(texts):len(prompts)]

    monkeypatch.setattr("pigg.predict.generate_batch", answer)
    return prompts


def test_points_pixels_and_drawing(tiny_dir, screens, canned, capsys):
    folder = screens / "drawn"
    assert main(["predict", "--input", str(screens / "asks.jsonl"), "--json", "--draw", str(folder),
                 "--batch-size", "1", *model_flags(tiny_dir)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["point"] for r in records] == [[250.0, 750.0], [500.0, 100.0]]
    # (250, 750) on 300x600 -> (75, 450) px; (500, 100) on 640x360 -> (320, 36) px
    assert [r["pixel"] for r in records] == [[75.0, 450.0], [320.0, 36.0]]
    assert [r["referring"] for r in records] == ["menu button", "x"]
    assert records[0]["image"] == str(screens / "tall.png")
    assert "following instruction: Open the menu" in canned[0] and "Close the window" in canned[1]
    assert records[0]["drawn"] == str(folder / "0000_tall.png")

    im = Image.open(folder / "0000_tall.png").convert("RGB")
    assert im.getpixel((75, 450)) == POINT_COLOUR
    # 140 units: 42 px across (300 wide), 84 px down (600 tall): an ellipse, drawn inside its bounds
    assert im.getpixel((75 + 42 - 1, 450)) == RING_COLOUR and im.getpixel((75 - 42 + 1, 450)) == RING_COLOUR
    assert im.getpixel((75, 450 + 84 - 1)) == RING_COLOUR and im.getpixel((75, 450 - 84 + 1)) == RING_COLOUR
    assert im.getpixel((75, 450 + 42)) == BACKGROUND  # a circle of 42 px would pass here
    assert im.getpixel((75 + 50, 450)) == BACKGROUND
    wide = Image.open(folder / "0001_wide.png").convert("RGB")
    assert wide.getpixel((320, 36)) == POINT_COLOUR and wide.getpixel((320 + 90 - 1, 36)) == RING_COLOUR


def test_text_output_and_qwen_prompt(tiny_dir, screens, canned, capsys):
    assert main(["predict", "--image", str(screens / "tall.png"), "--command", "Open the menu", "--prompt", "qwen",
                 *model_flags(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "  referring: menu button\n  point: (250, 750) in 0-1000 = (75.0, 450.0) px of 300x600" in out
    assert '"point_2d": [x, y]' in canned[0] and "Instruction: Open the menu" in canned[0]
