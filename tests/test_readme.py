"""The README's commands are the ones CI runs, and the documented fields exist."""

import re

from conftest import REPO


def code_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_commands_verbatim():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    blocks = code_blocks(readme)
    setup, tests = blocks[0].strip(), blocks[1].strip()
    assert "bitquant convert embedded:smollm2-135m" in setup
    assert "pytest" in tests
    ci_lines = [l.strip() for l in ci.splitlines()]
    assert setup in ci_lines
    assert tests in ci_lines


def test_report_fields_are_documented():
    from bitquant.report import ConvertReport, SizeStats
    from dataclasses import fields

    readme = (REPO / "README.md").read_text()
    for f in fields(ConvertReport):
        if f.name != "up_to_date":  # in memory only, never saved
            assert f"`{f.name}" in readme, f.name
    for f in fields(SizeStats):
        assert f.name in readme, f.name
