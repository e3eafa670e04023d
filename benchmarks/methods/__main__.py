"""`python -m benchmarks.methods COMMAND ...` (from the repository root); see `--help`."""

import sys

from .cli import main

sys.exit(main())
