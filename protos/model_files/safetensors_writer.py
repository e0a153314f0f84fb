"""Write float32 tensors into a safetensors file one at a time.

Owns: the safetensors layout as written here (8-byte little-endian header length, a JSON index of
dtype, shape and byte offsets space-padded to 8 bytes, then the raw little-endian float32 data),
with the header computed from shapes known up front so that only one tensor is held in memory.

Does not own: where the tensors come from (gguf_convert dequantizes them) or reading safetensors
files (the stage server's checkpoint_reader). A tensor whose data does not match its declared
shape raises :class:`~protos.model_files.catalog.ModelFetchError`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from protos.model_files.catalog import ModelFetchError

if TYPE_CHECKING:
    import numpy as np


def write_safetensors_streaming(
    path: Path,
    entries: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]],
    metadata: dict[str, str],
    on_written: Callable[[str], None],
) -> None:
    """Write ``entries`` (name, shape, function producing the data) to ``path`` as float32.

    The header goes first, then each tensor as its function produces it; ``on_written`` is called
    with each name once its bytes are written.
    """
    import numpy as np

    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape, _ in entries:
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for name, shape, produce in entries:
            array = np.ascontiguousarray(produce(), dtype="<f4")
            if array.shape != shape:
                raise ModelFetchError(f"{name} dequantized to shape {array.shape}, expected {shape}")
            handle.write(memoryview(array).cast("B"))
            del array
            on_written(name)
