"""The sort at the heart of ``--randomize``'s shuffle against the other ways NumPy and torch
offer to order the same 64-bit key words, on one core each, alternated in one process.

``esd_randomize.sort_shuffle`` puts each entry below a random key in a 64-bit word and sorts
the words (``numpy``: NumPy's SIMD sort, what the shuffle uses on the CPU). The same order
can also be had by:

  two_level_8 / two_level_16  a stable radix ``argsort`` of the words' top 8 / 16 bits, a
                              gather, and a sort of each bucket (buckets in cache; the result
                              is the same sorted array)
  torch_sort                  torch's CPU sort of the words as int64 (top bit flipped)

``--entries`` words (default 32.8 M: a 32000 x 1024 embedding) of random bits. Each way is
checked to give NumPy's order. Prints the minimum and median seconds over ``--repeats``.

Usage: python benchmarks/shuffle_sorts.py [--entries 32768000] [--repeats 3]
Writes nothing. Exit code 0 (1 when a way gives another order).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np


def two_level(words: np.ndarray, bits: int) -> np.ndarray:
    small = np.uint8 if bits == 8 else np.uint16
    top = (words >> np.uint64(64 - bits)).astype(small)
    out = words[np.argsort(top, kind="stable")]
    start = 0
    for end in np.cumsum(np.bincount(top, minlength=1 << bits)):
        out[start:end].sort()
        start = end
    return out


def torch_sort(words: np.ndarray) -> np.ndarray:
    import torch

    flipped = torch.from_numpy(words.view(np.int64) ^ np.int64(-2 ** 63))
    return (torch.sort(flipped).values.numpy() ^ np.int64(-2 ** 63)).view(np.uint64)


WAYS = {"numpy": np.sort, "two_level_8": lambda w: two_level(w, 8),
        "two_level_16": lambda w: two_level(w, 16), "torch_sort": torch_sort}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, default=32000 * 1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    words = np.random.default_rng(0).integers(0, 2 ** 64 - 1, args.entries, dtype=np.uint64)
    expected = np.sort(words)
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(args.repeats):
        for name, way in WAYS.items():
            start = time.perf_counter()
            got = way(words)
            times[name].append(time.perf_counter() - start)
            if not np.array_equal(got, expected):
                print(f"{name} gives another order")
                return 1
    print(f"{args.entries} words, {args.repeats} repeats, one core; {platform.processor() or platform.machine()}")
    print("| way | min s | median s | / numpy (min) |\n|---|---|---|---|")
    base = min(times["numpy"])
    for name, t in times.items():
        print(f"| {name} | {min(t):.2f} | {statistics.median(t):.2f} | {min(t) / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
