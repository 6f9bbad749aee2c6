"""The README's commands still parse with the current flags; its generated blocks are well formed."""

import argparse
import importlib.util
import os
import re
import shlex
import sys

import pytest

from dsm_export.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def readme_commands() -> list[str]:
    """Every command line of the README's ``bash`` blocks (continuations joined, ``&&``/``;`` split,
    a trailing ``&`` dropped), then every command quoted inline."""
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for part in re.split(r"&&|;", line):
                part = part.strip().rstrip("&").strip()
                if part and not part.startswith("#"):
                    commands.append(part)
    # ... and the commands quoted inline in the prose (`dsm-export ...`, `python scripts/...`).
    for span in re.findall(r"`((?:dsm-export|python3? scripts/)[^`]+)`", text):
        commands.append(" ".join(span.split()))
    return commands


COMMANDS = readme_commands()
DSM_EXPORT = [c for c in COMMANDS if c.startswith("dsm-export ")]
SCRIPTS = [c for c in COMMANDS if re.match(r"python3? scripts/\w+\.py", c)]


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


def test_generated_blocks_are_registered_and_paired():
    figures = _load_script(os.path.join(ROOT, "scripts", "readme_figures.py"))
    with open(README, encoding="utf-8") as fh:
        text = re.sub(r"`[^`\n]*`", "", fh.read())  # markers quoted in the prose are no blocks
    opened = re.findall(r"<!-- figures:([\w.-]+) -->", text)
    closed = re.findall(r"<!-- /figures:([\w.-]+) -->", text)
    assert opened == closed and len(set(opened)) == len(opened)
    assert set(opened) <= set(figures.FIGURES), set(opened) - set(figures.FIGURES)


def test_rewrite_replaces_only_the_named_block():
    figures = _load_script(os.path.join(ROOT, "scripts", "readme_figures.py"))
    text = "a\n<!-- figures:x -->\nold x\n<!-- /figures:x -->\nb\n<!-- figures:y -->\nold y\n<!-- /figures:y -->\n"
    out = figures.rewrite(text, {"x": "new x"})
    assert out == "a\n<!-- figures:x -->\nnew x\n<!-- /figures:x -->\nb\n<!-- figures:y -->\nold y\n<!-- /figures:y -->\n"
    with pytest.raises(ValueError, match="no <!-- figures:NAME --> block for z"):
        figures.rewrite(text, {"z": "?"})
