"""`coordinator top`: a live view of a running coordinator, refreshed every second.

Owns: the subcommand (`add_top_command`, `cmd_top`), polling GetModelInfo, and rendering each poll
with rich (a terminal UI library): a header with the model, the queue, running and prefilling
requests and tokens/s since the last poll, then one row per stage server with its span, state,
rows, sessions, mean step time and steps/s since the last poll, KV cache and resident memory,
and when it last answered the coordinator's probe; a line per down server says why. Rates are
differences between two polls, so the first screen shows none.

Does not own the numbers (GetModelInfo: coordinator/app.py, the stages' Info) or `info`'s one-shot
table (info_view).
"""

from __future__ import annotations

import argparse
import time

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from coordinator.api_keys import add_api_key_argument
from coordinator.client import CoordinatorClient
from protos import coordinator_pb2, tls_arguments

STATE_STYLES = {"serving": "green", "draining": "yellow", "down": "bold red", "joining": "cyan"}


def add_top_command(commands) -> None:
    top = commands.add_parser("top", help="a live view of a coordinator and its stage servers (Ctrl-C to quit)")
    top.add_argument("--address", required=True)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--count", type=int, default=0, help="stop after this many refreshes (default 0: until Ctrl-C)")
    add_api_key_argument(top)
    tls_arguments.add_client_tls_arguments(top)


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f}" if value else "-"


def render(info: coordinator_pb2.ModelInfo, before: coordinator_pb2.ModelInfo | None, seconds: float) -> Group:
    """One screen: `before` is the previous poll, `seconds` ago (None: no rates yet)."""
    batching = info.batching
    rate = (f"{(batching.tokens - before.batching.tokens) / seconds:.1f}" if before is not None and seconds > 0
            else "-")
    header = Text.assemble(
        (f"{info.model_name}", "bold"), f"  {info.num_layers} layers, wire {info.compression}\n",
        f"queued {batching.queued}  running {batching.running}  prefilling {batching.prefilling}  "
        f"groups {batching.micro_batches}  tokens/s {rate}  tokens {batching.tokens}")
    table = Table(box=None, header_style="bold")
    for column in ("ADDRESS", "LAYERS", "STATE", "ROWS", "SESSIONS", "STEP MS", "STEPS/S", "KV MiB", "RSS MiB",
                   "SEEN"):
        table.add_column(column, justify="left" if column in ("ADDRESS", "LAYERS", "STATE") else "right",
                         no_wrap=True, overflow="fold" if column == "ADDRESS" else "ellipsis")
    earlier = {stage.address: stage for stage in before.stages} if before is not None else {}
    for stage in info.stages:
        step_ms = (1000 * stage.compute_seconds / stage.micro_batches_served) if stage.micro_batches_served else 0
        prior = earlier.get(stage.address)
        steps = ((stage.micro_batches_served - prior.micro_batches_served) / seconds
                 if prior is not None and seconds > 0 and stage.micro_batches_served >= prior.micro_batches_served
                 else None)
        table.add_row(stage.address, f"{stage.layer_start}:{stage.layer_end}" if stage.layer_end else "?",
                      Text(stage.state or "serving", style=STATE_STYLES.get(stage.state or "serving", "")),
                      str(stage.rows), str(stage.active_sessions), f"{step_ms:.1f}" if step_ms else "-",
                      f"{steps:.1f}" if steps is not None else "-", _mib(stage.cache_bytes), _mib(stage.rss_bytes),
                      "never" if stage.seen_seconds_ago < 0 else f"{stage.seen_seconds_ago:.1f}s")
    down = [Text(f"{s.address} is down: {s.down_reason}", style="red") for s in info.stages if s.down_reason]
    return Group(header, Text(""), table, *down)


def cmd_top(args: argparse.Namespace) -> int:
    """Refresh until Ctrl-C (or --count refreshes); errors reaching the coordinator end it with one line."""
    with CoordinatorClient(args.address, api_key=args.api_key, tls=tls_arguments.client_tls(args),
                           timeout_s=max(2.0, args.interval)) as client:
        before, polled = None, time.monotonic()
        info = client.model_info()
        with Live(render(info, None, 0.0), auto_refresh=False, screen=False) as live:
            shown = 1
            try:
                while not args.count or shown < args.count:
                    time.sleep(max(0.1, args.interval))
                    before, info, now = info, client.model_info(), time.monotonic()
                    live.update(render(info, before, now - polled), refresh=True)
                    polled = now
                    shown += 1
            except KeyboardInterrupt:
                pass
    return 0
