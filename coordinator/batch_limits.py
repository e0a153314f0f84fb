"""Bounds on what a coordinator runs at once (`BatchLimits`); beyond them requests wait in a queue.

Apart from the scheduler that applies them, so that a command line can print their defaults
without loading torch. Does not own admission (scheduler).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLimits:
    """Bounds on what the coordinator runs at once; beyond them requests wait in a queue."""

    max_batch_rows: int = 64  # sequences generating at once, over every group and prefill
    max_cache_positions: int = 1 << 16  # Σ (prompt + max_new_tokens) over those sequences
    max_queue: int = 1024  # sequences waiting for admission
    prefill_chunk_tokens: int = 512  # rows × longest prompt per prefill (longer: alone, in chunks); 0 = no bound

    def __post_init__(self) -> None:
        for name in ("max_batch_rows", "max_cache_positions", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.prefill_chunk_tokens < 0:
            raise ValueError(f"prefill_chunk_tokens must be 0 (no chunks) or more, got {self.prefill_chunk_tokens}")
