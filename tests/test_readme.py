"""The commands of the README and the docs/ pages still parse with the current flags; their generated
blocks are well formed, each in one file, and every generator has one."""

import argparse
import glob
import importlib.util
import os
import re
import shlex
import sys

import pytest

from dsm_export.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# The README and every docs/ page: commands moved out of the README stay tested.
DOCUMENTS = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def readme_commands(paths: list[str] = DOCUMENTS) -> list[str]:
    """Every command line of the ``bash`` blocks of ``paths`` (continuations joined, ``&&``/``;``
    split, a trailing ``&`` dropped), then every command quoted inline, file by file."""
    commands = []
    for path in paths:
        commands += _file_commands(_read(path))
    return commands


def _file_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for part in re.split(r"&&|;", line):
                part = part.strip().rstrip("&").strip()
                if part and not part.startswith("#"):
                    commands.append(part)
    # ... and the commands quoted inline in the prose (`dsm-export ...`, `python scripts/...`,
    # `python research/...`).
    for span in re.findall(r"`((?:dsm-export|python3? (?:scripts|research)/)[^`]+)`", text):
        commands.append(" ".join(span.split()))
    return commands


COMMANDS = readme_commands()
DSM_EXPORT = [c for c in COMMANDS if c.startswith("dsm-export ")]
# scripts/ holds the user tools, research/ the generators of the figures in README.md and docs/
SCRIPTS = [c for c in COMMANDS if re.match(r"python3? (?:scripts|research)/\w+\.py", c)]


def test_documents_are_the_readme_and_the_docs_pages():
    names = {os.path.relpath(p, ROOT) for p in DOCUMENTS}
    assert "README.md" in names
    assert {"docs/int8.md", "docs/tuning.md", "docs/deployment.md", "docs/testing.md"} <= names


def test_readme_quotes_commands():
    assert len(DSM_EXPORT) >= 10 and len(SCRIPTS) >= 5
    quoted = {shlex.split(c)[1] for c in DSM_EXPORT}
    assert {"export", "validate", "inspect", "analyze", "tune", "visualize", "triton-repo", "serve"} <= quoted


@pytest.mark.parametrize("command", DSM_EXPORT)
def test_dsm_export_command_parses(command):
    try:
        args = build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as exc:
        pytest.fail(f"{command!r} does not parse (exit {exc.code})")
    assert callable(args.func)


class _Parsed(Exception):
    """Raised instead of running a script once its arguments parsed."""


def _load_script(path):
    spec = importlib.util.spec_from_file_location(f"readme_script_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("command", SCRIPTS)
def test_script_command_parses(command, monkeypatch):
    """The script's own parser takes the quoted arguments (the script stops right after parsing)."""
    argv = shlex.split(command)
    module = _load_script(os.path.join(ROOT, argv[1]))
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        module.main(argv[2:])
    except SystemExit as exc:
        pytest.fail(f"{command!r} does not parse (exit {exc.code})")
    except _Parsed:
        return
    pytest.fail(f"{argv[1]} never parsed its arguments")


def test_every_research_generator_says_what_it_writes():
    """research/README.md and docs/testing.md each have a table row for every generator in research/."""
    generators = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "research", "*.py")))
    assert "readme_figures.py" in generators
    own, testing = _read(os.path.join(ROOT, "research", "README.md")), _read(os.path.join(ROOT, "docs", "testing.md"))
    assert [g for g in generators if f"\n| `{g}` | " not in own] == []
    assert [g for g in generators if f"\n| `research/{g}` | " not in testing] == []


def test_generated_blocks_are_registered_and_paired():
    figures = _load_script(os.path.join(ROOT, "research", "readme_figures.py"))
    everywhere = []
    for path in DOCUMENTS:
        text = re.sub(r"`[^`\n]*`", "", _read(path))  # markers quoted in the prose are no blocks
        opened = re.findall(r"<!-- figures:([\w.-]+) -->", text)
        closed = re.findall(r"<!-- /figures:([\w.-]+) -->", text)
        assert opened == closed, path
        everywhere += opened
    assert len(set(everywhere)) == len(everywhere), "a block in two places"
    assert set(everywhere) <= set(figures.FIGURES), set(everywhere) - set(figures.FIGURES)
    assert set(figures.FIGURES) <= set(everywhere), f"generators without a block: {set(figures.FIGURES) - set(everywhere)}"


def test_the_script_finds_every_block_where_it_is():
    """readme_figures.py's default files are the test's, and it finds each block in the file that holds it."""
    figures = _load_script(os.path.join(ROOT, "research", "readme_figures.py"))
    assert figures.default_documents() == DOCUMENTS
    where = figures.find_blocks(DOCUMENTS)
    assert set(where) == set(figures.FIGURES)
    for name, path in where.items():
        assert f"<!-- figures:{name} -->\n" in _read(path)
    assert figures.build_parser().parse_args([]).files is None  # default: README.md and docs/*.md
    assert figures.build_parser().parse_args(["--readme", "a.md", "--file", "b.md"]).files == ["a.md", "b.md"]


def test_blocks_are_rewritten_in_the_file_that_holds_them(tmp_path, monkeypatch):
    """``main`` rewrites each block in place, in whichever file holds it, and touches no other file."""
    figures = _load_script(os.path.join(ROOT, "research", "readme_figures.py"))
    readme, page, other = tmp_path / "README.md", tmp_path / "page.md", tmp_path / "other.md"
    readme.write_text("top\n<!-- figures:x -->\nold x\n<!-- /figures:x -->\n", encoding="utf-8")
    page.write_text("a\n<!-- figures:y -->\nold y\n<!-- /figures:y -->\nb\n", encoding="utf-8")
    other.write_text("no blocks, only `<!-- figures:NAME -->` quoted\n", encoding="utf-8")
    made = {"x": "new x", "y": "new y"}
    monkeypatch.setattr(figures, "FIGURES", {n: figures.Figure(n, n, lambda ctx, n=n: made[n]) for n in made})
    monkeypatch.setattr(figures, "machine", lambda: "test machine")
    files = [str(readme), str(page), str(other)]
    assert figures.find_blocks(files) == {"x": str(readme), "y": str(page)}
    assert figures.main(["y", *sum((["--file", f] for f in files), [])]) == 0
    assert readme.read_text(encoding="utf-8") == "top\n<!-- figures:x -->\nold x\n<!-- /figures:x -->\n"
    text = page.read_text(encoding="utf-8")
    assert text.startswith("a\n<!-- figures:y -->\nnew y\n\n<sub>Generated by `python research/readme_figures.py y` on test machine")
    assert text.endswith("</sub>\n<!-- /figures:y -->\nb\n")
    assert figures.main([*sum((["--readme", f] for f in files), [])]) == 0  # every generator
    assert "\nnew x\n" in readme.read_text(encoding="utf-8")
    assert other.read_text(encoding="utf-8") == "no blocks, only `<!-- figures:NAME -->` quoted\n"
    assert figures.main(["x", "--file", str(page)]) == 2  # x is not in that file: nothing written
    page.write_text(page.read_text(encoding="utf-8") + "<!-- figures:x -->\nagain\n<!-- /figures:x -->\n", encoding="utf-8")
    with pytest.raises(ValueError, match="two <!-- figures:x --> blocks"):
        figures.find_blocks(files)
    assert figures.main(["y", *sum((["--file", f] for f in files), [])]) == 2


def test_rewrite_replaces_only_the_named_block():
    figures = _load_script(os.path.join(ROOT, "research", "readme_figures.py"))
    text = "a\n<!-- figures:x -->\nold x\n<!-- /figures:x -->\nb\n<!-- figures:y -->\nold y\n<!-- /figures:y -->\n"
    out = figures.rewrite(text, {"x": "new x"})
    assert out == "a\n<!-- figures:x -->\nnew x\n<!-- /figures:x -->\nb\n<!-- figures:y -->\nold y\n<!-- /figures:y -->\n"
    with pytest.raises(ValueError, match="no <!-- figures:NAME --> block for z"):
        figures.rewrite(text, {"z": "?"})
