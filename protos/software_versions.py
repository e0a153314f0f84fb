"""The versions of layerline and of the libraries that decide its numbers, read without importing them.

Owns: `software_versions()` (the map a stage reports in `Stage.Info`: layerline, torch,
transformers, accelerate, grpcio, python), the text `--version` prints, and
`add_version_argument(parser)` that gives both CLIs that flag. Versions come from the installed
packages' metadata (importlib.metadata), so `--version` answers without loading torch.

Does not own: comparing the stages of a chain (coordinator/stage_agreement.py).
"""

from __future__ import annotations

import argparse
import platform
from importlib import metadata

from protos.protocol import PROTOCOL_VERSION

PACKAGES = ("layerline", "torch", "transformers", "accelerate", "grpcio")


def software_versions() -> dict[str, str]:
    """Package name → installed version ("unknown" where it is not installed), plus "python"."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    versions["python"] = platform.python_version()
    return versions


def version_text() -> str:
    """Two lines: layerline's version and protocol, then the libraries' versions."""
    versions = software_versions()
    libraries = ", ".join(f"{name} {versions[name]}" for name in ("torch", "transformers", "grpcio", "python"))
    return f"layerline {versions['layerline']} (stage protocol {PROTOCOL_VERSION})\n{libraries}"


class _VersionAction(argparse.Action):
    """Like argparse's own "version" action, but reads the versions only when the flag is given."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of layerline, torch, transformers, grpcio and Python, and exit")
