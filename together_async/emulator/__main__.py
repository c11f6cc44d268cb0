"""`python -m together_async.emulator`: serve the emulator from the command line."""

from __future__ import annotations

import sys

from .server import main

if __name__ == "__main__":
    sys.exit(main())
