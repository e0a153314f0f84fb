"""The documents stay true to the code: every command-line flag is in docs/cli.md, every file and
link a document names exists, and README.md stays short."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from coordinator.cli import build_parser as coordinator_parser
from stage_server.cli import build_parser as stage_server_parser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI_DOC = ROOT / "docs" / "cli.md"
README_MAX_LINES = 250

# Top-level folders whose paths a document may name, e.g. `stage_server/server.py`, `bench/x.py`.
TRACKED_FOLDERS = ("stage_server", "coordinator", "protos", "bench", "docs", "tests", "clients", ".ci", "deploy")
# A path starts at one of those folders, not inside a longer word, path or URL.
MENTIONED_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(f) for f in TRACKED_FOLDERS)
                            + r")/[\w.*/-]*)")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _commands(parser: argparse.ArgumentParser, name: str):
    """(command name, parser) for a parser and, depth first, each of its subcommands."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub_parser in action.choices.items():
                yield from _commands(sub_parser, f"{name} {sub_name}")


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """The long options --help prints for this parser (its subcommands' are their own)."""
    return [option for action in parser._actions if action.help != argparse.SUPPRESS
            for option in action.option_strings if option.startswith("--")]


COMMANDS = [*_commands(stage_server_parser(), "stage-server"), *_commands(coordinator_parser(), "coordinator")]


def _mentions(text: str, flag: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", text) is not None


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(document: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in document.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("command, parser", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_every_flag_is_in_the_cli_doc(command, parser):
    text = CLI_DOC.read_text()
    missing = [flag for flag in _flags(parser) if not _mentions(text, flag)]
    assert not missing, f"{command}: flags missing from docs/cli.md: {missing}"


def test_every_command_is_in_the_cli_doc():
    text = CLI_DOC.read_text()
    missing = [command for command, _ in COMMANDS if f"`{command}" not in text]
    assert not missing, f"commands missing from docs/cli.md: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.relative_to(ROOT).as_posix() for d in DOCUMENTS])
def test_every_named_path_exists(document):
    paths = [path.rstrip(".,:;") for path in MENTIONED_PATH.findall(document.read_text())]
    missing = [path for path in paths if not (any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists())]
    assert not missing, f"{document.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.relative_to(ROOT).as_posix() for d in DOCUMENTS])
def test_every_relative_link_resolves(document):
    broken = []
    for target in MARKDOWN_LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{document.name} has broken links: {broken}"


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it at most {README_MAX_LINES}"


def test_the_architecture_map_names_every_module():
    """docs/architecture.md's "Where the code lives" lists each package's modules, so a newcomer
    finds the room for a change from it; a module added or renamed must appear there."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## Where the code lives"):text.index("## Where to read next")]
    missing = [f"{package}/{path.name}" for package in ("protos", "stage_server", "coordinator")
               for path in sorted((ROOT / package).glob("*.py"))
               if path.name != "__init__.py" and not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
               and path.name != "generate.py" and f"`{path.name}`" not in section]
    assert missing == []
