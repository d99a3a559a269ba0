"""What memory costs the first time it is written: a buffer the size of a large matrix's
shuffle words (``--mb``, default 262 MB: a 32000 x 1024 matrix at 8 bytes an entry) is
allocated, written once and freed, after pauses of ``--pauses`` seconds since the last free.

On a bare machine every write costs about the same. On a virtual machine whose guest hands
freed memory back to its host (virtio-balloon free page reporting, Linux's
``page_reporting``: free memory is reported about 2 s after it is freed), memory written
again after such a pause is faulted in by the host anew, many times the cost of a write of
memory the guest kept. ``--randomize`` allocates its word buffer once per job, so this is
paid once per job, and by nothing else the plain run does.

Usage: python benchmarks/first_touch.py [--mb 262] [--pauses 0,0,0.5,3,3,0] [--repeats 2]
Prints one Markdown table row per pause and whether the guest has free page reporting.
Writes nothing. Exit code 0.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path


def page_reporting() -> str:
    """'yes' when a virtio-balloon device offers free page reporting (feature bit 5)."""
    found = []
    for dev in Path("/sys/bus/virtio/devices").glob("*"):
        try:
            if (dev / "device").read_text().strip() == "0x0005":  # a balloon
                found.append((dev / "features").read_text().strip()[5:6] == "1")
        except OSError:
            continue
    return "yes" if any(found) else ("no" if found else "no balloon device")


def main() -> int:
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=262)
    p.add_argument("--pauses", default="0,0,0.5,3,3,0")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    words = args.mb * 1_000_000 // 8
    print(f"machine: {platform.processor() or platform.machine()}; free page reporting: "
          f"{page_reporting()}; buffer {args.mb} MB")
    print("| pause since the last free (s) | write s (each repeat) |\n|---|---|")
    for pause in (float(x) for x in args.pauses.split(",")):
        times = []
        for _ in range(args.repeats):
            time.sleep(pause)
            t0 = time.perf_counter()
            buffer = np.empty(words, np.uint64)
            buffer[:] = 1
            times.append(time.perf_counter() - t0)
            del buffer
        print(f"| {pause:g} | {', '.join(f'{t:.3f}' for t in times)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
