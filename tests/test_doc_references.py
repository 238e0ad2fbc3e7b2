"""
Every pointer to the documentation names a page and section that exist: "README, <section>" and
"docs/<page>.md[, <section>]" in code, messages, comments, configs and the docs themselves, and
the project's source files named by path. Measured results are quoted in README.md and
BENCHMARKS.md only, not in YAML comments or module docstrings, where they go stale.
"""
import ast
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = (".py", ".yaml", ".md")

# "README, Results", "README, Install: ...", "README, \"Train on COCO\"", "README's 'Layout'"
README_SECTION = re.compile(r"README(?:'s|,) (?:[\"'“]([^\"'”\n]+)[\"'”]|([A-Z][a-z]+(?: [a-z]+)*))")
DOCS_PAGE = re.compile(r"docs/([a-z_]+)\.md(?:, [\"'“]([^\"'”\n]+)[\"'”])?")
SOURCE_PATH = re.compile(r"(?<![\w/.-])((?:[a-z_]+/)+[a-z_0-9]+\.py)\b")
# A result with a number: "bbox AP 18.1", "AP50 42.9", "APr 9.7".
MEASURED_AP = re.compile(r"\bAP(?:50|75|r|c|f)? \d+\.\d")


def _tracked_text_files() -> List[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    return [REPO / n for n in names if n.endswith(TEXT_SUFFIXES)
            and not n.startswith("benchmarks/results/")]


def _headings(page: Path) -> Set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#{2,3} (.+)$", page.read_text(), re.M)}


def _where(path: Path, text: str, offset: int) -> str:
    return f"{path.relative_to(REPO)}:{text.count(chr(10), 0, offset) + 1}"


@pytest.fixture(scope="module")
def texts() -> Dict[Path, str]:
    return {path: path.read_text() for path in _tracked_text_files()}


def test_readme_sections_named_exist(texts):
    headings = _headings(REPO / "README.md")
    missing = [f"{_where(p, t, m.start())}: {m.group(0)}"
               for p, t in texts.items() for m in README_SECTION.finditer(t)
               if (m.group(1) or m.group(2)).strip() not in headings]
    assert missing == []


def test_docs_pages_and_sections_named_exist(texts):
    missing = []
    for path, text in texts.items():
        for m in DOCS_PAGE.finditer(text):
            page = REPO / "docs" / f"{m.group(1)}.md"
            if not page.is_file() or (m.group(2) and m.group(2) not in _headings(page)):
                missing.append(f"{_where(path, text, m.start())}: {m.group(0)}")
    assert missing == []


def test_source_files_named_by_path_exist(texts):
    # A path resolves from the file's folder, the repository, projects/ or either package;
    # detectron2's and torch's own files are named with their library on the same line. The
    # tests name files they create.
    bases = [REPO, REPO / "projects", *(p for p in (REPO / "projects").iterdir() if p.is_dir())]
    missing = []
    for path, text in texts.items():
        if path.parent.name == "tests":
            continue
        for m in SOURCE_PATH.finditer(text):
            line = text[text.rfind("\n", 0, m.start()) + 1:text.find("\n", m.end())]
            if "detectron2" in line or "torch" in line:
                continue
            if not any((base / m.group(1)).exists() for base in [path.parent, *bases]):
                missing.append(f"{_where(path, text, m.start())}: {m.group(1)}")
    assert missing == []


def test_no_measured_result_in_yaml_comments_or_module_docstrings(texts):
    quoted = []
    for path, text in texts.items():
        if path.suffix == ".yaml":
            places = [line for line in text.splitlines() if "#" in line]
        elif path.suffix == ".py" and "tests" not in path.parts:
            places = [ast.get_docstring(ast.parse(text)) or ""]
        else:
            continue
        quoted += [f"{path.relative_to(REPO)}: {m.group(0)}" for place in places
                   for m in MEASURED_AP.finditer(place)]
    assert quoted == []
