"""The fault campaign of tests/fault_campaign.py over many seeds: a list of hub models, a base
and its adapters run against the hub stand-in under random faults (5xx, resets, stalls, a
gated repository, a missing file, the hub down, a full disk when run as root, kill -9 of the
runner or a worker), each run held to the contract (every listed model done, failed or not
reached, exactly once; exit 0 only when all are done), then rerun clean and compared row for
row with a fault-free run.

Usage: python benchmarks/fault_campaign.py --seeds 20 [--first 100] [--rounds 2] [--work DIR]
Prints one line per seed and the seeds that broke the contract; exit 0 when none did, 1 else.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fault_campaign import build_zoo, campaign_seed, reference_run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=10, help="how many seeds to run")
    p.add_argument("--first", type=int, default=0, help="the first seed")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs under faults, in the same directory, before the clean rerun")
    p.add_argument("--work", type=Path, default=None,
                   help="keep the runs' directories here (default: a temporary directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fault-campaign-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        zoo = build_zoo(work / "zoo")
        reference = reference_run(zoo, work)
        broken = []
        for seed in range(args.first, args.first + args.seeds):
            started = time.monotonic()
            report = campaign_seed(seed, zoo, reference, work, args.rounds)
            print(f"{report.line()} ({time.monotonic() - started:.0f} s)", flush=True)
            if report.broken:
                broken.append(seed)
    print(f"{args.seeds - len(broken)} of {args.seeds} seeds kept the contract"
          + (f"; broken: {broken}" if broken else ""))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
