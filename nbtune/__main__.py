"""`python -m nbtune`: the same command as `nbtune`."""

from __future__ import annotations

import sys

from nbtune.cli import main

if __name__ == "__main__":
    sys.exit(main())
