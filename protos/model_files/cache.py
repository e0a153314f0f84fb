"""Where converted models live on disk, and how a finished conversion is recognised.

Owns: the cache root (``$LAYERLINE_CACHE``, default ``~/.cache/layerline``), its layout
(``<cache>/models/<name>/``), and the completion marker (:data:`MARKER_NAME`, carrying
:data:`CACHE_FORMAT`) written last into a converted model directory: a directory without a marker
of the current format is an interrupted or outdated conversion.

Does not own: which names are known (catalog), resolving a model argument (resolve), or writing a
conversion and its marker (fetch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from protos.model_files.catalog import ModelNotFoundError, lookup, unknown_name_message

#: Name of the file written last into a converted model directory; without it the directory is
#: treated as an interrupted conversion.
MARKER_NAME = ".layerline-complete.json"
#: Bumped whenever the conversion output changes; caches written with another value are redone.
CACHE_FORMAT = 1


def cache_root() -> Path:
    """``$LAYERLINE_CACHE`` when set (and non-empty), else ``~/.cache/layerline``."""
    env = os.environ.get("LAYERLINE_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "layerline"


def models_dir() -> Path:
    """The directory holding one subdirectory per converted model (plus locks and staging)."""
    return cache_root() / "models"


def model_cache_dir(name: str) -> Path:
    """Directory a known model is (or would be) converted into. Raises for unknown names."""
    spec = lookup(name)
    if spec is None:
        raise ModelNotFoundError(unknown_name_message(name))
    return models_dir() / spec.name


def read_marker(directory: Path) -> dict | None:
    """The completion marker of ``directory`` as a dict, or None when missing or unreadable."""
    try:
        data = json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a finished conversion in the current :data:`CACHE_FORMAT`."""
    marker = read_marker(directory)
    return directory.is_dir() and marker is not None and marker.get("format") == CACHE_FORMAT
