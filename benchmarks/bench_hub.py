"""Hub lists at scale, on the hub stand-in with throttled bandwidth: adapters sharing their
base, the disk a sharded model needs, and download overlapped with analysis.

Usage: python benchmarks/bench_hub.py [--mbps 40] [--adapters 6] [--repeats 1] [--size small]
                                      [--max_shard_size 35MB] [--workdir DIR] [--compare_thread]
                                      [--worker_cpus 0,1]
(--adapters 0: only the disk and overlap measures, on the base alone)

Builds a Llama-shaped base and k LoRA adapters of it (--size small: fp32, hidden 768, 201 MB
in 7 shards of up to 35 MB, where the worker's fixed start-up of about 1.5 s, mostly
importing torch, weighs as much as three shards' download; --size large: bf16, hidden 2048,
as a 1B model's layers, about 750 MB in shards of up to 200 MB, where shards take seconds as
real ones, of 2 to 5 GB, take minutes; --max_shard_size overrides the shard size, e.g. 5GB,
the hub's default, for one file), serves them from tests/hub_server.py on 127.0.0.1 at
--mbps MB/s, and runs the real runner and worker as whole processes against it (HF_ENDPOINT),
each with a fresh cache:

  group       one run over the list "base's k adapters" with --cleanup_cache: one job reads
              (and downloads) the base once for all of them
  separate    k runs of one adapter each with --cleanup_cache (what a list gave before: each
              adapter fetched the base anew); the wall times are summed
  streamed    the worker on the base alone, from the hub, --cleanup_cache: the cache size is
              sampled every 20 ms for its peak. Run three times per round: once as the first model
              of its config (layer_order's disk cache of depth orders emptied, so the worker
              imports transformers for the order), once as any later model of that config,
              and once more like the latter without --cleanup_cache (no disk bound); with
              --compare_thread, a fourth time like the second with the worker's downloads on a
              thread of its own instead of a process of their own (ESD_DOWNLOAD_PROCESS=0)
  download    the base's shards fetched alone (huggingface_hub, one after the other)
  analysis    the worker on the base already in the cache (HF_HUB_OFFLINE=1), depth order
              cached

Prints base bytes fetched / base size, group / separate wall time, peak cache / (two largest
shards + small files), streamed / max(download, analysis) (with --repeats N, the
medians of N alternated runs of each, and the ratio of each round), and the CPU the download
alone (its client, with Python's start-up and huggingface_hub's import; the stand-in hub) and
the analysis alone take: where the three together need more than the machine's cores during
the download, streaming cannot reach max(download, analysis). --worker_cpus runs the
runner, the worker and the download alone on those CPUs and the stand-in hub on the others, as
a hub that is not on the analysis's machine (a machine with more cores than the worker is
given). Exit code 0 when every run succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gputracker import THREAD_VARS  # noqa: E402

SAMPLE_S = 0.02
WORKER_CPUS: set[int] | None = None  # --worker_cpus: where the measured processes run
SMALL_FILES = 1 << 20       # config, index: the margin the disk rule allows beside the shards
TIMEOUT_S = 1800
# The bases --size builds: Llama configs, the dtype they are saved in, their shard size.
SIZES = {
    "small": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                   num_attention_heads=12, num_key_value_heads=4, vocab_size=8192,
                   tie_word_embeddings=False), "float32", "35MB"),
    "large": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=6,
                   num_attention_heads=16, num_key_value_heads=16, vocab_size=16384,
                   tie_word_embeddings=False), "bfloat16", "200MB"),
}


def build(workdir: Path, adapters: int, size: str = "small",
          max_shard_size: str | None = None) -> tuple[Path, list[Path]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape, dtype, shard = SIZES[size]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(getattr(torch, dtype)).eval()
    base = workdir / "base"
    model.save_pretrained(base, max_shard_size=max_shard_size or shard)
    out = []
    for i in range(adapters):
        torch.manual_seed(i + 1)
        peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        peft.save_pretrained(workdir / f"adapter{i}")
        model = peft.unload()
        out.append(workdir / f"adapter{i}")
    return base, out


def write_list(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model_id", "base_model_relation", "source_model"])
        writer.writerows(rows)
    return path


def timed(cmd: list[str], env: dict, watch: Path | None = None) -> tuple[float, int]:
    """Wall time of ``cmd``; with ``watch``, the peak size of that folder meanwhile."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], folder_bytes(watch))
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True) if watch else None
    started = time.monotonic()
    if sampler:
        sampler.start()
    argv = cmd
    if WORKER_CPUS:  # moved by a trampoline, not preexec_fn: the hub's threads run here
        env = {**env, **dict.fromkeys(THREAD_VARS, str(len(WORKER_CPUS)))}
        argv = [sys.executable, "-c", "import os, sys; os.sched_setaffinity(0, "
                f"{sorted(WORKER_CPUS)}); os.execv(sys.argv[1], sys.argv[1:])", *cmd]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    took = time.monotonic() - started
    done.set()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return took, peak[0]


@contextlib.contextmanager
def cpu_used():
    """CPU seconds (user and system) that the block's child processes (``children``) and
    this process (``self``: the hub stand-in serving them) take."""
    used: dict[str, float] = {}
    kids, own = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
    yield used
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used["children"] = after.ru_utime - kids.ru_utime + after.ru_stime - kids.ru_stime
    used["self"] = time.process_time() - own


def folder_bytes(folder: Path) -> int:
    """Bytes of the repositories' files in the hub cache ``folder``: their ``blobs/``, where
    huggingface_hub writes every file and its downloads in progress (the snapshots hold links
    to them, ``.locks`` empty files). A few directory reads, so that sampling every
    ``SAMPLE_S`` takes no time from the stand-in hub, which runs in this process."""
    total = 0
    try:
        repos = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for repo in repos:
        try:
            entries = list(os.scandir(os.path.join(repo.path, "blobs")))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:  # deleted while it was walked
                pass
    return total


def runner(list_path: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list", str(list_path),
            "--output_dir", str(out), "--device", "cpu", "--no-progress", "--cleanup_cache"]


def worker(model: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "esd_worker.py"), "--model_id", model, "--output_dir",
            str(out), "--device", "cpu", *extra]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mbps", type=float, default=40.0, help="hub bandwidth, MB/s")
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="the base's shape and shard size (see above)")
    parser.add_argument("--max_shard_size", default=None,
                        help="shard size the base is saved with (default: the --size's)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--compare_thread", action="store_true",
                        help="also run the streamed worker with its downloads on a thread of "
                             "its own process (ESD_DOWNLOAD_PROCESS=0), alternated with the rest")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of the overlap measure (streamed, download, analysis), "
                             "alternated; medians are reported")
    parser.add_argument("--worker_cpus", default=None,
                        help="comma-separated CPUs for the runner, the worker and the download "
                             "alone (with as many threads); the stand-in hub runs on the others")
    args = parser.parse_args()
    from tests.hub_server import HubServer

    global WORKER_CPUS
    cpus = f"{os.cpu_count()} CPUs"
    if args.worker_cpus:
        WORKER_CPUS = {int(c) for c in args.worker_cpus.split(",")}
        rest = set(os.sched_getaffinity(0)) - WORKER_CPUS
        if not rest or not WORKER_CPUS <= set(os.sched_getaffinity(0)):
            parser.error(f"--worker_cpus {args.worker_cpus}: leave this process's other CPUs "
                         f"{sorted(os.sched_getaffinity(0))} some for the stand-in hub")
        os.sched_setaffinity(0, rest)
        cpus = (f"{len(WORKER_CPUS)} CPUs for the worker ({args.worker_cpus}), "
                f"{len(rest)} others for the stand-in hub")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-hub-"))
    base, adapters = build(workdir, args.adapters, args.size, args.max_shard_size)
    shards = sorted(p.stat().st_size for p in base.glob("*.safetensors"))
    base_bytes = sum(shards)
    with HubServer() as hub:
        hub.add_repo("org/base", base)
        for i, adapter in enumerate(adapters):
            hub.add_repo(f"org/adapter{i}", adapter)
        hub.throttle(args.mbps * 1e6)

        def env(name: str, **extra) -> dict:
            cache = workdir / f"cache-{name}"
            shutil.rmtree(cache, ignore_errors=True)
            return {**hub.env(cache), "HF_HUB_DOWNLOAD_TIMEOUT": "120", **extra}, cache

        def base_fetched(since: int) -> int:
            return sum(s.nbytes for s in hub.log[since:] if s.repo_id == "org/base"
                       and (s.filename or "").endswith(".safetensors"))

        rows = [(f"org/adapter{i}", "lora", "org/base") for i in range(args.adapters)]
        group_s = separate_s = 0.0
        group_bytes = separate_bytes = 0
        if rows:
            mark = len(hub.log)
            group_s, _ = timed(runner(write_list(workdir / "group.csv", rows),
                                      workdir / "out-g"), env("group")[0])
            group_bytes = base_fetched(mark)
            mark = len(hub.log)
            for i, row in enumerate(rows):
                took, _ = timed(runner(write_list(workdir / f"one{i}.csv", [row]),
                                       workdir / "out-s"), env(f"one{i}")[0])
                separate_s += took
            separate_bytes = base_fetched(mark)

        code = ("import sys; from huggingface_hub import hf_hub_download as d\n"
                "for f in sys.argv[1:]: d('org/base', f)")
        files = sorted(p.name for p in base.glob("*.safetensors"))
        order_cache = workdir / "esd-cache"  # layer_order's disk cache of depth orders
        streamed, cold, kept, download, analysis, peak = [], [], [], [], [], 0
        threaded = []  # as streamed, the downloads on a thread of the worker
        client_cpu, hub_cpu, analysis_cpu = [], [], []  # CPU-s of download and analysis alone
        for _ in range(args.repeats):  # the runs alternate, so they share the load
            for runs in (cold, streamed, kept, *([threaded] if args.compare_thread else [])):
                if runs is cold:
                    shutil.rmtree(order_cache, ignore_errors=True)
                streamed_env, cache = env("streamed", ESD_CACHE_DIR=str(order_cache),
                                          **({"ESD_DOWNLOAD_PROCESS": "0"}
                                             if runs is threaded else {}))
                cleanup = ["--cleanup_cache"] if runs is not kept else []
                took, seen = timed(worker("org/base", workdir / "out-w", *cleanup),
                                   streamed_env, watch=cache)
                runs.append(took)
                if cleanup:
                    peak = max(peak, seen)
            download_env, cache = env("download", ESD_CACHE_DIR=str(order_cache))
            with cpu_used() as used:
                download.append(timed([sys.executable, "-c", code, *files], download_env)[0])
            client_cpu.append(used["children"])
            hub_cpu.append(used["self"])  # the stand-in's threads, in this process
            analysis_env = {**download_env, "HF_HUB_OFFLINE": "1"}
            with cpu_used() as used:
                analysis.append(timed(worker("org/base", workdir / "out-a"), analysis_env)[0])
            analysis_cpu.append(used["children"])
            print(f"round {len(analysis)}: streamed {streamed[-1]:.1f} s, download alone "
                  f"{download[-1]:.1f} s, analysis alone {analysis[-1]:.1f} s", flush=True)
        streamed_s, cold_s, kept_s, download_s, analysis_s = (
            statistics.median(v) for v in (streamed, cold, kept, download, analysis))
        ratios = [s / max(d, a) for s, d, a in zip(streamed, download, analysis, strict=True)]

    bound = sum(shards[-2:]) + SMALL_FILES
    print(f"machine: {cpus}; hub at {args.mbps:g} MB/s; --size {args.size}: base "
          f"{base_bytes / 1e6:.0f} MB in {len(shards)} shards; {args.adapters} adapters")
    print("| measure | value | target |\n|---|---|---|")
    if rows:
        print(f"| base bytes fetched, group run / base | {group_bytes / base_bytes:.3f} | <= 1.1 |")
        print(f"| base bytes fetched, separate runs / base | {separate_bytes / base_bytes:.2f} | |")
        print(f"| wall, group run / {args.adapters} separate runs | {group_s:.1f} s / "
              f"{separate_s:.1f} s = {group_s / separate_s:.2f} | <= 0.5 |")
    print(f"| peak cache, streamed with --cleanup_cache / (two largest shards + 1 MiB) | "
          f"{peak / 1e6:.0f} MB / {bound / 1e6:.0f} MB = {peak / bound:.2f} | <= 1 |")
    print(f"| wall, streamed / max(download alone, analysis alone) | {streamed_s:.1f} s / "
          f"max({download_s:.1f}, {analysis_s:.1f}) s = "
          f"{streamed_s / max(download_s, analysis_s):.2f} | <= 1.15 |")
    print(f"| the same, first model of its config (depth order not cached yet) | "
          f"{cold_s:.1f} s / max({download_s:.1f}, {analysis_s:.1f}) s = "
          f"{cold_s / max(download_s, analysis_s):.2f} | |")
    print(f"| the same without --cleanup_cache (no two-shard bound: downloads never wait) | "
          f"{kept_s:.1f} s / max({download_s:.1f}, {analysis_s:.1f}) s = "
          f"{kept_s / max(download_s, analysis_s):.2f} | |")
    client_s, hub_s, analysis_cpu_s = (statistics.median(v)
                                        for v in (client_cpu, hub_cpu, analysis_cpu))
    print(f"| CPU: analysis alone; download alone, its client and the hub stand-in | "
          f"{analysis_cpu_s:.1f} CPU-s ({analysis_cpu_s / analysis_s:.2f} of "
          f"{len(WORKER_CPUS or os.sched_getaffinity(0))} cores); "
          f"{client_s:.1f} + {hub_s:.1f} CPU-s | |")
    if threaded:
        threaded_s = statistics.median(threaded)
        print(f"| the same with the downloads on a thread of the worker (ESD_DOWNLOAD_PROCESS=0)"
              f" | {threaded_s:.1f} s / max({download_s:.1f}, {analysis_s:.1f}) s = "
              f"{threaded_s / max(download_s, analysis_s):.2f} | |")
    if args.repeats > 1:
        print(f"\nstreamed / max(download, analysis), run by run: "
              f"{', '.join(f'{r:.2f}' for r in ratios)} (medians above)")
        if threaded:
            print("the same, downloads on a thread: " + ", ".join(
                f"{t / max(d, a):.2f}" for t, d, a in zip(threaded, download, analysis,
                                                          strict=True)))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
