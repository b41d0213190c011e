"""Upscale a file or folder x4: the job entry point.

    python jobs/upscale.py SRC DST [--checkpoint URI] [--halo N] [--batch-size N] ...

Takes exactly the options of `isosr upscale` (see `isosr upscale --help`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["upscale", *sys.argv[1:]]))
