"""`python -m stage_server`: the `stage-server` command (stage_server/cli.py)."""

import sys

from stage_server.cli import main

sys.exit(main())
