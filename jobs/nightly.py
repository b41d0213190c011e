"""Nightly incremental upscaling: the job entry point for a schedule (cron, systemd timer, RayCronJob).

    python jobs/nightly.py SRC DST [--retry-failed] [--lease-ttl SECONDS] [--checkpoint URI] ...

Takes exactly the options of `isosr nightly` (see `isosr nightly --help`): processes only the inputs
that are new or changed since they were last processed, refuses to start (exit 4) while another run
holds DST's lease, and resumes an interrupted run. Templates that run it: jobs/schedule/, jobs/k8s/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
