"""Every command in README.md and docs/*.md can be pasted as written: the scripts exist, each
--flag is one the script's argparse knows (its --help), make targets exist, and config files
named with --config-file exist."""

import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Placeholders a reader replaces (upper-case words, <...>, paths under data/, output/, weights/).
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$|<.*>|\.\.\.")


def _commands():
    """(doc, command line) of every line of the fenced bash blocks, continuations joined."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    out.append((doc.relative_to(REPO).as_posix(), line))
    return out


COMMANDS = _commands()
# Files the docs' own commands make (`cp TEMPLATE COPY`): later commands may name them.
MADE = {shlex.split(c)[2] for _, c in COMMANDS if c.startswith("cp ") and len(shlex.split(c)) == 3}


@lru_cache(maxsize=None)
def _help(script: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script} --help failed:\n{result.stderr[-2000:]}"
    return result.stdout


def _makefile_targets():
    return set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M))


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 10
    assert any("train_net.py" in c for _, c in COMMANDS)


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_command_is_pasteable(doc, command):
    words = shlex.split(command)
    # Leading environment assignments (VAR=value) and the interpreter.
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words:
        return
    program = words[0]
    if program == "make":
        targets = [w for w in words[1:] if "=" not in w]
        assert set(targets) <= _makefile_targets(), f"{doc}: unknown make target in {command!r}"
        return
    if program in ("python", "python3", ".venv/bin/python") or program.endswith("/python"):
        words = words[1:]
    elif program == "bash":
        assert (REPO / words[1]).is_file(), f"{doc}: {words[1]} does not exist"
        return
    else:
        return  # other tools (tail, git, scancel ...): not this project's to check
    script = words[0]
    if script == "-m":
        return
    assert (REPO / script).is_file(), f"{doc}: {script} does not exist ({command!r})"
    help_text = _help(script)
    for i, word in enumerate(words[1:], 1):
        if word.startswith("--"):
            flag = word.split("=")[0]
            assert re.search(rf"(^|[\s,\[]){re.escape(flag)}([\s,=\]]|$)", help_text, re.M), (
                f"{doc}: {script} has no option {flag} ({command!r})")
        previous = words[i - 1]
        if previous == "--config-file" and not _PLACEHOLDER.search(word):
            if not word.startswith(("output/", "/", "OUT")) and word not in MADE:
                assert (REPO / word).is_file(), f"{doc}: config {word} does not exist"
