"""The README's commands are the ones CI runs, the files they name exist, the cheap ones
run, and the documented fields exist."""

import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

README = REPO / "README.md"
#: Arguments that name an output (created by the command, so they need not exist).
OUTPUT_OPTIONS = {"-o", "--output", "--save-master", ">"}
FILE_SUFFIXES = (".txt", ".yaml", ".yml", ".json", ".py", ".gguf", ".md", ".jinja")


def code_blocks(text, lang="bash"):
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def readme_commands():
    for block in code_blocks(README.read_text()):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line:
                yield line


def named_files(commands):
    """(command, path) for every argument that names an existing-input file."""
    outputs = set()
    for command in commands:
        words = shlex.split(command.replace(">", " > "))
        for prev, word in zip([""] + words, words):
            if prev in OUTPUT_OPTIONS:
                outputs.add(word.rstrip("/"))
                continue
            if word.startswith("-") or "://" in word or word.startswith("./my-"):
                continue
            if word.endswith(FILE_SUFFIXES) and word.split("/", 1)[0] not in outputs:
                yield command, word


def test_ci_runs_the_readme_commands_verbatim():
    readme = README.read_text()
    ci = (REPO / ".ci" / "run").read_text()
    blocks = code_blocks(readme)
    setup, tests = blocks[0].strip(), blocks[1].strip()
    assert "bitquant convert embedded:smollm2-135m" in setup
    assert "pytest" in tests
    ci_lines = [l.strip() for l in ci.splitlines()]
    assert setup in ci_lines
    assert tests in ci_lines


def test_every_file_a_readme_command_names_exists():
    named = list(named_files(readme_commands()))
    assert any(path == "tests/data/alice29.txt" for _, path in named)  # the check sees the paths
    missing = [(c, p) for c, p in named if not (REPO / p).exists()]
    assert not missing, f"README commands name files that do not exist: {missing}"


def test_the_check_catches_a_missing_file():
    assert list(named_files(["bitquant convert x -o out --eval-text alice29.txt"])) == [
        ("bitquant convert x -o out --eval-text alice29.txt", "alice29.txt")]
    # a file inside an earlier command's output folder is made by the README itself
    assert not list(named_files(["bitquant convert m -o smollm2-gguf", "llama-cli -m smollm2-gguf/model.gguf"]))


def test_readme_commands_exist_and_their_help_runs():
    subcommands = sorted({c.split()[1] for c in readme_commands() if c.startswith("bitquant ")})
    assert subcommands == ["convert", "eval", "generate", "heal"]
    for sub in subcommands:
        proc = subprocess.run([sys.executable, "-m", "bitquant.cli.main", sub, "--help"], capture_output=True, text=True,
                              cwd=REPO)
        assert proc.returncode == 0 and "Examples:" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_the_cheap_readme_eval_runs_as_printed():
    command = next(c for c in readme_commands() if c.startswith("bitquant eval embedded:smollm2-135m"))
    args = shlex.split(command)[1:] + ["--max-tokens", "1024", "--json"]  # fewer tokens than printed: cheap
    proc = subprocess.run([sys.executable, "-m", "bitquant.cli.main", *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_report_fields_are_documented():
    from dataclasses import fields

    from bitquant.report import ConvertReport, SizeStats

    docs = README.read_text() + (REPO / "docs" / "formats.md").read_text() + (REPO / "docs" / "heal.md").read_text()
    for f in fields(ConvertReport):
        if f.name != "up_to_date":  # in memory only, never saved
            assert f"`{f.name}" in docs, f.name
    for f in fields(SizeStats):
        assert f.name in docs, f.name
