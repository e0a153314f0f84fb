"""How both commands log: `--log-level` and `--log-format text|json`, before or after the subcommand.

Owns: the two flags (`add_log_arguments`: on the command, and again on each subcommand so they may
come after it) and `configure`, which installs one handler on the root logger: text lines, or one
JSON object per line (`JsonFormatter`: time, level, logger, message, and the record's layerline
fields such as `request_id`, `request_ids`, `session_id`, for log collectors to index).

Does not own what is logged (each module's logger) or the request log line (coordinator/service.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Fields a log call may attach with `extra=`; the JSON form carries them, the text form has them in its message.
FIELDS = ("request_id", "request_ids", "session_id", "api", "method", "status", "prompt_tokens",
          "completion_tokens", "ttft_s", "duration_s", "route", "replays")


def add_log_arguments(parser: argparse.ArgumentParser, default_level: str, *, after: bool = False) -> None:
    """The log flags on `parser`; `after`: on a subcommand, where they override the command's own."""
    default = {"default": argparse.SUPPRESS} if after else {}
    parser.add_argument("--log-level", **(default or {"default": default_level}),
                        help=f"DEBUG, INFO, WARNING or ERROR (default {default_level})")
    parser.add_argument("--log-format", choices=LOG_FORMATS, **(default or {"default": "text"}),
                        help="text lines (default) or one JSON object per line")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update((name, getattr(record, name)) for name in FIELDS if hasattr(record, name))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, log_format: str = "text") -> None:
    """Log at `level` in `log_format` to stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
