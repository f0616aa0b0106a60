"""The documentation and the code's layout stay true: every `python rise.py ...` command shown in README.md
and docs/ parses with rise's own parser, every docs page README links to exists, and imports run one way
(core files import no side file; toy.py and report.py import nothing from rise.py)."""

import ast
import re
import shlex
from pathlib import Path

import pytest

import rise

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# a command inside a code span or a fenced line: "python rise.py" or "torchrun ... rise.py", up to the end of
# the span, the line or a shell comment
COMMAND = re.compile(r"(?:python|torchrun[^`\n]*?)\s+rise\.py((?:[^`\n#|&;])*)")


def commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for line in text.replace("\\\n", " ").splitlines():
            found += [(page.name, m.group(1).strip()) for m in COMMAND.finditer(line)]
    return found


def test_the_pages_show_commands():
    names = {page for page, _ in commands()}
    assert "README.md" in names and len(commands()) >= 10


@pytest.mark.parametrize("page,flags", commands())
def test_every_rise_command_in_the_docs_parses(page, flags):
    argv = shlex.split(flags)
    if "--help" in argv:
        return
    try:
        rise.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: `python rise.py {flags}` does not parse (exit {e.code})")


def test_every_docs_page_readme_links_to_exists():
    links = re.findall(r"\]\(((?:docs/)[^)#]+)", (ROOT / "README.md").read_text())
    assert links, "README links no docs page"
    for link in links:
        assert (ROOT / link).is_file(), link


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_imports_run_one_way():
    project = {p.stem for p in ROOT.glob("*.py")}
    for core in ("model", "data", "verify"):
        assert imported(ROOT / f"{core}.py") & project <= {"model", "data", "verify"}, core
    for side in ("toy", "report"):
        assert not imported(ROOT / f"{side}.py") & {"rise", "checks", "bench"}, side
