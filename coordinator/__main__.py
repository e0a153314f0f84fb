"""`python -m coordinator`: the `coordinator` command (coordinator/cli.py)."""

import protos.quiet_interrupt  # noqa: F401  (first: Ctrl-C while importing prints one line)

# isort: split
import sys

from coordinator.cli import main

sys.exit(main())
