"""Peak memory of a child process, sampled from /proc: shared by the memory benchmarks."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path


def rss(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) of ``pid`` in bytes; zeros once the process is gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmRSS"):
                    found[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found.get("RssAnon", 0), found.get("VmRSS", 0)


def run_sampled(cmd: list[str], cwd: Path, sample_s: float) -> tuple[int, int, float, str]:
    """Run ``cmd`` sampling its memory every ``sample_s``: (peak RssAnon, peak VmRSS, wall
    seconds, output). Raises RuntimeError with the output when it fails."""
    start = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        peak_anon = peak_rss = 0
        while proc.poll() is None:
            anon, total = rss(proc.pid)
            peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, total)
            time.sleep(sample_s)
        wall = time.monotonic() - start
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])} exited with {proc.returncode}:\n"
                           f"{output[-4000:]}")
    return peak_anon, peak_rss, wall, output
