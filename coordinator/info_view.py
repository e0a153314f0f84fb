"""`coordinator info` as a person reads it: the model, the batching state and one row per stage server.

Owns: rendering a ModelInfo (GetModelInfo's answer) as plain text, a header and a table of every
stage server the coordinator knows (span, state, the rows it runs, sessions, threads, how long ago
it last answered a health probe, and why it is down). Does not own fetching it (client) or the
JSON form (`coordinator info --json`, cli).
"""

from __future__ import annotations

from protos import coordinator_pb2

COLUMNS = ("ADDRESS", "LAYERS", "STATE", "ROWS", "SESSIONS", "THREADS", "SEEN", "DTYPE", "DEVICE")


def _seen(seconds: float) -> str:
    return "never" if seconds < 0 else f"{seconds:.1f}s ago"


def stage_rows(info: coordinator_pb2.ModelInfo) -> list[tuple[str, ...]]:
    rows = []
    for stage in info.stages:
        layers = f"{stage.layer_start}:{stage.layer_end}" if stage.layer_end else "?"
        rows.append((stage.address, layers, stage.state or "serving", str(stage.rows), str(stage.active_sessions),
                     str(stage.compute_threads or "-"), _seen(stage.seen_seconds_ago), stage.dtype or "-",
                     stage.device or "-"))
    return rows


def render(info: coordinator_pb2.ModelInfo) -> str:
    """The header lines, the table, and a line per down server saying why."""
    batching = info.batching
    lines = [f"model      {info.model_name} ({info.model_type}, {info.num_layers} layers, "
             f"vocabulary {info.vocab_size}, context {info.max_context})",
             f"weights    fingerprint {info.model_fingerprint}, manifest {info.weights_manifest_id or '-'}",
             f"wire       {info.compression}; up to {info.max_new_tokens_limit} new tokens a request",
             f"batching   {batching.running} running, {batching.prefilling} prefilling, {batching.queued} queued "
             f"(bounds: {batching.max_batch_rows} rows, {batching.max_queue} queued); {batching.micro_batches} "
             f"group(s) in flight; {batching.decode_steps} decode steps, {batching.prefills} prefills",
             ""]
    table = [COLUMNS, *stage_rows(info)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    lines += [f"{stage.address} is down: {stage.down_reason}" for stage in info.stages if stage.down_reason]
    return "\n".join(lines)
