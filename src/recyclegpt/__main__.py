"""`python -m recyclegpt ...` runs the `recyclegpt` command."""

import sys

from .cli.main import main

sys.exit(main())
