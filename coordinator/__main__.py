"""`python -m coordinator`: the `coordinator` command (coordinator/cli.py)."""

import sys

from coordinator.cli import main

sys.exit(main())
