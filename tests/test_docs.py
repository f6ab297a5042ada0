"""The documentation against the code it describes.

Every `pigg ...` command line in README.md and docs/*.md parses with the current CLI (and the seed
scripts' lines translate onto one that does), every file and link they name exists, every example
config loads and validates, every `--help` exits 0, and README.md opens with the two set-up commands.
"""
import argparse
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

from pigg import config as C
from pigg.cli import build_parser, config_from_args, main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SETUP = ["python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && .venv/bin/pigg demo",
         "bash dev/test.sh"]

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SHELL_LANGUAGES = ("", "bash", "sh", "shell", "console")
MENTIONS_COMMAND = re.compile(r"(^|[\s/])pigg\s|\b[1-4]_\w+\.py\b")
SEED_SCRIPT = re.compile(r"^[1-4]_\w+\.py$")
REPO_PATH = re.compile(r"^(?:docs|bench|configs|src|tests|dev)/[\w./-]*$|^[1-4]_\w+\.py$|^README\.md$|^pyproject\.toml$")
MODULE = re.compile(r"^pigg(?:\.\w+)+$")
OPERATORS = {"&&", "||", ";", "|", "&"}


def without_fences(text: str) -> str:
    return FENCE.sub("", text)


def shell_blocks(text: str) -> list[str]:
    return [body for language, body in FENCE.findall(text) if language in SHELL_LANGUAGES]


def command_lines(text: str) -> list[str]:
    """Shell lines in code blocks (continuations joined) and inline spans that run pigg or a seed script."""
    lines = [line for body in shell_blocks(text) for line in body.replace("\\\n", " ").splitlines()
             if MENTIONS_COMMAND.search(line)]
    spans = [span for _, span in INLINE.findall(without_fences(text))]
    return lines + [s for s in spans if s.startswith("pigg ") or (s.startswith("python ") and MENTIONS_COMMAND.search(s))]


def invocations(line: str) -> list[list[str]]:
    """The pigg argv of each pigg or seed-script invocation in a shell line (env assignments, `srun` and
    `&&` chains understood)."""
    tokens = shlex.split(line, comments=True)
    segments, current = [], []
    for token in tokens:
        if token in OPERATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    found = []
    for seg in segments:
        while seg and (re.match(r"^\w+=", seg[0]) or seg[0] == "srun"):
            seg = seg[1:]
        if seg and (seg[0] == "pigg" or seg[0].endswith("/pigg")):
            found.append(seg[1:])
        elif len(seg) > 1 and seg[0] in ("python", "python3") and SEED_SCRIPT.match(seg[1]):
            found.append(seed_translation(seg[1], seg[2:]))
    return found


def seed_translation(script: str, argv: list[str]) -> list[str]:
    from pigg import seed_cli

    if script.startswith("1_"):
        return seed_cli.translate_eval(argv, with_checkpoint=False)[1]
    if script.startswith("2_"):
        return seed_cli.translate_finetune_global(argv)[1]
    if script.startswith("3_"):
        return seed_cli.translate_eval(argv, with_checkpoint=True)[1]
    return seed_cli.translate_personalize(argv)[1]


def check_command(line: str) -> str | None:
    """None if every invocation in `line` parses (and its configuration validates); else why not."""
    try:
        argvs = invocations(line)
    except (ValueError, SystemExit) as e:
        return f"cannot read: {e}"
    if not argvs:
        return "no pigg invocation found"
    for argv in argvs:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                args = build_parser().parse_args(argv)
        except SystemExit as e:
            if e.code == 0:  # --help
                continue
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
        config = getattr(args, "config", None)
        if config and not Path(config).is_absolute():
            if not (ROOT / config).is_file():
                return f"--config {config} does not exist"
            args.config = str(ROOT / config)
        try:
            C.validate(config_from_args(args))
        except C.ConfigError as e:
            return str(e)
    return None


def runs_pigg(line: str) -> bool:
    """A line that cannot be read counts, so that the check reports it; one that names pigg only as a word
    (`--served-model-name pigg`) does not."""
    try:
        return bool(invocations(line))
    except (ValueError, SystemExit):
        return True


def all_commands() -> list[tuple[str, str]]:
    return [(doc.relative_to(ROOT).as_posix(), line) for doc in DOCS for line in command_lines(doc.read_text())
            if runs_pigg(line)]


def test_the_docs_exist_and_show_commands():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    for page in ("data", "training", "evaluation", "personalization", "export", "several_gpus", "performance", "log"):
        assert f"docs/{page}.md" in names
    assert len(all_commands()) >= 40  # the extraction finds the examples, not nothing


def test_every_documented_command_parses_with_the_current_cli():
    failures = [f"{doc}: {line}\n    {why}" for doc, line in all_commands() if (why := check_command(line))]
    assert not failures, "documented commands the CLI rejects:\n" + "\n".join(failures)


@pytest.mark.parametrize("line, fragment", [
    ("pigg train --no-such-flag 1", "unrecognized arguments"),
    ("pigg trian --lora", "invalid choice"),
    ("pigg train --lora --lr fast", "invalid"),
    ("pigg personalize --folds 1", "folds >= 2"),
    ("pigg train --config configs/no_such.yaml", "does not exist"),
    ("python 2_finetune_global.py 0 --lora --no-such-flag", "unrecognized arguments"),
])
def test_the_command_check_rejects_what_the_cli_rejects(line, fragment):
    assert fragment in (check_command(line) or "")


def test_the_command_extraction_reads_chains_environment_and_seed_scripts():
    text = ("```bash\nCUDA_VISIBLE_DEVICES=1 pigg eval --users 1-5 &\n"
            "python3 -m venv .venv && .venv/bin/pigg demo --out /tmp/d  # a comment\n"
            "pip install torch\n```\n"
            "Run `pigg report runs/a runs/b` or `python 4_finetune_person.py 0 --lora --users 1 2`; `pigg.cli` is not one.\n")
    lines = command_lines(text)
    assert [invocations(line) for line in lines] == [
        [["eval", "--users", "1-5"]],
        [["demo", "--out", "/tmp/d"]],
        [["report", "runs/a", "runs/b"]],
        [["personalize", "--lora", "--users", "1,2", "--base", "global_agent_lora"]],
    ]


def repository_references(doc: Path) -> list[str]:
    text = doc.read_text()
    spans = [span for _, span in INLINE.findall(without_fences(text))]
    tokens = [t for chunk in spans + shell_blocks(text) for t in re.split(r"[\s'\"=(),]+", chunk)]
    return [t for t in tokens if REPO_PATH.match(t) or MODULE.match(t)]


def resolves(reference: str) -> bool:
    if MODULE.match(reference):
        parts = reference.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for name in parts[cut:]:
                    obj = getattr(obj, name)
                return True
            except AttributeError:
                return False
        return False
    return (ROOT / reference).exists()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s", "-", text)


def anchors(doc: Path) -> set[str]:
    headings = re.findall(r"^#+\s+(.+)$", without_fences(doc.read_text()), re.MULTILINE)
    return {slug(h) for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_file_link_and_module_named_exists(doc):
    missing = [ref for ref in repository_references(doc) if not resolves(ref)]
    for target in LINK.findall(without_fences(doc.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            missing.append(target)
    assert not missing, f"{doc.name} names what does not exist: {missing}"


def test_the_reference_check_can_fail():
    assert not resolves("docs/no_such_page.md")
    assert not resolves("pigg.fast.no_such_module")
    assert not resolves("pigg.cli.no_such_function")
    assert resolves("pigg.cli.build_parser") and resolves("src/pigg/fast/__init__.py")


def test_no_doc_points_outside_the_repository():
    for doc in DOCS:
        text = doc.read_text()
        for gone in ("design.md", "README, Training speed", "session_1gpu.sh"):
            assert gone not in text, f"{doc.name} mentions {gone!r}"


def test_every_speed_switch_is_on_the_performance_page():
    page = (ROOT / "docs" / "performance.md").read_text()
    import dataclasses

    missing = [f.name for f in dataclasses.fields(C.FastConfig) if f"`{f.name}`" not in page]
    assert not missing, f"docs/performance.md does not describe fast.{missing}"


@pytest.mark.parametrize("doc", [README, ROOT / "docs" / "data.md"], ids=lambda p: p.name)
def test_the_documented_sample_is_valid_and_its_answer_parses(doc):
    import ast

    from pigg.data.samples import normalize_sample
    from pigg.grounding.parser import parse_answer

    blocks = [body for language, body in FENCE.findall(doc.read_text()) if language == "python"]
    assert blocks, f"{doc.name} shows no sample"
    for body in blocks:
        messages, problems = normalize_sample(ast.literal_eval(body), doc.name, 0, ROOT)
        assert not problems, [str(p) for p in problems]
        answer = messages[-1]["content"][0]["text"]
        parsed = parse_answer(answer)
        assert parsed.point is not None and parsed.referring, answer


def test_readme_opens_with_the_two_setup_commands_and_stays_short():
    lines = README.read_text().splitlines()
    assert lines[:6] == ["# pigg", "", "```bash", *SETUP, "```"]
    assert len(lines) <= 320


def test_the_example_configs_are_there():
    names = {p.name for p in CONFIGS}
    assert {"global_lora_8b.yaml", "global_full_8b.yaml", "personalize_lora.yaml", "demo_cpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads_validates_and_explains_each_setting(path):
    C.validate(C.load_yaml(path))
    uncommented = [line for line in path.read_text().splitlines()
                   if re.match(r"^\s+\w+:", line) and "#" not in line]
    assert not uncommented, f"{path.name}: settings without a comment: {uncommented}"


def test_demo_config_is_the_run_the_demo_performs():
    from pigg.offline.demo import demo_config

    shipped = C.to_dict(C.load_yaml(ROOT / "configs" / "demo_cpu.yaml"))
    assert shipped == C.to_dict(demo_config(Path("pigg_demo")))


def command_paths(parser: argparse.ArgumentParser, prefix=()):
    """(subcommand path, parser) for the parser and every subcommand under it, however deep."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, (*prefix, name))


PATHS = [path for path, _ in command_paths(build_parser())]


def test_help_of_every_parser_formats():
    paths = list(command_paths(build_parser()))
    assert any(len(path) == 2 for path, _ in paths)  # the walk reaches nested subcommands (pigg data ...)
    for path, parser in paths:
        assert parser.format_help().startswith("usage:"), path


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(("pigg", *p)))
def test_help_exits_zero(path, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*path, "--help"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
