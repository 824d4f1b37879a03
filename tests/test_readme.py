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


#: A figure: digits with thousands commas, a decimal part and an exponent (6.34e7, 3.845e+04).
FIGURE = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?(?:e[+-]?\d+)?")
LINK = re.compile(r"\]\((docs/[\w.-]+\.md)")


def _plain(text: str) -> str:
    """One spelling of exponents (e+07, e07 -> e7), so 6.34e7 and 6.34e+07 match."""
    return re.sub(r"e\+?0*(\d)", r"e\1", text)


def linked_rows(readme: str):
    """(cells, linked docs) for every README table row whose last cell links docs/ pages."""
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and LINK.search(cells[-1]):
            yield cells, sorted(set(LINK.findall(cells[-1])))


def figures_not_in_their_docs(readme: str) -> list[tuple[str, str]]:
    """(row, figure) for every figure of a README table row whose last cell links docs that
    do not have the same digits."""
    missing = []
    for cells, linked in linked_rows(readme):
        docs = _plain("".join((REPO / p).read_text() for p in linked))
        for figure in FIGURE.findall(_plain(" ".join(cells[:-1]))):
            if not re.search(rf"(?<!\d)(?<!\d[.,]){re.escape(figure)}(?!\d|[.,]\d)", docs):
                missing.append((cells[0][:50], figure))
    return missing


def test_every_figure_the_readme_quotes_has_the_same_digits_in_its_docs():
    readme = README.read_text()
    assert len(list(linked_rows(readme))) >= 10  # the check sees the Measured table
    assert not figures_not_in_their_docs(readme)


def test_the_figure_check_catches_other_digits():
    row = "| SmolLM2-135M convert | 269.1 MB → 83.3 MB, 2.0 bits per ternary weight, 1 s | [m](docs/measurements.md) |"
    assert not figures_not_in_their_docs(row)
    assert figures_not_in_their_docs(row.replace("269.1", "269.2")) == [("SmolLM2-135M convert", "269.2")]
    assert figures_not_in_their_docs(row.replace("83.3", "83")) == [("SmolLM2-135M convert", "83")]
