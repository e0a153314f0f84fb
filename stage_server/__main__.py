"""`python -m stage_server`: the `stage-server` command (stage_server/cli.py)."""

import protos.quiet_interrupt  # noqa: F401  (first: Ctrl-C while importing prints one line)

# isort: split
import sys

from stage_server.cli import main

sys.exit(main())
