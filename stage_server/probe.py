"""`stage-server --probe`: what this host can do for one model, as one JSON line.

Owns: timing a few decoder layers of the model on this host as a stage would run them (the
threads a stage takes, one decoding row and one prefill chunk, the median of a few rounds), the
bytes a layer's weights and a token's KV cache take, the final norm + LM head's cost in layers
(its weights over a layer's, as coordinator/split_costs.py estimates it), and the memory this
host has free (the smaller of what the kernel calls available and what this process's cgroup
still allows). `coordinator plan --probe` turns the lines of several hosts into spans
(coordinator/placement.py).

Does not own: the plan, serving, or the thread policy itself (thread_counts; the probe applies
its rule for single-row steps: one thread unless all are AUTO_MIN_GAIN faster).

Why a slice and not the model: a host's time per layer is the same for every layer of a
decoder (they have one shape), so PROBE_LAYERS middle layers, timed and divided, stand for all
of them; loading the whole model to time it would need the memory the plan is meant to find.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

PROBE_FORMAT = 1  # the "probe" field of the line: coordinator plan refuses formats it does not read
PROBE_LAYERS = 2
CONTEXT_TOKENS = 64  # positions in the cache when a round of decode steps starts
PREFILL_TOKENS = 128
ROUNDS = 5
ROUND_S = 0.25  # longer than a quota period of 100 ms (the kernel's and Kubernetes' default) twice over
MAX_CALLS = 256  # per round (each decode step adds a position to the cache)


def add_probe_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe", action="store_true",
                        help="measure this host for --model (time per decoder layer for one decoding row and "
                             "per prefill token, weight and KV-cache bytes per layer, free memory), print one "
                             "JSON line for coordinator plan --probe and exit; listens on nothing, --layers "
                             "not needed")


def median_seconds(step: Callable[[], None], *, rounds: int = ROUNDS, round_s: float = ROUND_S,
                   max_calls: int = MAX_CALLS, sync: Callable[[], None] = lambda: None,
                   begin: Callable[[], None] = lambda: None) -> float:
    """Seconds per call of `step`: the median over `rounds` of each round's mean, a round calling it
    until `round_s` have passed (at most `max_calls` times), after `begin` and one call that warms up.

    Why means of rounds and not the median call: a CPU quota (a cgroup's cpu.max, a container's
    limit) lets a process run at full speed until its quota for the period is spent, then stops
    it until the next period; single calls are then mostly fast with a few long stalls, so their
    median says the host is faster than it is. A round that spans whole periods counts the stalls.
    """
    per_call = []
    for _ in range(rounds):
        begin()
        step()
        sync()
        calls, started = 0, time.perf_counter()
        while calls < max_calls and (calls == 0 or time.perf_counter() - started < round_s):
            step()
            calls += 1
        sync()
        per_call.append((time.perf_counter() - started) / calls)
    return statistics.median(per_call)


def probe_layers(num_layers: int) -> tuple[int, int]:
    """The layers a probe loads: PROBE_LAYERS from the middle, away from the embedding and the head
    where the model has enough layers."""
    count = min(PROBE_LAYERS, num_layers)
    start = max(0, min(num_layers - count, num_layers // 2 - count // 2))
    return start, start + count


def cgroup_memory_free(proc_cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process's cgroup still allows (limit - usage), from the text of /proc/self/cgroup:
    cgroup v2 (memory.max, memory.current) or v1 (memory.limit_in_bytes, memory.usage_in_bytes); None
    when there is no limit or it cannot be read. A cgroup whose directory this mount does not show
    (a container sees its own at the root) is read at the root."""
    for line in proc_cgroup.splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            files, base = ("memory.max", "memory.current"), root
        elif "memory" in controllers.split(","):
            files, base = ("memory.limit_in_bytes", "memory.usage_in_bytes"), root / "memory"
        else:
            continue
        for folder in (base / path.lstrip("/"), base):
            with contextlib.suppress(OSError, ValueError):
                limit_text = (folder / files[0]).read_text().strip()
                usage = int((folder / files[1]).read_text())
                if limit_text == "max" or int(limit_text) >= 1 << 60:  # v1 writes "no limit" as ~2**63
                    break
                return max(0, int(limit_text) - usage)
    return None


def free_memory_bytes(device) -> int:
    """Memory a stage could take on this host now: a GPU's free memory, or on CPU the kernel's
    available memory capped by the cgroup's remaining allowance."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    available = int(psutil.virtual_memory().available)
    with contextlib.suppress(OSError):
        allowed = cgroup_memory_free(Path("/proc/self/cgroup").read_text())
        if allowed is not None:
            return min(available, allowed)
    return available


def run_probe(model_dir: str, *, dtype: str = "auto", device: str = "cpu", threads: int = 0,
              host: str = "", model_name: str = "") -> dict:
    """Measure this host for the model in `model_dir` (`model_name`: as the user named it, for the
    commands a plan prints; default the directory's name); returns the probe's JSON object."""
    import torch
    from transformers import AutoConfig, DynamicCache

    from stage_server.core_share import usable_cores
    from stage_server.machine_lock import MachineLock
    from stage_server.slice_loader import load_slice
    from stage_server.thread_counts import AUTO_MIN_GAIN

    config = AutoConfig.from_pretrained(model_dir)
    start, end = probe_layers(config.num_hidden_layers)
    loaded = load_slice(model_dir, start, end, dtype=dtype, device=device, progress=False)
    arch, count = loaded.architecture, end - start
    on_gpu = loaded.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(loaded.device)) if on_gpu else (lambda: None)
    full = threads or usable_cores()

    def hidden(tokens: int) -> torch.Tensor:
        return torch.randn(1, tokens, config.hidden_size, dtype=loaded.dtype, device=loaded.device) * 0.1

    def positions(first: int, tokens: int) -> torch.Tensor:
        return torch.arange(first, first + tokens, device=loaded.device).unsqueeze(0)

    max_positions = getattr(config, "max_position_embeddings", None) or 1 << 20
    context = min(CONTEXT_TOKENS, max_positions // 4)
    steps = max(1, min(MAX_CALLS, max_positions - context - 2))
    prefill_tokens = max(1, min(PREFILL_TOKENS, max_positions))
    state: dict = {}

    def new_decode() -> None:
        state["cache"], state["seen"] = DynamicCache(config=loaded.sliced_config), context
        arch.run_layers(hidden(context), positions(0, context), None, state["cache"])

    def decode_step() -> None:
        arch.run_layers(hidden(1), positions(state["seen"], 1), None, state["cache"])
        state["seen"] += 1

    def decode_seconds() -> float:
        return median_seconds(decode_step, max_calls=max(1, steps - 1), sync=sync, begin=new_decode)

    def prefill_seconds() -> float:
        return median_seconds(lambda: arch.run_layers(hidden(prefill_tokens), positions(0, prefill_tokens), None,
                                                      DynamicCache(config=loaded.sliced_config)), sync=sync)

    with MachineLock().held(exclusive=True), torch.inference_mode():  # no stage here loads or times itself meanwhile
        if on_gpu:
            decode, decode_threads = decode_seconds(), 0
            prefill = prefill_seconds()
        else:
            torch.set_num_threads(full)
            on_all, prefill = decode_seconds(), prefill_seconds()
            torch.set_num_threads(1)
            on_one = decode_seconds() if full > 1 else on_all
            decode, decode_threads = (on_all, full) if on_one > on_all * AUTO_MIN_GAIN else (on_one, 1)
    layer_bytes = sum(p.numel() * p.element_size() for name, p in arch.model.named_parameters()
                      if name.startswith(arch.layout.layers_prefix)) // count
    element = torch.empty((), dtype=loaded.dtype).element_size()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "probe": PROBE_FORMAT, "host": host or socket.gethostname(), "model": model_name or Path(model_dir).name,
        "fingerprint": loaded.fingerprint, "num_layers": config.num_hidden_layers, "dtype": str(loaded.dtype)[6:],
        "device": str(loaded.device), "threads": decode_threads if not on_gpu else 0, "prefill_threads": full,
        "decode_layer_s": decode / count, "prefill_token_layer_s": prefill / count / prefill_tokens,
        # The head's matrix product against a layer's (coordinator/split_costs.py reads the same from a config).
        "head_cost_layers": config.vocab_size * config.hidden_size * element / layer_bytes,
        "layer_bytes": layer_bytes, "embedding_bytes": config.vocab_size * config.hidden_size * element,
        "kv_bytes_per_token_layer": 2 * kv_heads * head_dim * element,
        "tied_head": bool(getattr(config, "tie_word_embeddings", False)),
        "free_bytes": free_memory_bytes(loaded.device), "probed_layers": [start, end],
    }


def main_probe(args: argparse.Namespace) -> int:
    """`stage-server --probe`: print the probe's line on stdout; 0 on success, 2 (with one line on
    stderr) when the model cannot be found or loaded."""
    from protos.model_files.catalog import ModelNotFoundError
    from protos.model_files.fetch import ensure_model
    from stage_server.architectures import UnsupportedArchitectureError
    from stage_server.slice_loader import SliceLoadError

    try:
        model_dir = ensure_model(args.model, progress=not args.quiet)
        result = run_probe(str(model_dir), dtype=args.dtype, device=args.device, threads=args.threads,
                           model_name=args.model)
    except (SliceLoadError, UnsupportedArchitectureError, ModelNotFoundError, OSError) as err:
        print(f"stage-server: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0
