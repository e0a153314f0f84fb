"""Per-micro-batch timestamps a stage writes when started with `--trace-steps FILE`.

Owns: one JSON line per micro-batch this stage handled, appended to FILE: the stage's name, the
session and micro-batch ids, what became of it (forwarded, answered, failed), and four
CLOCK_MONOTONIC nanosecond stamps: `received` (the upstream stream handed it over), `started`
(the compute thread picked it up), `computed` (the forward pass returned) and `sent` (it went on
to the next stage or its answer was queued). Every stage on one machine may append to the same
file: each record is a single write on a file opened for appending, and CLOCK_MONOTONIC is one
clock for all processes of a machine, so stamps of different stages compare directly. Stamps of
stages on different machines do not.

Does not own: reading the records back into a per-token breakdown (bench/step_timeline.py), nor
deciding when to stamp (step_runner, with the `received` stamp from forward_stream).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass

now_ns = time.monotonic_ns


@dataclass(frozen=True)
class StepRecord:
    stage: str
    session_id: str
    micro_batch_id: int
    outcome: str  # "forwarded" | "answered" | "failed"
    received: int
    started: int
    computed: int
    sent: int


class StepTrace:
    """Appends StepRecords to `path` as JSON lines; safe to call from any thread."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        # Unbuffered binary append: one os-level write per record, so lines from several
        # processes never interleave mid-record.
        try:
            self._file = open(self.path, "ab", buffering=0)
        except OSError as err:
            raise OSError(f"cannot open the step trace {self.path}: {err.strerror}; give --trace-steps a file "
                          "in a writable directory") from err
        self._lock = threading.Lock()

    def write(self, record: StepRecord) -> None:
        line = (json.dumps(asdict(record), separators=(",", ":")) + "\n").encode()
        with self._lock:
            if not self._file.closed:
                self._file.write(line)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_records(path: str | os.PathLike) -> list[StepRecord]:
    """Every record in `path`; a line cut short (a stage killed mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            try:
                records.append(StepRecord(**json.loads(line)))
            except (ValueError, TypeError):
                continue
    return records
