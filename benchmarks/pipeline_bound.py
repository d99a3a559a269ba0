"""The limit the stream itself sets on download overlapped with analysis: a tensor is analysed
once its last byte is in, tensors in the order their bytes arrive.

Usage: python benchmarks/pipeline_bound.py [--size large] [--mbps 15 33 100] [--workdir DIR]

Builds the base of ``bench_hub.py --size`` (safetensors shards), times the worker's analysis
of each tensor on this machine (``run.devices.layer_results``, the estimator as the worker
runs it, on every core), and replays the stream: bytes arrive at each ``--mbps`` from time 0,
shard after shard in the fetcher's order and, within a shard, in the order of their bytes;
tensor k's analysis starts at the later of the end of tensor k-1's and the arrival of its
own last byte. Prints, per bandwidth, the replay's wall time / max(download, analysis): what
streaming reaches at best where the download takes no CPU from the analysis and the worker's
start-up costs nothing. bench_hub.py's measured ratio minus this one is what the machine
(cores shared with the download and the hub) and the worker's start-up add.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def tensor_spans(folder: Path) -> list[tuple[str, str, int]]:
    """(shard, tensor, bytes from the first shard's first byte to the tensor's last), in
    the order a download of the shards one after the other writes them."""
    spans, before = [], 0
    for shard in sorted(p.name for p in folder.glob("*.safetensors")):
        path = folder / shard
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        header.pop("__metadata__", None)
        for name in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
            spans.append((shard, name, before + 8 + length + header[name]["data_offsets"][1]))
        before += path.stat().st_size
    return spans


def analysis_times(folder: Path, spans: list[tuple[str, str, int]]) -> list[float]:
    """Seconds the worker's estimator takes for each tensor, in ``spans``' order."""
    import torch
    from safetensors import safe_open

    from esd_experiment.estimator.net_esd import storage_of
    from esd_experiment.estimator.options import add_esd_arguments, esd_config_from_args
    from esd_experiment.run.devices import layer_results

    parser = argparse.ArgumentParser()
    add_esd_arguments(parser)
    config = esd_config_from_args(parser.parse_args([]), "cpu")
    warm = torch.randn(256, 128)  # loads LAPACK and the fits before the first timing
    layer_results(("model.layers.0.mlp.up_proj.weight", warm, "fp32"), config, "cpu")
    times = []
    for shard, name, _ in spans:
        with safe_open(str(folder / shard), "pt") as fh:
            tensor = fh.get_tensor(name)
        started = time.perf_counter()
        layer_results((name, tensor, storage_of(tensor.dtype)), config, "cpu")
        times.append(time.perf_counter() - started)
    return times


def replay(ends: list[int], times: list[float], bytes_per_s: float) -> float:
    """Wall time of the stream: each analysis after its bytes and the previous analysis."""
    done = 0.0
    for end, took in zip(ends, times, strict=True):
        done = max(done, end / bytes_per_s) + took
    return done


def main() -> int:
    from bench_hub import SIZES, build

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--mbps", type=float, nargs="+", default=[15.0, 33.0, 100.0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the base is built (kept; reused when it is there)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pipeline-bound-"))
    folder = workdir / "base"
    if not folder.is_dir():
        build(workdir, 0, args.size)
    spans = tensor_spans(folder)
    times = analysis_times(folder, spans)
    total, analysis = spans[-1][2], sum(times)
    print(f"--size {args.size}: {total / 1e6:.0f} MB, {len(spans)} tensors, analysis "
          f"{analysis:.1f} s on this machine's cores")
    print("| bandwidth | download | analysis | stream at best | / max(download, analysis) |")
    print("|---|---|---|---|---|")
    for mbps in args.mbps:
        download = total / (mbps * 1e6)
        wall = replay([end for _, _, end in spans], times, mbps * 1e6)
        print(f"| {mbps:g} MB/s | {download:.1f} s | {analysis:.1f} s | {wall:.1f} s | "
              f"{wall / max(download, analysis):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
