"""Rules of the source tree that keep it readable: modules stay small, the coordinator stays
independent of the stage server's code, and files describe the software as it is."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.splitlines() if (ROOT / name).is_file()]


def hand_written_modules() -> list[Path]:
    return [path for path in tracked_files() if path.suffix == ".py" and not re.search(r"_pb2(_grpc)?\.py$", path.name)]


def test_no_hand_written_module_is_over_the_limit():
    long = {str(path.relative_to(ROOT)): lines for path in hand_written_modules()
            if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"split these modules (at most {MAX_MODULE_LINES} lines each)"


def test_every_package_module_says_what_it_owns():
    missing = [str(path.relative_to(ROOT)) for path in hand_written_modules()
               if path.parts[len(ROOT.parts)] in ("protos", "stage_server", "coordinator")
               and path.name != "__init__.py" and ast.get_docstring(ast.parse(path.read_text())) is None]
    assert missing == [], "these modules start without a docstring"


def test_the_coordinator_imports_nothing_from_the_stage_server():
    offenders = []
    for path in (ROOT / "coordinator").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "stage_server"]
    assert offenders == []


# Numbered development runs belong to git history, not to files that describe the software.
_RUN_NUMBER = re.compile(r"\b[Ss]tops? \d+\b|\b[Ss]tops \d+[–-]\d+")


def test_no_file_speaks_of_numbered_runs():
    text_files = [path for path in tracked_files()
                  if path.suffix in (".py", ".md", ".proto", ".toml", ".txt", ".sh", ".js", ".go", ".yaml", ".yml", "")
                  and path.name != "test_house_rules.py"]
    hits = []
    for path in text_files:
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(ROOT)}:{number}" for number, line in enumerate(lines, 1)
                 if _RUN_NUMBER.search(line)]
    assert hits == []
