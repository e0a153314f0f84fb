"""What checking the weights manifest costs a stage's load, on the real default model.

Alternated rounds of `load_slice` with the check (each tensor's bytes digested and
compared with the manifest) and without it (the manifest and the digest replaced by no-ops), for
each dtype and slice; the files stay in the page cache (one load first, not counted). Medians of
the wall time, of the loading thread's CPU time and of the CPU time spent digesting (on the loading
thread for tensors converted as they are read, on the check's worker thread for the others), and
the least of the loading thread's CPU time for each kind of load: on a machine whose cores other
programs share, wall time and even a thread's CPU time swell with their load. Also times making the
manifest once (every tensor of the checkpoint digested from its file).

    python bench/manifest_cost.py [--model smollm2-135m] [--rounds 5] [--dtypes float32,bfloat16]
        [--slices 0:30,0:15] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protos.model_files.fetch import ensure_model  # noqa: E402
from stage_server import slice_loader, weights_manifest  # noqa: E402


class _TimedDigest:
    """SHA-256 that adds the CPU time of the calling thread spent digesting to `spent`."""

    spent = 0.0

    def __init__(self, data=b""):
        self._digest = hashlib.sha256()
        self.update(data)

    def update(self, data):
        started = time.thread_time()
        self._digest.update(data)
        _TimedDigest.spent += time.thread_time() - started

    def hexdigest(self):
        return self._digest.hexdigest()


class _Unchecked:
    """A manifest that vouches for anything, and a check that digests nothing."""

    id = ""

    def __init__(self, *_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        pass

    def hasher(self):
        return self

    def update(self, _):
        pass

    def check(self, *_):
        pass

    def check_later(self, *_):
        pass

    def finish(self):
        pass


def _timed_digest_of(data) -> str:
    return _TimedDigest(data).hexdigest()


def _load_seconds(model_dir: Path, span: tuple[int, int], dtype: str, checked: bool) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the loading thread, CPU seconds spent digesting on any thread) of one load."""
    saved = slice_loader.manifest_for, slice_loader.SliceCheck, weights_manifest._digest_of, \
        weights_manifest.SliceCheck.hasher
    _TimedDigest.spent = 0.0
    weights_manifest._digest_of = _timed_digest_of
    weights_manifest.SliceCheck.hasher = lambda self: _TimedDigest()
    if not checked:
        slice_loader.manifest_for = lambda *_: _Unchecked()
        slice_loader.SliceCheck = _Unchecked
    try:
        started, cpu = time.perf_counter(), time.thread_time()
        piece = slice_loader.load_slice(model_dir, *span, dtype=dtype, progress=False)
        elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu
    finally:
        (slice_loader.manifest_for, slice_loader.SliceCheck, weights_manifest._digest_of,
         weights_manifest.SliceCheck.hasher) = saved
    if checked and not piece.weights_manifest_id:
        raise SystemExit("the checked load reported no manifest id")
    del piece
    return elapsed, cpu, _TimedDigest.spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--slices", default="0:30,0:15")
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args()
    model_dir = ensure_model(args.model)
    layout = slice_loader.CheckpointIndex(model_dir).layout()
    size = sum(entry.nbytes for entries in layout.values() for entry in entries.values())
    started, cpu = time.perf_counter(), time.thread_time()
    weights_manifest.make_digests(model_dir, layout)
    made_s, made_cpu = time.perf_counter() - started, time.thread_time() - cpu
    results = {"model": args.model, "checkpoint_mib": round(size / 2**20, 1), "make_manifest_s": round(made_s, 3),
               "make_manifest_cpu_s": round(made_cpu, 3), "rounds": args.rounds, "loads": []}
    print(f"{args.model}: {size / 2**20:.0f} MiB of tensors; making the manifest: {made_s:.2f} s "
          f"({made_cpu:.2f} s CPU)", flush=True)
    for dtype in args.dtypes.split(","):
        for text in args.slices.split(","):
            span = slice_loader.parse_layer_range(text)
            _load_seconds(model_dir, span, dtype, True)  # warm the page cache and the manifest
            times: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
            for round_ in range(args.rounds):
                for checked in ((True, False) if round_ % 2 == 0 else (False, True)):
                    times[checked].append(_load_seconds(model_dir, span, dtype, checked))
            (with_s, with_cpu, digest_cpu), (without_s, without_cpu, _) = (
                tuple(statistics.median(t[i] for t in times[c]) for i in (0, 1, 2)) for c in (True, False))
            row = {"dtype": dtype, "layers": text, "checked_s": round(with_s, 3), "unchecked_s": round(without_s, 3),
                   "checked_cpu_s": round(with_cpu, 3), "unchecked_cpu_s": round(without_cpu, 3),
                   "digest_cpu_s": round(digest_cpu, 3),
                   # The least of each: the work itself, with the least interference from other programs.
                   "least_checked_cpu_s": round(min(t[1] for t in times[True]), 3),
                   "least_unchecked_cpu_s": round(min(t[1] for t in times[False]), 3),
                   "samples": {"checked": times[True], "unchecked": times[False]}}
            results["loads"].append(row)
            print(f"{dtype:9s} layers {text:6s} load with the check {with_s:.3f} s, without {without_s:.3f} s; "
                  f"loading thread CPU {with_cpu:.3f} s against {without_cpu:.3f} s; digesting "
                  f"{digest_cpu:.3f} s (medians of {args.rounds}); least loading thread CPU "
                  f"{row['least_checked_cpu_s']:.3f} s against {row['least_unchecked_cpu_s']:.3f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
