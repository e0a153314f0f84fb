"""How much memory does a stage need to load its slice? `python bench/slice_memory.py [--work-dir DIR] [--keep]`.

Target: a stage that loads a quarter of the layers of a ~1 GiB fp32 checkpoint into
bf16 peaks at no more than 1.3 x (its slice's parameter bytes + an idle stage process's RSS).

Builds a random Llama-architecture checkpoint of ~1 GiB fp32 (hidden 1024, 16 layers, intermediate
2816, vocab 32000, untied head; safetensors, single file) in the work directory — reused if it is
already there — then measures, each in a fresh `python` subprocess so nothing leaks between them:

  idle          imports everything a stage imports (stage_server.server, slice_loader, torch,
                transformers) and loads nothing
  quarter 0:4   load_slice(dir, 0, L/4, dtype="bfloat16")  — first stage, holds the embeddings
  quarter 4:8   load_slice(dir, L/4, L/2, dtype="bfloat16")  — a middle stage, no embeddings/head
  whole 0:16    load_slice(dir, 0, L, dtype="bfloat16")  — the whole model, same loader
  hf            AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16), for reference

Each child reports its peak RSS (getrusage ru_maxrss, read at its end), its current RSS (psutil) and
the parameter bytes it holds (LoadedSlice.parameter_bytes). The table shows
ratio = peak / (parameter bytes + idle peak), and the quarters' peaks as a fraction of the whole
model's (raw, and above idle). PASS/FAIL is against the 1.3 target for the quarter slices; the exit
status is 1 on FAIL.

Options: --work-dir DIR (default: $TMPDIR/layerline-slice-memory), --keep to leave a checkpoint this run
built on disk (one that was already there is always left), --json PATH to write the results,
--repeat N to run each child N times (peaks are the max, times the min), --layers/--intermediate to
change the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
TARGET = 1.3
CHECKPOINT_MARK = "layerline-bench.json"


def checkpoint_spec(args) -> dict:
    return dict(hidden_size=1024, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=16, num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048,
                tie_word_embeddings=False, seed=0)


def ensure_checkpoint(model_dir: Path, spec: dict) -> bool:
    """Build the checkpoint unless an identical one is there; True if this call built it."""
    mark = model_dir / CHECKPOINT_MARK
    if mark.exists() and json.loads(mark.read_text()) == spec:
        return False
    # Built in a child too: keeps this process small and the build's memory away from the measurements.
    start = time.perf_counter()
    print(f"building a random ~1 GiB fp32 Llama checkpoint in {model_dir} ...", flush=True)
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "spec = json.loads(sys.argv[1]); seed = spec.pop('seed')\n"
        "torch.manual_seed(seed)\n"
        "config = LlamaConfig(**spec, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype='float32')\n"
        "with torch.device('cpu'):\n"
        "    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)\n"
        "model.save_pretrained(sys.argv[2], safe_serialization=True, max_shard_size='20GB')\n"
    )
    if model_dir.exists():
        if not mark.exists() and any(model_dir.iterdir()):
            raise SystemExit(f"{model_dir} exists and was not built by this benchmark; pass another --work-dir")
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(model_dir)], check=True)
    mark.write_text(json.dumps(spec))
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    print(f"  {size / MiB:.0f} MiB of safetensors in {time.perf_counter() - start:.0f} s", flush=True)
    return True


def child_main(args) -> None:
    """One measurement, in a fresh process; prints one JSON line."""
    import gc
    import resource

    import psutil
    import torch
    import transformers  # noqa: F401

    import stage_server.server  # noqa: F401  (everything a stage imports)
    from stage_server.slice_loader import _parameter_bytes, load_slice

    begin = time.perf_counter()
    param_bytes = 0
    holder = None
    if args.child == "slice":
        holder = load_slice(args.model_dir, args.start, args.end, dtype="bfloat16", progress=False)
        param_bytes = holder.parameter_bytes
    elif args.child == "hf":
        from transformers import AutoModelForCausalLM
        holder = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16)
        param_bytes = _parameter_bytes(holder)
    elapsed = time.perf_counter() - begin
    gc.collect()
    result = dict(
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        rss=psutil.Process().memory_info().rss,
        param_bytes=param_bytes,
        load_s=elapsed,
    )
    if args.child == "slice":  # after the peak is read: the weights must be real, finite numbers
        model = holder.architecture.model
        result["finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.device.type != "meta")
    del holder
    print("RESULT " + json.dumps(result), flush=True)


def run_child(model_dir: Path, kind: str, start: int = 0, end: int = 0) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--model-dir", str(model_dir),
           "--start", str(start), "--end", str(end)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"child {kind} {start}:{end} failed (exit {done.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def measure(model_dir: Path, kind: str, start: int, end: int, repeat: int) -> dict:
    runs = [run_child(model_dir, kind, start, end) for _ in range(repeat)]
    return dict(peak_rss=max(r["peak_rss"] for r in runs), rss=max(r["rss"] for r in runs),
                param_bytes=runs[0]["param_bytes"], load_s=min(r["load_s"] for r in runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "layerline-slice-memory")
    parser.add_argument("--keep", action="store_true", help="leave a checkpoint this run built on disk")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each child (max peak, min time)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--no-hf", action="store_true", help="skip the from_pretrained reference")
    parser.add_argument("--child", choices=["idle", "slice", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--end", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return 0
    if args.layers < 4 or args.layers % 4:
        parser.error("--layers must be a positive multiple of 4")

    spec = checkpoint_spec(args)
    model_dir = args.work_dir / f"llama-{args.layers}l-{args.intermediate}i-fp32"
    built = ensure_checkpoint(model_dir, spec)
    try:
        return report(args, model_dir, spec)
    finally:
        if built and not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
            print(f"removed {model_dir} (pass --keep to keep it)")


def report(args, model_dir: Path, spec: dict) -> int:
    layers = spec["num_hidden_layers"]
    q = layers // 4
    # Warm the page cache so the first child does not pay for disk reads the others do not.
    for file in model_dir.glob("*.safetensors"):
        with open(file, "rb") as handle:
            while handle.read(64 * MiB):
                pass
    checkpoint_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    plan = [("idle stage", "idle", 0, 0),
            (f"quarter {0}:{q} (first)", "slice", 0, q),
            (f"quarter {q}:{2 * q} (middle)", "slice", q, 2 * q),
            (f"whole {0}:{layers}", "slice", 0, layers)]
    if not args.no_hf:
        plan.append(("HF from_pretrained", "hf", 0, 0))
    rows = []
    for label, kind, start, end in plan:
        print(f"measuring {label} ...", flush=True)
        rows.append(dict(label=label, kind=kind, start=start, end=end,
                         **measure(model_dir, kind, start, end, args.repeat)))

    idle = rows[0]["peak_rss"]
    whole = next(r for r in rows if r["kind"] == "slice" and r["start"] == 0 and r["end"] == layers)
    for row in rows:
        row["ratio"] = row["peak_rss"] / (row["param_bytes"] + idle)
        row["above_idle"] = row["peak_rss"] - idle

    print()
    print(f"checkpoint: {model_dir}  ({checkpoint_bytes / MiB:.0f} MiB fp32, {layers} layers), loaded into bf16")
    print(f"ratio = peak RSS / (parameter bytes + idle peak RSS {idle / MiB:.0f} MiB); target for quarters "
          f"<= {TARGET}")
    header = f"{'process':<24} {'peak MiB':>9} {'+idle MiB':>10} {'now MiB':>8} {'param MiB':>10} " \
             f"{'ratio':>6} {'load s':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['label']:<24} {row['peak_rss'] / MiB:>9.0f} {row['above_idle'] / MiB:>10.0f} "
              f"{row['rss'] / MiB:>8.0f} {row['param_bytes'] / MiB:>10.0f} {row['ratio']:>6.2f} "
              f"{row['load_s']:>7.2f}")
    print()
    verdict = True
    for row in rows:
        if row["kind"] != "slice" or row is whole:
            continue
        row["of_whole_peak"] = row["peak_rss"] / whole["peak_rss"]
        row["of_whole_above_idle"] = row["above_idle"] / max(1, whole["above_idle"])
        row["pass"] = row["ratio"] <= TARGET
        verdict &= row["pass"]
        print(f"{row['label']:<24} peak = {row['of_whole_peak']:.2f} x whole-model peak "
              f"({row['of_whole_above_idle']:.2f} x above idle); ratio {row['ratio']:.2f} "
              f"{'PASS' if row['pass'] else 'FAIL'} (<= {TARGET})")
    print(f"\n{'PASS' if verdict else 'FAIL'}: quarter slices against the {TARGET} x target")
    if args.json:
        args.json.write_text(json.dumps(dict(checkpoint=spec, checkpoint_bytes=checkpoint_bytes, idle_peak=idle,
                                             target=TARGET, passed=verdict, rows=rows), indent=2))
        print(f"wrote {args.json}")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
